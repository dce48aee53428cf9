"""A tiny random-weight SD1-style text-to-image model in ComfyUI's own classes.

UNet: 2 levels (32, 64 channels), cross-attention at both, 8x8..16x16 latents; CLIP:
2 layers of width 32 with the real SD1 tokenizer (49,408 tokens).  Built in-process or
written as a checkpoint that ``CheckpointLoaderSimple`` loads once :func:`register_tiny_sd`
has put the tiny model class first in ComfyUI's detection list.
"""

from __future__ import annotations

import torch

TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

TINY_UNET = dict(
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    use_checkpoint=False,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=32,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)

_CLASSES: dict = {}


def classes():
    """(TinyClip, TinySD) built lazily so importing this module needs no ComfyUI."""
    if _CLASSES:
        return _CLASSES["clip"], _CLASSES["sd"]
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    class TinyClip(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": TINY_CLIP}, **kw)

    class TinySD(comfy.supported_models.SD15):
        unet_config = {
            "context_dim": 32,
            "model_channels": 32,
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
            "use_temporal_attention": False,
        }
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, TinyClip)

    _CLASSES.update(clip=TinyClip, sd=TinySD)
    return TinyClip, TinySD


def register_tiny_sd() -> None:
    """Let ComfyUI's checkpoint loader detect the tiny architecture (harness only)."""
    import comfy.supported_models

    _, TinySD = classes()
    if TinySD not in comfy.supported_models.models:
        comfy.supported_models.models.insert(0, TinySD)


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02, clip_std: float = 0.3) -> None:
    """ComfyUI's ops skip weight initialisation: fill every parameter deterministically."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 0:
            continue  # e.g. CLIP's logit_scale keeps its value
        if p.ndim == 1:
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.05)
        else:
            s = clip_std if "embedding" in name else std
            fan_in = p[0].numel()
            s = max(s, 1.0 / fan_in**0.5) if "embedding" not in name else s
            p.copy_(torch.randn(p.shape, generator=g) * s)


def build(seed: int = 0, dtype=torch.float32):
    """A fresh (ModelPatcher, CLIP) pair of the tiny model with deterministic random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    _, TinySD = classes()
    cfg = TinySD(dict(TINY_UNET))
    cfg.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        model = cfg.get_model({})
        init_weights(model.diffusion_model, seed)
    mp = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    clip = comfy.sd.CLIP(cfg.clip_target())
    with torch.inference_mode(False):
        init_weights(clip.cond_stage_model, seed + 1)
    return mp, clip


def checkpoint_state_dict(seed: int = 0) -> dict:
    """A checkpoint state dict (UNet + CLIP + TAESD VAE) of the tiny model."""
    import comfy.taesd.taesd

    mp, clip = build(seed)
    sd = {}
    for k, v in mp.model.diffusion_model.state_dict().items():
        sd["model.diffusion_model." + k] = v.detach().clone()
    for k, v in clip.cond_stage_model.state_dict().items():
        if k.startswith("clip_l."):
            sd["cond_stage_model." + k[len("clip_l."):]] = v.detach().clone()
    with torch.inference_mode(False):
        vae = comfy.taesd.taesd.TAESD()
        init_weights(vae, seed + 2, std=0.05)
    for k, v in vae.state_dict().items():
        if k.startswith("taesd_encoder.") or k.startswith("taesd_decoder."):
            sd["first_stage_model." + k] = v.detach().clone()
    return sd


def write_checkpoint(path: str, seed: int = 0) -> str:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in checkpoint_state_dict(seed).items()}
    save_file(sd, path)
    return path


def install_checkpoint(name: str = "tiny_sd.safetensors", seed: int = 0) -> str:
    """Register the tiny model type and write its checkpoint into ComfyUI's checkpoints folder
    (once); returns the name CheckpointLoaderSimple takes."""
    import os

    import folder_paths

    register_tiny_sd()
    d = folder_paths.get_folder_paths("checkpoints")[0]
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    if not os.path.exists(path):
        write_checkpoint(path, seed=seed)
    return name
