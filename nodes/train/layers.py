"""The trainable side of SVDiff Train: injected layer forwards and the delta parameters.

A module injection (``ModelPatcher.set_injections``) replaces the forward of every Linear /
Conv2d / GroupNorm / LayerNorm / RMS norm on the gradient path while the training clone is loaded;
ComfyUI ejects it on unpatch.  Frozen layers compute dx from the frozen weight without
copying it; trained layers add their spectral shift by the cheaper of the two routes
(``svdiff.layers.choose_route``).  No base weight is ever written, copied or given a gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.model_management as mm
from comfy.patcher_extension import PatcherInjection

from ...svdiff import layers as L
from ...svdiff.shift import delta_length, is_spectral_shape
from .. import comfy_compat as compat
from ..adapter import base_weight, mixed_norm_supported, plan_disk_cache, svd_cache, weight_fingerprint
from ..common import check_interrupt, progress


T5_PREFIX = "t5xxl."


def text_encoder_keys(shapes: dict, train_t5: bool) -> list:
    """The text-encoder weights SVDiff Train shifts: every encoder layer and the final norm of
    each CLIP, T5-XXL's only with ``train_t5`` (the training clone and the memory plan both ask)."""
    return [k for k in shapes if (".encoder." in k or "final_layer_norm" in k)
            and (train_t5 or not k.startswith(T5_PREFIX))]


def _geometry(mod) -> L.ConvGeometry:
    return L.ConvGeometry(tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation), int(mod.groups))


def _frozen(w, b) -> tuple:
    """The base weight and bias out of the autograd graph: only delta trains (a base parameter that
    still requires grad, e.g. one ComfyUI cast to fp8 outside inference mode, would otherwise
    get a dense gradient, or fail where fp8 has no addition)."""
    return (w.detach() if w is not None else None), (b.detach() if b is not None else None)


def _make_forward(mod, kind: str, layer: Optional[L.ShiftedLayer], vdelta: Optional[torch.Tensor], clone_input: bool = False):
    if kind in ("linear", "conv2d"):
        geo = _geometry(mod) if kind == "conv2d" else None

        def forward(x, *args, **kwargs):
            w, b = _frozen(*compat.layer_weight_bias(mod, x))
            if layer is not None:
                return layer.forward(x, w, b)
            return L.frozen_forward(kind, x, w, b, geo)

        return forward

    def norm_forward(x, *args, **kwargs):
        if clone_input:
            x = x.clone()  # the caller may update x in place afterwards (ComfyUI's CLIP: x += attn(ln(x)))
        # a trained 1-D shift is added to the float32 weight and the norm takes it in float32
        # (mixed-dtype kernel, or float32 arithmetic where the device has none): in bf16 a
        # step of 1e-6..1e-3 on a scale near 1 would round away
        wide = vdelta is not None and x.dtype != torch.float32
        if getattr(mod, "weight", None) is None:  # no affine scale (DiT blocks' pre-modulation norms)
            w, b = None, None
        else:
            w, b = _frozen(*compat.layer_weight_bias(mod, x, dtype=torch.float32 if wide else None))
        if w is not None:
            w = L.shifted_vector(w, vdelta)
        if b is not None and b.is_inference():
            b = b.clone()
        if wide and not mixed_norm_supported(kind, x.device, x.dtype):
            return _norm(kind, mod, x.float(), w, b).to(x.dtype)
        return _norm(kind, mod, x, w, b)

    return norm_forward


def _rms_param(mod) -> Optional[str]:
    """The name of an RMS norm's 1-D scale ("weight", or "scale" in ComfyUI 0.3.75's Flux), if
    ``mod`` is one: ComfyUI's RMSNorm classes (MMDiT q/k norms, Flux QK norms, ``comfy.ops``)
    and T5's layer norm, which is an RMS norm."""
    name = type(mod).__name__
    if not (name.endswith("RMSNorm") or name == "T5LayerNorm"):
        return None
    for p in ("weight", "scale"):
        t = getattr(mod, p, None)
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            return p
    return None


def _rms_eps(mod):
    eps = getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-6))
    return eps  # None: torch's default for the dtype (torch.nn.RMSNorm)


def _make_rms_forward(mod, pname: str, vdelta: Optional[torch.Tensor]):
    eps = _rms_eps(mod)

    def rms_forward(x, *args, **kwargs):
        x = x.clone()  # the caller may update x in place afterwards (T5: x += attn(norm(x)))
        w = getattr(mod, pname).detach().to(device=x.device)
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            w = w.float()  # fp8-stored scales (UNETLoader's fp8 weight_dtype): no arithmetic in fp8
        w = L.shifted_vector(w, vdelta)
        if vdelta is not None and x.dtype != torch.float32:
            # the trained scale in float32 arithmetic: in bf16 a small step on a scale near 1 rounds away
            return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)

    return rms_forward


def _weight_name(mod, kind: str) -> str:
    return _rms_param(mod) if kind == "rmsnorm" else "weight"


def _norm(kind: str, mod, x, w, b):
    if kind == "groupnorm":
        return F.group_norm(x, mod.num_groups, w, b, mod.eps)
    return F.layer_norm(x, mod.normalized_shape, w, b, mod.eps)


def _kind(mod) -> Optional[str]:
    if _rms_param(mod) is not None:
        return "rmsnorm"
    if isinstance(mod, torch.nn.Linear):
        return "linear"
    if isinstance(mod, torch.nn.Conv2d) and getattr(mod, "padding_mode", "zeros") == "zeros":
        return "conv2d"
    if isinstance(mod, torch.nn.GroupNorm):
        return "groupnorm"
    if isinstance(mod, torch.nn.LayerNorm):
        return "layernorm"
    return None


def _checkpoint_targets(root: torch.nn.Module) -> list:
    """The outermost non-container children of ``root`` (each becomes one checkpointed segment)."""
    out = []
    for child in root.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            out.extend(_checkpoint_targets(child))
        else:
            out.append(child)
    return out


def _own_inputs(fn, *args, **kwargs):
    """``fn`` on copies of its tensor arguments: a checkpointed block keeps its inputs for the
    recomputation, and ComfyUI's DiT blocks update their input in place (Flux: x += gate * ...)."""
    def own(a):
        return a.clone() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return fn(*(own(a) for a in args), **{k: own(v) for k, v in kwargs.items()})


class TrainInjection:
    """Install / remove the training forwards on the shared modules (a PatcherInjection pair)."""

    def __init__(self, forwards: list, checkpoint_roots: list):
        self.forwards = forwards  # [(module, forward)]
        self.checkpoint_roots = checkpoint_roots
        self.saved: list = []

    def inject(self, patcher):
        if self.saved:
            return
        for mod, fwd in self.forwards:
            self.saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = fwd
        for root in self.checkpoint_roots:
            for mod in _checkpoint_targets(root):
                inner = mod.forward
                self.saved.append((mod, mod.__dict__.get("forward")))

                def ckpt(*args, _inner=inner, **kwargs):
                    # dict arguments (transformer_options) are copied: ComfyUI updates them in place
                    # as it walks the blocks ("block", "block_index"), and the recomputation in the
                    # backward pass must see the values this block was called with, not the last ones
                    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                    return torch.utils.checkpoint.checkpoint(_own_inputs, _inner, *args, use_reentrant=False, **kwargs)

                mod.forward = ckpt

    def eject(self, patcher):
        for mod, prev in reversed(self.saved):
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = prev
        self.saved = []

    def patcher_injection(self) -> PatcherInjection:
        return PatcherInjection(inject=self.inject, eject=self.eject)


# ---------------------------------------------------------------------------------------
# Trainable state
# ---------------------------------------------------------------------------------------
class Trainable:
    """delta Parameters for a set of keys of one patcher, and the injection that uses them."""

    def __init__(self, patcher, keys: list, rank: int, device, force_route: Optional[str], scope_prefix: str,
                 skip_modules=(), clone_norm_input: bool = False):
        self.patcher = patcher
        self.params: "OrderedDict[str, torch.nn.Parameter]" = OrderedDict()
        self.layers: dict = {}
        self.shapes: dict = {}
        self.fps: dict = {}
        modules = dict(patcher.model.named_modules())
        wanted = set(keys)
        cache = svd_cache()
        plan_disk_cache(patcher)
        pbar = progress(max(1, len(keys)))
        forwards = []
        for name, mod in modules.items():
            if not name.startswith(scope_prefix.rstrip(".")):
                continue
            if any(name.startswith(s) for s in skip_modules):
                continue
            kind = _kind(mod)
            pname = _weight_name(mod, kind) if kind is not None else "weight"
            if kind is None:
                continue
            if getattr(mod, pname, None) is None:
                if kind == "layernorm":
                    # a norm without scale still saves its input: ComfyUI's DiT blocks update that
                    # input in place afterwards (Flux: img += gate * attn(norm(img)))
                    forwards.append((mod, _make_forward(mod, kind, None, None, clone_input=True)))
                continue
            key = f"{name}.{pname}"
            layer, vdelta = None, None
            if key in wanted:
                check_interrupt()
                w = base_weight(patcher, key)
                shape = tuple(w.shape)
                self.shapes[key] = shape
                self.fps[key] = weight_fingerprint(w)
                if is_spectral_shape(shape):
                    # rank r > 0 (appendix E.1): the top r triplets only, by the truncated route
                    dec = cache.get(w, device=mm.get_torch_device(), fp=self.fps[key], rank=rank)
                    r = delta_length(shape, rank)
                    delta = torch.nn.Parameter(torch.zeros(r, dtype=torch.float32, device=device))
                    layer = L.ShiftedLayer(
                        delta=delta, S=dec.S[:r].to(device), U=dec.U[:, :r].contiguous().to(device),
                        Vh=dec.Vh[:r].contiguous().to(device), shape=shape,
                        kind=kind, geo=_geometry(mod) if kind == "conv2d" else None, force_route=force_route,
                    )
                    self.layers[key] = layer
                    self.params[key] = delta
                else:
                    vdelta = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
                    self.params[key] = vdelta
                pbar.update(1)
            if kind == "rmsnorm":
                forwards.append((mod, _make_rms_forward(mod, pname, vdelta)))
            else:
                forwards.append((mod, _make_forward(mod, kind, layer, vdelta, clone_norm_input)))
        self.missing = [k for k in keys if k not in self.params]
        self.injection = TrainInjection(forwards, [])

    def spectral_params(self):
        return [p for k, p in self.params.items() if k in self.layers]

    def vector_params(self):
        return [p for k, p in self.params.items() if k not in self.layers]

    def routes(self) -> dict:
        out = {}
        for layer in self.layers.values():
            out[layer.route or "unused"] = out.get(layer.route or "unused", 0) + 1
        return out

