"""Real SD1.5 / SDXL / Flux-dev architectures on the meta device, and what autograd saves in them.

ComfyUI's own model classes are built under ``torch.device("meta")`` with the configurations
ComfyUI detects for each checkpoint family (nothing is allocated).  ``activation_profile``
runs one forward pass per setting and counts the bytes autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``): the numbers behind
``svdiff.memory_plan.PROFILES``.  Needs a booted ComfyUI (``comfy_env.boot``).
"""

from __future__ import annotations

import contextlib

import torch

COMMON = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
              in_channels=4, model_channels=320, use_temporal_attention=False, use_temporal_resblock=False)
SD15 = dict(COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SDXL = dict(COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
            use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
# comfy/model_detection.py for a Flux-dev checkpoint (img_in 3072x64, txt_in 3072x4096, vector_in 3072x768)
FLUX_DEV = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
                qkv_bias=True, in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2, vec_in_dim=768,
                depth=19, depth_single_blocks=38, guidance_embed=True)

#: family -> (ComfyUI config class, unet config, context (tokens, width), pooled width)
FAMILIES = {"SD15": ("SD15", SD15, (77, 768), None), "SDXL": ("SDXL", SDXL, (77, 2048), 2816),
            "Flux": ("Flux", FLUX_DEV, (256, 4096), 768)}


def build(family: str, dtype=torch.bfloat16):
    """ComfyUI's BaseModel of ``family`` on the meta device, weights in ``dtype``."""
    import comfy.supported_models as SM

    cls, cfgd, _, _ = FAMILIES[family]
    with torch.device("meta"):
        cfg = getattr(SM, cls)(dict(cfgd))
        cfg.set_inference_dtype(dtype, None)
        return cfg.get_model({})


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel (flash / memory-efficient) keeps: q, k, v, out, float32 lse."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def fused_attention():
    """ComfyUI's attention routed to PyTorch SDPA, counted as a fused GPU kernel keeps it."""
    import torch.nn.functional as F

    import comfy.ldm.flux.math as FM
    import comfy.ldm.modules.attention as A

    saved = (F.scaled_dot_product_attention, A.optimized_attention, FM.optimized_attention)
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FusedAttention.apply(q, k, v)
    A.optimized_attention = FM.optimized_attention = A.attention_pytorch
    try:
        yield
    finally:
        F.scaled_dot_product_attention, A.optimized_attention, FM.optimized_attention = saved


def _segments(root: torch.nn.Module) -> list:
    """The outermost non-container children (what SVDiff Train checkpoints)."""
    out = []
    for child in root.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            out.extend(_segments(child))
        else:
            out.append(child)
    return out


class SavedCounter:
    """Bytes autograd saves (each storage once, views by their base, weights excluded), in total
    and per checkpoint segment with the segments' inputs."""

    def __init__(self, exclude: list):
        self.exclude = {id(t) for t in exclude}
        self.seen: dict = {}
        self.keep: list = []  # the counted tensors stay alive so their ids stay unique
        self.segment_bytes: list = []
        self.inputs: dict = {}

    def pack(self, t):
        b = t._base if t._base is not None else t
        if id(b) not in self.exclude and id(b) not in self.seen:
            self.seen[id(b)] = b.numel() * b.element_size()
            self.keep.append(b)
        return t

    def total(self) -> int:
        return sum(self.seen.values())

    def hook_segments(self, root) -> list:
        handles = []
        for seg in _segments(root):
            state = {}

            def pre(mod, args, kwargs, _s=state):
                _s["at"] = self.total()
                for a in list(args) + list(kwargs.values()):
                    if isinstance(a, torch.Tensor) and a.requires_grad:
                        self.inputs.setdefault(id(a), (a.numel() * a.element_size(), a))

            def post(mod, args, kwargs, out, _s=state):
                self.segment_bytes.append(self.total() - _s["at"])

            handles.append(seg.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(seg.register_forward_hook(post, with_kwargs=True))
        return handles

    def checkpointed(self) -> int:
        """Kept with checkpointing: every segment's inputs, what runs outside the segments, and
        the largest segment's own activations (recomputed in the backward pass)."""
        inside = sum(self.segment_bytes)
        outside = self.total() - inside
        return sum(v[0] for v in self.inputs.values()) + outside + max(self.segment_bytes, default=0)


def _forward_args(family: str, dm, resolution: int, dtype) -> tuple:
    _, _, (tokens, width), pooled = FAMILIES[family]
    x = torch.empty(1, 16 if family == "Flux" else 4, resolution // 8, resolution // 8, device="meta", dtype=dtype,
                    requires_grad=True)
    ts = torch.empty(1, device="meta")
    ctx = torch.empty(1, tokens, width, device="meta", dtype=dtype)
    y = torch.empty(1, pooled, device="meta", dtype=dtype) if pooled else None
    if family == "Flux":
        return (x, ts, ctx, y, torch.empty(1, device="meta")), {"transformer_options": {}}
    return (x, ts, ctx, y), {"transformer_options": {}}


def saved_bytes(family: str, model, resolution: int, trained: bool, dtype=torch.bfloat16) -> tuple:
    """(bytes saved for backward, bytes kept with gradient checkpointing) of one sample."""
    dm = model.diffusion_model
    params = list(dm.parameters()) + list(dm.buffers())
    for p in dm.parameters():
        p.requires_grad_(trained)
    counter = SavedCounter(params)
    handles = counter.hook_segments(dm)
    args, kwargs = _forward_args(family, dm, resolution, dtype)
    try:
        with fused_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            dm(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counter.total(), counter.checkpointed()


def activation_profile(family: str, model=None, resolutions=(512, 1024)):
    """``svdiff.memory_plan.ActivationProfile`` of ``family`` measured on the meta device."""
    from svdiff.memory_plan import ActivationProfile, linear_fit

    model = model if model is not None else build(family)
    px = tuple(r * r for r in resolutions)
    got = {t: [saved_bytes(family, model, r, t) for r in resolutions] for t in (False, True)}
    fit = {(t, c): linear_fit(px, tuple(g[c] for g in got[t])) for t in (False, True) for c in (0, 1)}
    return ActivationProfile(frozen=fit[(False, 0)], trained=fit[(True, 0)], frozen_ckpt=fit[(False, 1)],
                             trained_ckpt=fit[(True, 1)])
