"""The toy text-to-image model, built from ComfyUI's own classes.

- UNet: ComfyUI's SD1-style ``UNetModel`` (32/64 channels, one ResBlock per level,
  cross-attention at both levels and in the middle block, 2 heads), EPS prediction with
  SD1's noise schedule (``model_base.BaseModel``).
- Text encoder: ComfyUI's ``SD1ClipModel`` shrunk to 2 layers of width 64, with the real SD1
  tokenizer (49,408 tokens, 77 positions), so conditioning is ``[B, 77, 64]``.
- VAE: ComfyUI's TAESD (``comfy.taesd.taesd.TAESD``), 8x downscale: 64x64 images <-> 8x8x4
  latents; ``vae_scale``/``vae_shift`` are set so that SD1-scaled latents have unit spread.

:func:`register` puts :class:`ToyWorldSD` first in ``comfy.supported_models.models`` so that
``CheckpointLoaderSimple`` recognises ``weights/toyworld.safetensors``.  Only the demo and
the test harness call it; the pack never does.  Importing this module needs no ComfyUI.
"""

from __future__ import annotations

import functools
import os

import torch

from svdiff_testkit import model_factory

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "toyworld.safetensors")
CHECKPOINT_NAME = "toyworld.safetensors"

CONTEXT_DIM = 64
MODEL_CHANNELS = 32

TOY_CLIP = model_factory.small_clip_config(CONTEXT_DIM)
TOY_UNET = model_factory.small_unet_config(context_dim=CONTEXT_DIM, image_size=8, model_channels=MODEL_CHANNELS)

# What matches() checks in the UNet configuration that ComfyUI detects from the weights.
MATCH_KEYS = ("context_dim", "model_channels", "num_res_blocks", "channel_mult", "transformer_depth",
              "in_channels", "use_linear_in_transformer", "adm_in_channels", "use_temporal_attention")


@functools.cache
def classes():
    """(ToyWorldClip, ToyWorldSD), created on first use so importing needs no ComfyUI."""
    return model_factory.make_model_classes(
        "ToyWorld", TOY_CLIP, TOY_UNET, match_keys=MATCH_KEYS,
        required_vae_key="taesd_decoder.1.weight",  # the checkpoint loader passes the full state dict: our TAESD VAE
        doc="SD1 behaviour (latent format, EPS, CLIP key names) for the toy configuration only.")


def register() -> None:
    """Let ComfyUI's checkpoint loader detect the toy model (demo/test harness only)."""
    model_factory.register(classes()[1])


def install_checkpoint(checkpoints_dir: str) -> str:
    """Link (or copy) the committed weights into a ComfyUI ``models/checkpoints`` folder."""
    os.makedirs(checkpoints_dir, exist_ok=True)
    dst = os.path.join(checkpoints_dir, CHECKPOINT_NAME)
    if not os.path.lexists(dst):
        try:
            os.symlink(WEIGHTS, dst)
        except OSError:
            import shutil

            shutil.copyfile(WEIGHTS, dst)
    return dst


def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02, emb_std: float = 0.3, gain: float = 1.0) -> None:
    """ComfyUI's ops skip weight initialisation: fill every parameter deterministically.

    Matrices get ``max(std, gain/sqrt(fan_in))``; embeddings a larger ``emb_std`` (a random
    CLIP with small embeddings carries prompt information only at the word positions); biases
    exactly 0 and norm scales exactly 1.
    """
    model_factory.init_weights(module, seed, std=std, emb_std=emb_std, gain=gain, bias_std=0.0, scale_std=0.0)


def build(seed: int = 0, dtype=torch.float32):
    """A fresh (model_base.BaseModel, comfy.sd.CLIP, TAESD) with deterministic random weights."""
    import comfy.taesd.taesd

    model, clip = model_factory.build_model(classes()[1], TOY_UNET, seed, init_weights, dtype,
                                            clip_options={"dtype": torch.float32})
    with torch.inference_mode(False):
        # zero the last layer of each residual branch and the output: a stable start
        with torch.no_grad():
            for n, m in model.diffusion_model.named_modules():
                if n.endswith("out_layers.3") or n == "out.2" or n.endswith("proj_out"):
                    m.weight.zero_()
        vae = comfy.taesd.taesd.TAESD()
        init_weights(vae, seed + 2, std=0.0, gain=2.0**0.5)  # He init for the ReLU codec
        with torch.no_grad():
            for m in vae.modules():  # each residual Block starts as ReLU(x): a deep codec that trains
                if isinstance(m, comfy.taesd.taesd.Block):
                    m.conv[4].weight.zero_()
    return model, clip, vae


def clip_text_model(clip):
    """The trainable SDClipModel inside a ``comfy.sd.CLIP``."""
    return clip.cond_stage_model.clip_l


def state_dict_for_checkpoint(model, clip, vae, dtype=torch.float16) -> dict:
    """ComfyUI's checkpoint layout: model.diffusion_model.*, cond_stage_model.*, first_stage_model.*."""
    sd = {}
    for k, v in model.diffusion_model.state_dict().items():
        sd["model.diffusion_model." + k] = v
    for k, v in clip.cond_stage_model.state_dict().items():
        if k.startswith("clip_l.") and not k.endswith("logit_scale") and "text_projection" not in k:
            sd["cond_stage_model." + k[len("clip_l."):]] = v
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.ndim > 0:
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out
