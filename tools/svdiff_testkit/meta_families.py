"""Real-size checkpoints of every family, built on the meta device from ComfyUI's own classes,
and the sizes SVDiff has on them (``meta_models`` profiles activations on three of them).

No weight is allocated: ``comfy.supported_models`` classes are instantiated under
``torch.device("meta")`` with the UNet/DiT configurations ComfyUI's ``model_detection``
reports for the real checkpoints (:data:`CHECKPOINTS`; :func:`detected_config` runs ComfyUI's
detection on the built model's own key shapes, so a test can check that the configuration
written here is a fixed point of ComfyUI's detection).  Text encoders are built one at a time
(:data:`TEXT_ENCODERS`) with ComfyUI's own encoder classes.

:func:`sizes` says what SVDiff has on a set of shapes: matrices and their singular values,
1-D weights, the fp16 shift file and the U, V factors a full decomposition keeps.

Harness only: the pack never imports this.  Building needs an importable ComfyUI, :func:`sizes`
the pack's core as ``svdiff`` (tests/conftest.py aliases it).
"""

from __future__ import annotations

import dataclasses

import torch

from svdiff_testkit.meta_models import SD15, SDXL  # the UNet configurations ComfyUI detects (shared)

SD21 = {k: v for k, v in dict(SD15, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64).items()
        if k != "num_heads"}


def _mmdit(depth: int, pos_embed_max_size: int, x_block_self_attn_layers: list) -> dict:
    """What comfy.model_detection.detect_unet_config reports for an SD3.5 checkpoint: hidden
    size 64 * depth, 16 latent channels, patch 2, pooled CLIP-L+G (2048) ADM, T5's 4096-wide
    context, RMS q/k norms; SD3.5 medium adds MMDiT-X self-attention in blocks 0-12."""
    return dict(in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 64 * depth}},
                num_patches=pos_embed_max_size ** 2, pos_embed_max_size=pos_embed_max_size, qk_norm="rms",
                pos_embed_scaling_factor=None, x_block_self_attn_layers=list(x_block_self_attn_layers))


SD35_MEDIUM = _mmdit(24, 384, range(13))
SD35_LARGE = _mmdit(38, 192, [])


def flux_dev_config() -> dict:
    """Flux-dev as ComfyUI detects it (hidden 3072, 19 double and 38 single blocks, 24 heads of
    128, guidance embedding).  ComfyUI 0.33's FluxParams has a required ``txt_ids_dims`` that its
    detection sets to [] for Flux.1; 0.3.75's has no such field (feature-detected here)."""
    import comfy.ldm.flux.model as flux_model

    cfg = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
               qkv_bias=True, in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2, vec_in_dim=768,
               depth=19, depth_single_blocks=38, guidance_embed=True)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(flux_model.FluxParams)}:
        cfg["txt_ids_dims"] = []
    return cfg


#: checkpoint -> (comfy.supported_models class, diffusion-model config, its text encoders)
CHECKPOINTS = {
    "SD1.5": ("SD15", SD15, ("CLIP-L",)),
    "SD2.1": ("SD20", SD21, ("CLIP-H",)),
    "SDXL": ("SDXL", SDXL, ("CLIP-L", "CLIP-G")),
    "SD3.5 medium": ("SD3", SD35_MEDIUM, ("CLIP-L", "CLIP-G", "T5-XXL")),
    "SD3.5 large": ("SD3", SD35_LARGE, ("CLIP-L", "CLIP-G", "T5-XXL")),
    "Flux-dev": ("Flux", None, ("CLIP-L", "T5-XXL")),
}
#: text encoder -> (key prefix in ComfyUI's CLIP model, how it is built)
TEXT_ENCODERS = {
    "CLIP-L": ("clip_l.", "SD15"),
    "CLIP-H": ("clip_h.", "SD20"),
    "CLIP-G": ("clip_g.", "SDXL"),
    "T5-XXL": ("t5xxl.", "T5"),
}


def model_config(checkpoint: str):
    """(supported_models instance, config dict) of a checkpoint."""
    import comfy.supported_models as SM

    cls, cfg, _ = CHECKPOINTS[checkpoint]
    cfg = flux_dev_config() if cfg is None else cfg
    return getattr(SM, cls)(dict(cfg)), cfg


def diffusion_model(checkpoint: str):
    """ComfyUI's model (a ``model_base.BaseModel``; keys ``diffusion_model.…``) on the meta device."""
    mc, _ = model_config(checkpoint)
    with torch.device("meta"):
        return mc.get_model({})


def detected_config(model):
    """(supported_models class name, unet config) ComfyUI's detection gives the model's keys."""
    import comfy.model_detection as MD

    sd = {k[len("diffusion_model."):]: v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    cfg = MD.detect_unet_config(sd, "")
    found = MD.model_config_from_unet_config(cfg, sd)
    return (type(found).__name__ if found is not None else None), cfg


def _clip_of(family: str):
    import comfy.supported_models as SM

    if family == "T5":
        from comfy.text_encoders import sd3_clip

        return sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True, dtype_t5=torch.float16)
    return getattr(SM, family)({}).clip_target().clip


def text_encoder(name: str):
    """(ComfyUI's text-encoder module on the meta device, key prefix of ``name`` in it)."""
    prefix, family = TEXT_ENCODERS[name]
    with torch.device("meta"):
        te = _clip_of(family)(device="meta", dtype=torch.float16)
    return te, prefix


def family_text_encoder(checkpoint: str):
    """The checkpoint's whole text-encoder module (all its encoders) on the meta device."""
    import comfy.supported_models as SM
    from comfy.text_encoders import flux, sd3_clip

    cls = CHECKPOINTS[checkpoint][0]
    if cls == "SD3":
        make = sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True, dtype_t5=torch.float16)
    elif cls == "Flux":
        make = flux.flux_clip(dtype_t5=torch.float16)
    else:
        make = getattr(SM, cls)({}).clip_target().clip
    with torch.device("meta"):
        return make(device="meta", dtype=torch.float16)


def weight_shapes(module, prefix: str = "") -> dict:
    """key -> shape of every floating-point ``….weight`` under ``prefix`` (what a shift can patch)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()
            if k.startswith(prefix) and k.endswith(".weight") and v.ndim > 0 and v.is_floating_point()}


def uv_values(shape) -> int:
    """Values of U and V of a full SVD of a kernel of this shape: (m + n) * min(m, n)."""
    m = int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return (m + n) * min(m, n)


def sizes(shapes: dict, architecture: str = "") -> dict:
    """What SVDiff has on these weights: counts, values and bytes (fp16)."""
    from svdiff.decompose import num_singular_values
    from svdiff.shift import SpectralShift, delta_length
    from svdiff.shiftfile import predicted_file_size

    mats = {k: s for k, s in shapes.items() if len(s) >= 2}
    vecs = {k: s for k, s in shapes.items() if len(s) == 1}
    zero = SpectralShift({k: torch.zeros(delta_length(s)) for k, s in shapes.items()}, shapes,
                         {"architecture": architecture})
    uv = sum(uv_values(s) for s in mats.values())
    return {
        "matrices": len(mats),
        "weights": sum(int(torch.Size(s).numel()) for s in mats.values()),
        "singular_values": sum(num_singular_values(s) for s in mats.values()),
        "vectors": len(vecs),
        "vector_values": sum(int(s[0]) for s in vecs.values()),
        "shift_fp16_bytes": predicted_file_size(zero, "float16"),
        "uv_values": uv,
        "uv_fp16_bytes": 2 * uv,
    }
