"""Put a spectral shift into ComfyUI's own patch system.

:class:`SpectralShiftAdapter` is a ``comfy.weight_adapter.WeightAdapterBase`` (like LoRA,
LoHa, OFT): ``ModelPatcher.clone().add_patches({key: adapter}, strength)`` attaches it,
ComfyUI calls :meth:`calculate_weight` when it patches weights (once per load, or on every
forward in low-VRAM mode), and ``unpatch_model`` restores the base weights bit for bit.
The loaded base model is never written to by this pack.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from typing import Optional

import torch

import folder_paths
from comfy.patcher_extension import CallbacksMP, PatcherInjection
from comfy.weight_adapter.base import WeightAdapterBase

from ..svdiff.decompose import CompactFactors, Decomposition, SVDCache, effective_rank, fingerprint, num_singular_values
from ..svdiff.shift import SpectralShift, compact_residual, is_spectral_shape, spectral_residual
from ..svdiff import shiftfile
from ..svdiff.arithmetic import weighted_delta_sum
from . import comfy_compat as compat
from . import settings as pack_settings
from .common import SVDiffNodeError, check_interrupt, compute_device, log, progress

UNET_PREFIX = "diffusion_model."

# --------------------------------------------------------------------------------------
# SVD cache shared by every node and every clone: one decomposition per base weight.
# --------------------------------------------------------------------------------------
_CACHE: Optional[SVDCache] = None
_CACHE_LOCK = threading.Lock()


def svd_cache() -> SVDCache:
    """The process-wide SVD cache, of compact factors (sigma and the small square factor).

    Disk: under ComfyUI's user directory (``user/svdiff_cache``; 0.89 GB for the SD1.5 UNet,
    against 2.2 GB for float16 U and V); SVDIFF_DISK_CACHE=0 turns it off, SVDIFF_DISK_CACHE_GB
    caps it; unset, the cap is chosen per checkpoint from the free space (:func:`plan_disk_cache`).
    Memory: SVDIFF_SVD_MEMORY_MB; unset, none with a disk cache (loads stream their factors from
    disk, one layer at a time, which the OS page cache keeps in memory while there is room) and
    4096 MB without one.  See ``nodes/settings.py``.
    """
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            cfg = pack_settings.current()
            disk = os.path.join(folder_paths.get_user_directory(), "svdiff_cache") if cfg.disk_cache else None
            memory_mb = cfg.svd_memory_mb if cfg.svd_memory_mb is not None else (0.0 if disk else 4096.0)
            _CACHE = SVDCache(
                memory_limit=int(memory_mb * (1 << 20)),
                disk_dir=disk,
                disk_limit=None if cfg.disk_cache_gb is None else int(cfg.disk_cache_gb * (1 << 30)),
            )
        return _CACHE


def plan_disk_cache(patcher, rank: int = 0) -> None:
    """Let the SVD cache choose its disk cap for the checkpoint behind ``patcher`` (all its matrices).

    The same checkpoint gives the same plan, so its log line appears once however many shifts load.
    """
    try:
        label = f"{architecture_of(patcher)} ({type(patcher.model).__name__})"
    except AttributeError:
        label = "this model"
    shapes = [s for s in shiftable_shapes(patcher).values() if is_spectral_shape(s)]
    svd_cache().plan_disk(shapes, label=label, rank=rank)


_FP_MEMO: dict = {}  # id(tensor) -> (weakref to it, version counter, fingerprint)


def weight_fingerprint(t: torch.Tensor) -> str:
    """Content hash of a weight, memoised per tensor object while it is unchanged."""
    if t.is_inference():
        return fingerprint(t)  # no version counter to prove it unchanged: hash every time
    hit = _FP_MEMO.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    fp = fingerprint(t)
    key = id(t)
    try:
        ref = weakref.ref(t, lambda _r, key=key: _FP_MEMO.pop(key, None))
    except TypeError:
        return fp
    _FP_MEMO[key] = (ref, t._version, fp)
    return fp


# --------------------------------------------------------------------------------------
# Residual cache for low-VRAM mode, where calculate_weight runs on every forward pass.
# --------------------------------------------------------------------------------------
class _ResidualBudget:
    def __init__(self):
        self.lock = threading.Lock()
        self.used = 0

    @property
    def limit(self) -> int:
        return int(pack_settings.current().residual_cache_mb * (1 << 20))

    def take(self, n: int) -> bool:
        with self.lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.used = max(0, self.used - n)


RESIDUAL_BUDGET = _ResidualBudget()


class _ResidualCache:
    """Per-adapter store of the last residual: (device, dtype, strength) -> tensor.

    Used only while ComfyUI patches the adapter's weight on every forward pass (its source's
    ``cache_residuals``, set at load by :func:`merge_shifted_lowvram_weights`): filled on the
    second identical request, within a global byte budget (SVDIFF_RESIDUAL_CACHE_MB).  Loads and
    reloads that patch a weight once leave it empty.
    """

    def __init__(self):
        self.entries: dict = {}
        self.seen: set = set()
        self.bytes = 0
        self._fin = weakref.finalize(self, RESIDUAL_BUDGET.give, 0)

    def get(self, key):
        return self.entries.get(key)

    def _rearm(self) -> None:
        """Give back ``self.bytes`` of the budget when this cache is collected."""
        self._fin.detach()
        self._fin = weakref.finalize(self, RESIDUAL_BUDGET.give, self.bytes)

    def clear(self) -> None:
        RESIDUAL_BUDGET.give(self.bytes)
        self.entries, self.seen, self.bytes = {}, set(), 0
        self._rearm()

    def offer(self, key, value: torch.Tensor) -> None:
        if key not in self.seen:
            self.seen.add(key)
            return
        n = value.numel() * value.element_size()
        if RESIDUAL_BUDGET.take(n):
            self.entries[key] = value
            self.bytes += n
            self._rearm()


class _BaseView:
    """What ``comfy_compat.dense_weight`` reads of a patcher (its model, ``backup`` and
    ``hook_backup``), with the model held weakly: an adapter must not keep a model alive.
    Clones share these dictionaries with the patcher they come from (both versions)."""

    def __init__(self, patcher):
        self._model = weakref.ref(patcher.model)
        self.backup = getattr(patcher, "backup", {})
        self.hook_backup = getattr(patcher, "hook_backup", {})

    def __deepcopy__(self, memo):
        return self  # a view of the shared base model: copies of a patch list refer to the same one

    @property
    def model(self):
        m = self._model()
        if m is None:
            raise RuntimeError("svdiff: the model this spectral shift was loaded on no longer exists")
        return m


class FactorSource:
    """Where one adapter finds the decomposition of its base weight when ComfyUI patches it.

    Streamed (the default): nothing is held; each patch asks the SVD cache (memory, then disk,
    then recomputed from the base weight) for the compact factors, forms the residual through
    the base weight (:func:`compact_residual`) and drops them, so a load holds the factors of
    one layer at a time.  ``kept``: factors the cache could not keep (no disk cache), held here.
    """

    def __init__(self, view: Optional[_BaseView], key: str, fp: str, shape: tuple, request: int,
                 kept: Optional[CompactFactors] = None):
        self.view = view
        self.key = key
        self.fp = fp
        self.shape = tuple(shape)
        self.request = int(request)  # the rank asked of the cache (the length of the shift's delta)
        self.kept = kept
        self.cache_residuals = False  # set while ComfyUI patches this weight on every forward

    @property
    def rank(self) -> int:
        """Number of singular triplets this source gives."""
        return effective_rank(self.shape, self.request) or num_singular_values(self.shape)

    def factors(self, base: torch.Tensor, device) -> CompactFactors:
        if self.kept is not None:
            return self.kept
        return svd_cache().compact(base, device=device, fp=self.fp, rank=self.request)

    def residual(self, delta: torch.Tensor, strength: float, device) -> torch.Tensor:
        base = compat.dense_weight(self.view, self.key)
        return compact_residual(self.factors(base, device), delta, strength, base, device=device)


class HeldDecomposition:
    """A source that holds a full :class:`Decomposition` (U, S, Vh): for callers that already
    have one (tests, tools); loads from files use :class:`FactorSource`."""

    def __init__(self, dec: Decomposition):
        self.dec = dec
        self.cache_residuals = False

    @property
    def rank(self) -> int:
        return self.dec.rank

    def residual(self, delta: torch.Tensor, strength: float, device) -> torch.Tensor:
        return spectral_residual(self.dec, delta, strength, device=device)


class SpectralShiftAdapter(WeightAdapterBase):
    """One weight's spectral shift as a ComfyUI weight adapter.

    Matrices (2-D, 4-D): W + U diag(ReLU(sigma + s*delta) - sigma) V^T (Eq. 2, residual form);
    1-D weights: w + s*delta.  ``strength`` (the patch strength) is the s of appendix E.3:
    it scales delta inside the ReLU.  The adapter holds delta and where its factors come from
    (a :class:`FactorSource`), not the factors themselves.
    """

    name = "svdiff"

    def __init__(self, loaded_keys, weights):
        # ComfyUI's adapter convention, (loaded_keys, weights): 0.33 rebuilds adapters as
        # type(a)(a.loaded_keys, prefetched(a.weights)) when it prepares low-VRAM patches for a
        # device; the delta tensor moves, the factor source and the shape pass through.
        delta, source, shape = weights
        self.loaded_keys = set(loaded_keys or ())
        self.delta = delta.detach().float()
        self.source = source
        self.shape = tuple(shape)
        self.weights = (self.delta, source, self.shape)
        self._cache = _ResidualCache()

    @classmethod
    def build(cls, delta: torch.Tensor, source, shape: tuple) -> "SpectralShiftAdapter":
        """The adapter of one weight: its delta (kept on the CPU), the source of its base weight's
        factors (a :class:`FactorSource`, a :class:`Decomposition`, or None for 1-D weights) and shape."""
        if isinstance(source, Decomposition):
            source = HeldDecomposition(source)
        return cls(set(), (delta.detach().float().cpu(), source, tuple(shape)))

    @classmethod
    def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None, *args, **kwargs):
        return None  # spectral shifts are not LoRA files; ComfyUI's LoRA loader never builds us

    def residual(self, strength: float, device, dtype) -> torch.Tensor:
        key = (str(device), dtype, float(strength))
        hit = self._cache.get(key)
        if hit is not None:
            return hit.to(device, non_blocking=True)
        if self.source is None:
            res = (strength * self.delta).to(device=device)
        else:
            res = self.source.residual(self.delta, strength, device)
        res = res.to(dtype)
        if self.source is not None and self.source.cache_residuals:
            self._cache.offer(key, res.to("cpu") if res.device.type != "cpu" else res)
        return res

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weights=None, *args, **kwargs):
        # *args/**kwargs: other packs and newer ComfyUI pass further arguments; none change the math.
        if offset is not None:
            log.warning("svdiff: a spectral shift cannot be applied to a slice of %s; skipped", key)
            return weight
        # strength_model: comfy.lora.calculate_weight has already scaled the weight by it (both
        # versions) before handing it to an adapter; scaling again would square it.
        if tuple(weight.shape) != self.shape:
            log.warning("svdiff: %s has shape %s, the shift expects %s; skipped", key, tuple(weight.shape), self.shape)
            return weight
        # The residual is kept in the weight's own dtype (what the patched weight is stored in
        # anyway): half the memory of float32 in the low-VRAM cache for fp16/bf16 models.  The
        # sum is still formed in float32; delta = 0 gives a zero residual, so W exactly.
        res = self.residual(strength, weight.device, weight.dtype if weight.is_floating_point() else torch.float32)
        if function is not None:
            res = function(res)
        if weight.dtype == torch.float32:
            weight += res
            return weight
        out = weight.to(torch.float32) + res.to(torch.float32)
        weight.copy_(out.to(weight.dtype))
        return weight


# --------------------------------------------------------------------------------------
# Model introspection
# --------------------------------------------------------------------------------------
def base_weight(patcher, key: str) -> torch.Tensor:
    """The unpatched weight of ``key`` as the shift is computed on it: the stored tensor for
    plain dtypes, the dequantised float32 weight for scaled-fp8 and quantized layers (what
    ComfyUI's LoRA path patches; see ``comfy_compat.dense_weight``)."""
    return compat.dense_weight(patcher, key)


def shiftable_shapes(patcher, prefix: Optional[str] = None) -> dict:
    """key -> shape for every weight a spectral shift can patch (>=2-D kernels, 1-D scales; the
    RMS norm scales that ComfyUI 0.3.75's Flux names ``.scale`` included), quantized layers
    with their logical shape."""
    out = {}
    for k, v in patcher.model.state_dict().items():
        if prefix and not k.startswith(prefix):
            continue
        if v.ndim == 0 or not (k.endswith(".weight") or (k.endswith(".scale") and v.ndim == 1)):
            continue
        v = compat.stored_weight(patcher.model, k, v)
        if not v.is_floating_point():
            continue
        out[k] = tuple(v.shape)
    return out


# --------------------------------------------------------------------------------------
# 1-D shifts of norm layers in reduced precision
# --------------------------------------------------------------------------------------
NORM_FP32_KEY = "svdiff_norm_fp32"
_MIXED_NORM: dict = {}


def _norm_kind(module) -> Optional[str]:
    if isinstance(module, torch.nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, torch.nn.LayerNorm):
        return "layernorm"
    return None


def mixed_norm_supported(kind: str, device, dtype: torch.dtype) -> bool:
    """Whether the ``kind`` norm kernel on ``device`` takes a ``dtype`` input with a float32
    weight and bias and gives what float32 arithmetic gives (probed once per device type and
    dtype: the CPU kernels do since torch 2.1; some backends reject or misread it)."""
    if dtype == torch.float32:
        return True
    device = torch.device(device)
    key = (kind, device.type, dtype)
    if key not in _MIXED_NORM:
        _MIXED_NORM[key] = _probe_mixed_norm(kind, device, dtype)
        if not _MIXED_NORM[key]:
            log.warning("svdiff: %s on %s does not take a float32 weight with %s input; 1-D shifts of such norms "
                        "are rounded to %s there", kind, device.type, dtype, dtype)
    return _MIXED_NORM[key]


def _probe_mixed_norm(kind: str, device, dtype) -> bool:
    x32 = (torch.arange(16, dtype=torch.float32).reshape(1, 4, 2, 2) / 7.0).to(device)
    w = torch.linspace(0.5, 1.5, 4, device=device)
    b = torch.linspace(-0.1, 0.1, 4, device=device)
    try:
        with torch.no_grad():
            if kind == "groupnorm":
                y, ref = (torch.nn.functional.group_norm(x, 2, w, b, 1e-5) for x in (x32.to(dtype), x32))
            else:
                x32 = x32.reshape(4, 4)
                y, ref = (torch.nn.functional.layer_norm(x, (4,), w, b, 1e-5) for x in (x32.to(dtype), x32))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return y.dtype == dtype and bool(torch.allclose(y.float(), ref, atol=0.05))


class _FP32NormWeight:
    """A cast function (``comfy_compat.add_cast_functions``) that hands a norm its patched weight
    in float32: base + every patch on it (the 1-D shifts' w + s*delta among them), summed in
    float32 once at injection, instead of the weight rounded to the activation dtype."""

    def __init__(self, kind: str, weight32: torch.Tensor):
        self.kind = kind
        self.weight32 = weight32

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not mixed_norm_supported(self.kind, weight.device, weight.dtype):
            return weight
        if self.weight32.device != weight.device:
            self.weight32 = self.weight32.to(weight.device)
        return self.weight32


class _FP32NormBias:
    """The bias beside an :class:`_FP32NormWeight`: the mixed kernels want both in float32."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, bias: torch.Tensor) -> torch.Tensor:
        if not mixed_norm_supported(self.kind, bias.device, bias.dtype):
            return bias
        return bias.float()


class NormShiftsFP32:
    """Injection (``ModelPatcher.set_injections``) that keeps 1-D shifts of GroupNorm/LayerNorm
    weights in float32 where the model stores or computes them in less (bf16, fp16, fp8).

    ComfyUI patches a norm weight in float32 and stores it in the weight's dtype; its forward
    then casts it to the activation dtype: at the paper's 1-D learning rate, 1 + 5e-4 is 1.0 in
    bf16 (and in fp8, which UNETLoader's fp8 weight_dtype applies to norms too).  At injection (after ComfyUI has loaded and patched the weights) each such norm gets
    cast functions that pass the float32 patched weight and bias to the norm kernel, which
    takes a bf16/fp16 input with float32 affine parameters.  Ejected on unpatch.
    """

    def __init__(self):
        self.installed: list = []

    def inject(self, patcher) -> None:
        self.eject(patcher)
        for key in carried_shift_keys(patcher):
            module = _norm_module(patcher, key)
            if module is None or (module.weight.dtype == torch.float32 and compat.compute_dtype_of(patcher, module) == torch.float32):
                continue  # a float32 weight computed in float32 is patched exactly already
            w32 = compat.dense_weight(patcher, key).to(torch.float32, copy=True)
            w32 = compat.patched_weight(compat.key_patches(patcher, key), w32, key).to(torch.float32)
            fns = (_FP32NormWeight(_norm_kind(module), w32), _FP32NormBias(_norm_kind(module)))
            if compat.add_cast_functions(module, *fns):
                self.installed.append((module, fns))

    def eject(self, patcher) -> None:
        for module, fns in self.installed:
            compat.remove_cast_functions(module, *fns)
        self.installed = []

    def patcher_injection(self) -> PatcherInjection:
        return PatcherInjection(inject=self.inject, eject=self.eject)


def _norm_module(patcher, key: str):
    """The GroupNorm/LayerNorm whose 1-D ``weight`` is ``key``, or None."""
    if not key.endswith(".weight"):
        return None
    try:
        module = patcher.get_model_object(key[: -len(".weight")])
    except AttributeError:
        return None
    return module if _norm_kind(module) is not None else None


def keep_norm_shifts_fp32(patcher) -> None:
    """Give ``patcher`` the :class:`NormShiftsFP32` injection (once)."""
    if not patcher.get_injections(NORM_FP32_KEY):
        patcher.set_injections(NORM_FP32_KEY, [NormShiftsFP32().patcher_injection()])


def architecture_of(model) -> str:
    try:
        return type(model.model.model_config).__name__
    except AttributeError:
        return "unknown"


def combined_fingerprint(fps: dict) -> str:
    h = hashlib.blake2b(digest_size=12)
    for k in sorted(fps):
        h.update(k.encode())
        h.update(fps[k].encode())
    return h.hexdigest()


def build_adapters(patcher, shift: SpectralShift, keys, node: str, device=None):
    """Adapters for ``keys`` of ``shift`` on ``patcher``, decomposing base weights as needed.

    Returns (patches dict, fingerprints dict).  Shows a progress bar and honours interrupts
    while decomposing; nothing is attached to any model here.
    """
    keys = list(keys)
    cache = svd_cache()
    device = device or compute_device()
    plan_disk_cache(patcher)
    view = _BaseView(patcher)
    pbar = progress(max(1, len(keys)))
    patches, fps = {}, {}
    for k in keys:
        check_interrupt()
        w = base_weight(patcher, k)
        shape = tuple(shift.shapes[k])
        if tuple(w.shape) != shape:
            raise SVDiffNodeError(node, f"weight {k!r} is {list(w.shape)} in the model but {list(shape)} in the shift")
        fp = weight_fingerprint(w)
        fps[k] = fp
        source = None
        if is_spectral_shape(shape):
            # decomposed now (or found in the cache), one layer at a time, and not held: ComfyUI's
            # patching fetches the factors again per layer.  A rank-r shift (appendix E.1) needs
            # only the top r triplets: a truncated decomposition.
            r = int(shift.deltas[k].shape[0])
            kept = cache.ensure(w, device=device, fp=fp, rank=r)
            source = FactorSource(view, k, fp, shape, r, kept)
        patches[k] = SpectralShiftAdapter.build(shift.deltas[k], source, shape)
        pbar.update(1)
    return patches, fps


LOWVRAM_MERGE_KEY = "svdiff_lowvram_merge"


def merge_shifted_lowvram_weights(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> int:
    """ON_LOAD callback: patch spectrally shifted weights of low-VRAM modules once, at load.

    In low-VRAM mode ComfyUI leaves the weights of modules that do not fit on their offload
    device and recomputes their patches on every forward pass (``LowVramPatch``).  A full-rank
    spectral shift makes that a weight-sized addition per step.  Instead, exactly as ComfyUI
    itself does when asked to ``force_patch_weights``, the patched weight is computed once where
    the weight lives (``patch_weight_to_device``: the original is kept in the patcher's backup
    and restored by ``unpatch_model``; nothing is written into the base tensor) and streamed
    like any weight.  SVDIFF_LOWVRAM_MERGE=0 keeps ComfyUI's per-forward path.
    Where patches stay per forward (SVDIFF_LOWVRAM_MERGE=0, or 0.33's dynamic VRAM), the
    adapters keep their residuals (:class:`_ResidualCache`); after any other load they keep none.
    Returns the number of weights merged.
    """
    once = full_load or force_patch_weights
    merge = pack_settings.current().lowvram_merge and not compat.is_dynamic(patcher)
    _cache_residuals(patcher, not once and not merge)
    if once or not merge:
        return 0  # dynamic VRAM (0.33) streams and patches weights itself; there is no LowVramPatch to merge
    merged = 0
    for name, m in patcher.model.named_modules():
        if not getattr(m, "weight_function", None):
            continue
        key = f"{name}.weight"
        if any(isinstance(p[1], SpectralShiftAdapter) for p in compat.key_patches(patcher, key)):
            merged += compat.merge_lowvram_weight(patcher, m, key)
    return merged


def _cache_residuals(patcher, on: bool) -> None:
    """Switch the residual cache of ``patcher``'s spectral-shift adapters on or off (off empties it)."""
    for lst in compat.all_key_patches(patcher).values():
        for p in lst:
            a = p[1]
            if isinstance(a, SpectralShiftAdapter) and a.source is not None:
                a.source.cache_residuals = on
                if not on:
                    a._cache.clear()


def patch_with_shift(patcher, shift: SpectralShift, strength: float, node: str, source: str, prefix: Optional[str] = None,
                     compose: bool = True):
    """A clone of ``patcher`` with ``shift`` attached (never the patcher itself).

    Validates the shift against the model's weights first (refusing other architectures,
    naming the first mismatching key) and decomposes before touching anything, so a failure
    leaves nothing half patched.  With ``compose`` a shift the patcher already carries is
    composed with this one as Eq. 4; without, the two stack (what SVDiff Train learnt on).
    Returns (clone, report dict).
    """
    model_shapes = shiftable_shapes(patcher, prefix)
    part = {k: s for k, s in shift.shapes.items() if (prefix is None or k.startswith(prefix))}
    sub = SpectralShift({k: shift.deltas[k] for k in part}, part, shift.metadata)
    try:
        matched = shiftfile.check_compatible(sub, model_shapes, source)
    except shiftfile.ShiftFileError as e:
        raise SVDiffNodeError(node, str(e)) from None
    report = {"matched": len(matched), "total": len(part), "warnings": []}
    if len(matched) < len(part):
        msg = f"{len(part) - len(matched)} of {len(part)} keys of {source} are not in the model and were skipped"
        report["warnings"].append(msg)
        log.warning("[%s] %s", node, msg)
    if strength == 0 or not matched:
        return patcher.clone(), report
    patches, fps = build_adapters(patcher, sub, matched, node)
    # UNet parts are checked against base_fingerprint, text-encoder parts against clip_fingerprint
    want = shift.metadata.get("base_fingerprint" if prefix == UNET_PREFIX else "clip_fingerprint")
    if want and want != combined_fingerprint(fps):
        msg = f"{source} was trained on other base weights of the same architecture; it is applied anyway"
        report["warnings"].append(msg)
        log.warning("[%s] %s", node, msg)
    clone = patcher.clone()
    plain, composed, blocked = compose_with_carried_shifts(clone, patches, strength) if compose else (patches, {}, [])
    added = clone.add_patches(plain, strength) + (clone.add_patches(composed, 1.0) if composed else [])
    if not compat.has_callback(clone, CallbacksMP.ON_LOAD, LOWVRAM_MERGE_KEY):
        clone.add_callback_with_key(CallbacksMP.ON_LOAD, LOWVRAM_MERGE_KEY, merge_shifted_lowvram_weights)
    if any(not is_spectral_shape(shift.shapes[k]) for k in matched):
        keep_norm_shifts_fp32(clone)
    if len(added) != len(patches):
        raise SVDiffNodeError(node, f"ComfyUI accepted only {len(added)} of {len(patches)} patches")
    report["composed"] = len(composed)
    if composed:
        msg = (f"the model already carried a spectral shift on {len(composed)} of these weights: composed as Eq. 4, "
               f"ReLU(sigma + s1*delta1 + s2*delta2), one ReLU over the summed shifts")
        report["warnings"].append(msg)
        log.info("[%s] %s", node, msg)
    if blocked:
        msg = (f"{len(blocked)} weights already carry a spectral shift that cannot be composed here (patched with a "
               f"model strength, an offset or a function); they stack as W + R1 + R2 instead of Eq. 4's "
               f"ReLU(sigma + delta1 + delta2): merge the shifts first with Combine/Scale Shifts")
        report["warnings"].append(msg)
        log.warning("[%s] %s", node, msg)
    report["fingerprint"] = combined_fingerprint(fps)
    return clone, report


def carried_shift_patches(patcher, key: str) -> list:
    """The spectral-shift patches a MODEL/CLIP patcher already carries on ``key``."""
    return [p for p in compat.key_patches(patcher, key) if isinstance(p[1], SpectralShiftAdapter)]


def carried_shift_keys(patcher) -> list:
    """Keys on which ``patcher`` already carries a spectral shift."""
    return [k for k, lst in compat.all_key_patches(patcher).items() if any(isinstance(p[1], SpectralShiftAdapter) for p in lst)]


def compose_with_carried_shifts(clone, patches: dict, strength: float) -> tuple:
    """Eq. 4 for a shift applied on a MODEL that already carries one.

    ComfyUI adds patches: two adapters on one weight would give W + R1 + R2, with a ReLU per
    shift.  Where ``clone`` already carries spectral shifts on a key (added with a model
    strength of 1, no offset, no function: how this pack adds them), they are taken off and
    replaced with one adapter of delta = sum_i s_i delta_i (their patch strengths s_i and
    ``strength`` for the new one), applied with strength 1: ReLU(sigma + sum_i s_i delta_i).
    Both shifts are of the same base weight (each adapter decomposes the unpatched weight).

    Returns (patches to add with ``strength``, composed patches to add with 1.0, keys that
    carry a shift that cannot be composed).
    """
    plain, composed, blocked = {}, {}, []
    for k, ad in patches.items():
        prev = carried_shift_patches(clone, k)
        if not prev:
            plain[k] = ad
            continue
        if any(p[2] != 1.0 or p[3] is not None or p[4] is not None for p in prev):
            blocked.append(k)
            plain[k] = ad
            continue
        compat.remove_key_patches(clone, k, lambda p: isinstance(p[1], SpectralShiftAdapter))
        delta = weighted_delta_sum([p[1].delta for p in prev] + [ad.delta], [p[0] for p in prev] + [strength])
        # rank-limited shifts carry truncated decompositions: the longest one covers the summed delta
        sources = [a.source for a in [p[1] for p in prev] + [ad] if a.source is not None]
        source = max(sources, key=lambda src: src.rank, default=ad.source)
        composed[k] = SpectralShiftAdapter.build(delta, source, ad.shape)
    return plain, composed, blocked


def model_fingerprint(patcher, keys) -> str:
    return combined_fingerprint({k: weight_fingerprint(base_weight(patcher, k)) for k in keys})
