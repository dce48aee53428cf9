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

import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "toyworld.safetensors")
CHECKPOINT_NAME = "toyworld.safetensors"

CONTEXT_DIM = 64
MODEL_CHANNELS = 32

TOY_CLIP = {
    "hidden_size": CONTEXT_DIM,
    "intermediate_size": 2 * CONTEXT_DIM,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": CONTEXT_DIM,
}

TOY_UNET = dict(
    image_size=8,
    use_spatial_transformer=True,
    legacy=False,
    use_checkpoint=False,
    in_channels=4,
    out_channels=4,
    model_channels=MODEL_CHANNELS,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=CONTEXT_DIM,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)

# What matches() checks in the UNet configuration that ComfyUI detects from the weights.
MATCH_KEYS = ("context_dim", "model_channels", "num_res_blocks", "channel_mult", "transformer_depth",
              "in_channels", "use_linear_in_transformer", "adm_in_channels", "use_temporal_attention")

_CLASSES: dict = {}


def classes():
    """(ToyWorldClip, ToyWorldSD), created on first use so importing needs no ComfyUI."""
    if _CLASSES:
        return _CLASSES["clip"], _CLASSES["sd"]
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    class ToyWorldClip(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": TOY_CLIP}, **kw)

    class ToyWorldSD(comfy.supported_models.SD15):
        """SD1 behaviour (latent format, EPS, CLIP key names) for the toy configuration only."""

        unet_config = {k: TOY_UNET[k] for k in MATCH_KEYS}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}
        required_keys = {"first_stage_model.taesd_decoder.1.weight"}

        @classmethod
        def matches(cls, unet_config, state_dict=None, **kwargs):
            # ComfyUI 0.33 also passes unet_key_prefix=...; 0.3.75 does not.  Neither matters here.
            for k, v in cls.unet_config.items():
                got = unet_config.get(k, "missing")
                if isinstance(v, list):
                    if not isinstance(got, (list, tuple)) or list(got) != v:
                        return False
                elif got != v:
                    return False
            if state_dict is not None:
                # The checkpoint loader passes the full state dict: insist on our TAESD VAE.
                if not any(k.endswith("taesd_decoder.1.weight") for k in state_dict):
                    return False
            return True

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, ToyWorldClip)

    _CLASSES.update(clip=ToyWorldClip, sd=ToyWorldSD)
    return ToyWorldClip, ToyWorldSD


def register() -> None:
    """Let ComfyUI's checkpoint loader detect the toy model (demo/test harness only)."""
    import comfy.supported_models

    _, sd = classes()
    if sd not in comfy.supported_models.models:
        comfy.supported_models.models.insert(0, sd)


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


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02, emb_std: float = 0.3, gain: float = 1.0) -> None:
    """ComfyUI's ops skip weight initialisation: fill every parameter deterministically.

    Matrices get ``max(std, gain/sqrt(fan_in))``; embeddings a larger ``emb_std`` (a random
    CLIP with small embeddings carries prompt information only at the word positions).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 0:
            continue
        if p.ndim == 1:
            if name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        elif "embedding" in name:
            p.copy_(torch.randn(p.shape, generator=g) * emb_std)
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * max(std, gain / fan_in**0.5))


def build(seed: int = 0, dtype=torch.float32):
    """A fresh (model_base.BaseModel, comfy.sd.CLIP, TAESD) with deterministic random weights."""
    import comfy.sd
    import comfy.taesd.taesd

    _, sd_cls = classes()
    cfg = sd_cls(dict(TOY_UNET))
    cfg.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        model = cfg.get_model({})
        init_weights(model.diffusion_model, seed)
        # zero the last layer of each residual branch and the output: a stable start
        with torch.no_grad():
            for n, m in model.diffusion_model.named_modules():
                if n.endswith("out_layers.3") or n == "out.2" or n.endswith("proj_out"):
                    m.weight.zero_()
    clip = comfy.sd.CLIP(cfg.clip_target(), model_options={"dtype": torch.float32})
    with torch.inference_mode(False):
        init_weights(clip.cond_stage_model, seed + 1)
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
