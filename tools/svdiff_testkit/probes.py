"""What other nodes see of a MODEL/CLIP: deterministic outputs to compare bit for bit."""

from __future__ import annotations

import torch


def context_dim(model) -> int:
    """Width of the text conditioning the model's UNet expects (tiny: 32, toy world: 64)."""
    return int(model.model.model_config.unet_config["context_dim"])


@torch.no_grad()
def fingerprint_outputs(model, clip, prompt: str = "a photo of a sks robot"):
    """(UNet evaluation, CLIP cond, CLIP pooled) for fixed inputs: what downstream nodes receive."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, context_dim(model), generator=g)
    unet = model.model.apply_model(x, torch.tensor([5.0]), c_crossattn=ctx).clone()
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return unet, cond.clone(), pooled.clone()
