"""What other nodes see of a MODEL/CLIP: deterministic outputs to compare bit for bit."""

from __future__ import annotations

import torch


def context_dim(model) -> int:
    """Width of the text conditioning the model's UNet expects (tiny: 32, toy world: 64)."""
    return int(model.model.model_config.unet_config["context_dim"])


def unet_inputs(model, seed: int = 0):
    """A fixed latent ``[1, 4, 8, 8]`` and text conditioning ``[1, 77, context_dim]`` from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, context_dim(model), generator=g)
    return x, ctx


def unet_forward(model, seed: int = 0, sigma: float = 5.0, grad_mode=torch.no_grad):
    """One deterministic UNet evaluation through ComfyUI's loading/patching path: the model is
    loaded fully (its patches applied) and evaluated at ``sigma`` on :func:`unet_inputs` under
    ``grad_mode`` (``torch.no_grad`` or ``torch.inference_mode``, as the caller's test needs)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    x, ctx = unet_inputs(model, seed)
    with grad_mode():
        return model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx).clone()


@torch.no_grad()
def fingerprint_outputs(model, clip, prompt: str = "a photo of a sks robot"):
    """(UNet evaluation, CLIP cond, CLIP pooled) for fixed inputs: what downstream nodes receive."""
    unet = unet_forward(model)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return unet, cond.clone(), pooled.clone()
