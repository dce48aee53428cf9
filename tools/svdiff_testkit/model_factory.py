"""Small SD1-style models in ComfyUI's own classes: the tiny test model and the toy world's.

A model type is an ``SD15`` subclass (SD1 latent format, EPS prediction, CLIP key names) with
a small UNet configuration, paired with an ``SD1ClipModel`` subclass shrunk through
``model_options`` (the real SD1 tokenizer).  :func:`register` puts the ``SD15`` subclass first
in ``comfy.supported_models.models`` so that ``CheckpointLoaderSimple`` recognises its
checkpoints (harness and demo only; the pack never does).  :func:`init_weights` fills the
parameters deterministically, since ComfyUI's ops skip weight initialisation.

Importing this module needs no ComfyUI.
"""

from __future__ import annotations

import torch

TWO_HEADS = {"num_heads": 2, "num_head_channels": -1}  # attention heads of both small UNets


def small_clip_config(width: int) -> dict:
    """A CLIP-L text model shrunk to 2 layers of ``width`` (2 heads, MLP 2x wide)."""
    return {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "projection_dim": width,
    }


def small_unet_config(context_dim: int, image_size: int, model_channels: int = 32) -> dict:
    """An SD1-style UNet of 2 levels (``model_channels``, twice that), one ResBlock per level,
    cross-attention at both levels and in the middle block (one transformer block each)."""
    return dict(
        image_size=image_size,
        use_spatial_transformer=True,
        legacy=False,
        use_checkpoint=False,
        in_channels=4,
        out_channels=4,
        model_channels=model_channels,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=context_dim,
        use_linear_in_transformer=False,
        adm_in_channels=None,
        use_temporal_resblock=False,
        use_temporal_attention=False,
    )


def make_model_classes(name: str, clip_config: dict, unet_config: dict, unet_extra_config: dict = TWO_HEADS,
                       match_keys=None, required_vae_key: str | None = None, doc: str | None = None):
    """A new ``({name}Clip, {name}SD)`` pair (class names matter: a shift records its architecture
    as the model configuration's class name).

    ``clip_config``: the CLIP-L text model's configuration (``clip_l_model_config``), e.g.
    :func:`small_clip_config`.
    ``unet_config``: without ``match_keys``, what ComfyUI's own ``matches()`` compares with the
    configuration it detects from a checkpoint.  With ``match_keys``, the full UNet configuration
    (e.g. :func:`small_unet_config`) of which only those keys are compared, by an own
    ``matches()`` that reads lists and tuples alike and takes any further keyword ComfyUI
    passes (0.33 adds ``unet_key_prefix=``).
    ``unet_extra_config``: set on top of the detected configuration (attention heads).
    ``required_vae_key``: a VAE weight below ``first_stage_model.`` that a checkpoint must have
    (own ``matches()``: any key ending in it).
    """
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    class Clip(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            model_options = {**model_options, "clip_l_model_config": clip_config}
            super().__init__(device=device, dtype=dtype, model_options=model_options, **kw)

    class SD(comfy.supported_models.SD15):
        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, Clip)

    SD.__doc__ = doc
    SD.unet_extra_config = dict(unet_extra_config)
    if match_keys is None:
        SD.unet_config = dict(unet_config)
    else:
        SD.unet_config = {k: unet_config[k] for k in match_keys}
        SD.matches = classmethod(_matches_exactly)
    if required_vae_key is not None:
        SD.required_keys = {"first_stage_model." + required_vae_key}
        SD.required_vae_key = required_vae_key
    for cls, suffix in ((Clip, "Clip"), (SD, "SD")):
        cls.__name__ = cls.__qualname__ = name + suffix
    return Clip, SD


def _matches_exactly(cls, unet_config, state_dict=None, **kwargs):
    """``matches()`` of a type made with ``match_keys``: every compared key equal (lists as lists)
    and, given the full state dict as the checkpoint loader passes it, the required VAE weight."""
    for k, v in cls.unet_config.items():
        got = unet_config.get(k, "missing")
        if isinstance(v, list):
            if not isinstance(got, (list, tuple)) or list(got) != v:
                return False
        elif got != v:
            return False
    vae_key = getattr(cls, "required_vae_key", None)
    if state_dict is not None and vae_key is not None:
        if not any(k.endswith(vae_key) for k in state_dict):
            return False
    return True


def build_model(sd_cls, unet_config: dict, seed: int, init_weights, dtype=torch.float32, clip_options=None):
    """A fresh (``model_base`` model, ``comfy.sd.CLIP``) of the type ``sd_cls`` with the UNet
    configuration ``unet_config``: ``init_weights(module, seed)`` fills the UNet, ``seed + 1``
    the text encoder (``clip_options``: the CLIP's ``model_options``)."""
    import comfy.sd

    cfg = sd_cls(dict(unet_config))
    cfg.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        model = cfg.get_model({})
        init_weights(model.diffusion_model, seed)
    clip = comfy.sd.CLIP(cfg.clip_target(), model_options=dict(clip_options or {}))
    with torch.inference_mode(False):
        init_weights(clip.cond_stage_model, seed + 1)
    return model, clip


def register(sd_cls) -> None:
    """Let ComfyUI's checkpoint loader detect ``sd_cls`` first (demo/test harness only)."""
    import comfy.supported_models

    if sd_cls not in comfy.supported_models.models:
        comfy.supported_models.models.insert(0, sd_cls)


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02, emb_std: float = 0.3, gain: float = 1.0,
                 bias_std: float = 0.01, scale_std: float = 0.05) -> None:
    """Fill every parameter of ``module`` from one generator seeded with ``seed``, in name order.

    Matrices and kernels get ``max(std, gain/sqrt(fan_in))``, embeddings ``emb_std``; biases
    ``N(0, bias_std)`` and other vectors (norm scales) ``1 + N(0, scale_std)``, where a std of 0
    means exactly 0 or 1 and draws nothing from the generator.  Scalars keep their value.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 0:
            continue  # e.g. CLIP's logit_scale keeps its value
        if p.ndim == 1:
            if name.endswith("bias"):
                if bias_std:
                    p.copy_(torch.randn(p.shape, generator=g) * bias_std)
                else:
                    p.zero_()
            elif scale_std:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * scale_std)
            else:
                p.fill_(1.0)
        elif "embedding" in name:
            p.copy_(torch.randn(p.shape, generator=g) * emb_std)
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * max(std, gain / fan_in**0.5))
