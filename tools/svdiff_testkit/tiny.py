"""A tiny random-weight SD1-style text-to-image model in ComfyUI's own classes.

UNet: 2 levels (32, 64 channels), cross-attention at both, 8x8..16x16 latents; CLIP:
2 layers of width 32 with the real SD1 tokenizer (49,408 tokens).  Built in-process or
written as a checkpoint that ``CheckpointLoaderSimple`` loads once :func:`register_tiny_sd`
has put the tiny model class first in ComfyUI's detection list.
"""

from __future__ import annotations

import functools

import torch

from svdiff_testkit import model_factory

TINY_CLIP = model_factory.small_clip_config(32)
TINY_UNET = model_factory.small_unet_config(context_dim=32, image_size=32)

# What ComfyUI's own matches() compares with the configuration it detects from a checkpoint.
TINY_MATCH = {
    "context_dim": 32,
    "model_channels": 32,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
}


@functools.cache
def classes():
    """(TinyClip, TinySD) built on first use so importing this module needs no ComfyUI."""
    return model_factory.make_model_classes("Tiny", TINY_CLIP, TINY_MATCH)


def register_tiny_sd() -> None:
    """Let ComfyUI's checkpoint loader detect the tiny architecture (harness only)."""
    model_factory.register(classes()[1])


def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02, clip_std: float = 0.3) -> None:
    """ComfyUI's ops skip weight initialisation: fill every parameter deterministically (small
    random biases, norm scales near 1; embeddings ``clip_std``)."""
    model_factory.init_weights(module, seed, std=std, emb_std=clip_std)


def build(seed: int = 0, dtype=torch.float32):
    """A fresh (ModelPatcher, CLIP) pair of the tiny model with deterministic random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model, clip = model_factory.build_model(classes()[1], TINY_UNET, seed, init_weights, dtype)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device()), clip


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
