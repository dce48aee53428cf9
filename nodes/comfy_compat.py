"""Every use of ComfyUI internals beyond its public extension points, in one place.

The pack supports ComfyUI 0.3.75 and 0.33.x.  Each function below is one touch point: what
the pack needs from ComfyUI's internals, handled for both versions by feature detection
(attributes, signatures), never by comparing version numbers.  Its docstring names the
ComfyUI change it absorbs.  ``tests/nodes/test_comfy_compat.py`` has a test per touch point that
runs on every supported version.

Public extension points (``ModelPatcher.clone/add_patches/set_injections``, callbacks,
attention patches, samplers and guiders, weight adapters, ``folder_paths`` functions,
``comfy_api.latest``) are used directly by the node modules; nothing else in ``nodes/``
reaches into ComfyUI's internals.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import NamedTuple, Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths


# --------------------------------------------------------------------------------------
# Model management
# --------------------------------------------------------------------------------------
def unload_patcher(patcher) -> bool:
    """Unload ``patcher`` if ComfyUI holds it loaded (ejecting injections, restoring weights).

    Touches ``model_management.current_loaded_models`` and ``LoadedModel.model_unload``: both
    versions keep the list and the method (0.33 adds dynamic-VRAM bookkeeping inside it), and
    ``LoadedModel.model`` is a weak reference that may already be dead.  Returns whether a
    loaded entry was found; otherwise the patcher is just detached.
    """
    loaded = mm.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        lm = loaded[i]
        if lm.model is patcher:
            loaded.pop(i)
            lm.model_unload()
            return True
    patcher.detach()
    return False


def training_clone(patcher):
    """A clone to train on: an ordinary (non-dynamic) patcher.

    0.33 loads models for dynamic VRAM (comfy-aimdo) on GPUs by default: ``is_dynamic()`` is
    True and layers cast their weights into reused buffers, which a backward pass cannot rely
    on.  Its ``clone(disable_dynamic=True)`` rebuilds an ordinary patcher on the same weights.
    0.3.75 has neither, and its plain clone is what to train on.  Works for a CLIP as well.
    """
    if is_dynamic(getattr(patcher, "patcher", patcher)):
        try:
            takes = "disable_dynamic" in inspect.signature(patcher.clone).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            return patcher.clone(disable_dynamic=True)
    return patcher.clone()


@contextlib.contextmanager
def training_mode():
    """ComfyUI's "a training step runs" flag while the block runs, restored after.

    Touches ``comfy.model_management.in_training`` (0.33; its own trainer sets it): model code
    then takes differentiable kernels, e.g. Flux's RoPE, whose comfy-kitchen kernel has no
    autograd formula.  0.3.75 has no flag and always runs differentiable code.
    """
    if not hasattr(mm, "in_training"):
        yield False
        return
    prev = mm.in_training
    mm.in_training = True
    try:
        yield True
    finally:
        mm.in_training = prev


def is_loaded(patcher) -> bool:
    """Whether ComfyUI's model manager currently holds ``patcher`` loaded."""
    return any(lm.model is patcher for lm in mm.current_loaded_models)


# --------------------------------------------------------------------------------------
# ModelPatcher state
# --------------------------------------------------------------------------------------
def base_weight(patcher, key: str) -> torch.Tensor:
    """The unpatched weight of ``key``: the backup while a clone is patched, else the module's.

    Touches ``ModelPatcher.backup`` (a dict of ``(weight, inplace_update)`` named tuples in
    both versions; 0.33's dynamic-VRAM patchers may not fill it), ``hook_backup`` (tuples
    whose first item is the weight) and ``comfy.model_patcher.get_key_weight`` (same
    three-tuple in both).
    """
    bk = getattr(patcher, "backup", {}).get(key)
    if bk is not None:
        return bk.weight if hasattr(bk, "weight") else bk[0]
    hbk = getattr(patcher, "hook_backup", {}).get(key)
    if hbk is not None:
        return hbk[0]
    weight, _, _ = comfy.model_patcher.get_key_weight(patcher.model, key)
    return weight


_MATH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dense_weight(patcher, key: str) -> torch.Tensor:
    """The unpatched weight of ``key`` as ComfyUI's LoRA path computes on it: dequantised.

    ``patch_weight_to_device`` (both versions) copies the stored weight to float32 (0.33: to
    ``lora_compute_dtype``, float32 on the CPU) and applies the layer's ``convert_weight``
    (``comfy.model_patcher.get_key_weight``): 0.3.75's ``scaled_fp8_ops`` multiplies by
    ``scale_weight``; the mixed-precision ops of both versions dequantise a ``QuantizedTensor``
    (0.3.75 ``TensorCoreFP8Layout``; 0.33 also fp8 e5m2, NVFP4, MXFP8, INT8).  Plain weights of any
    math dtype (fp32/bf16/fp16), and layers whose conversion leaves the values as they are,
    come back as stored (same tensor), so their fingerprints do not change; plain fp8 weights
    (no arithmetic in fp8) come back as float32, exactly.
    """
    w = base_weight(patcher, key)
    _, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
    quantized = is_quantized(w)
    if convert is None and not quantized:
        return w if w.dtype in _MATH_DTYPES or not w.is_floating_point() else w.to(torch.float32)
    with torch.no_grad():
        dense = w.to(torch.float32, copy=True)
        if convert is not None:
            dense = convert(dense, inplace=True)
        if is_quantized(dense):
            dense = dense.dequantize()
        dense = dense.to(torch.float32)
        if not quantized and torch.equal(dense, w.to(torch.float32)):
            return w
    return dense


def stored_weight(model, key: str, stored: torch.Tensor) -> torch.Tensor:
    """The tensor that describes weight ``key`` (its logical shape and dtype) given its
    ``state_dict`` entry: that entry, unless it is the packed storage of a quantized layer.

    0.33's quantized layers write their storage into ``state_dict`` (``weight`` as uint8 /
    int8 / fp8 data, NVFP4 packed two values a byte, beside ``weight_scale`` and
    ``comfy_quant``); the module's parameter is then a ``QuantizedTensor`` with the logical
    shape.  0.3.75 puts the ``QuantizedTensor`` itself into ``state_dict``.
    """
    if stored.is_floating_point() and not is_quantized(stored):
        return stored
    try:
        return comfy.utils.get_attr(model, key)
    except AttributeError:
        return stored


def is_quantized(t) -> bool:
    """Whether ``t`` is a ``comfy.quant_ops.QuantizedTensor`` (0.3.75 ``TensorCoreFP8Layout``;
    0.33 comfy-kitchen layouts).  False where the module or the class is missing."""
    cls = _quantized_tensor_class()
    return cls is not None and isinstance(t, cls)


def _quantized_tensor_class():
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:
        return None
    return QuantizedTensor if isinstance(QuantizedTensor, type) and issubclass(QuantizedTensor, torch.Tensor) else None


def weight_format(patcher, key: str) -> str:
    """A readable name of how ``key`` is stored: the dtype (``bfloat16``, ``float8_e4m3fn``, ...),
    ``scaled float8_e4m3fn`` (0.3.75 ``scaled_fp8_ops``: a ``scale_weight`` beside the
    weight), or the quantized layout (``TensorCoreFP8Layout``, ``TensorCoreNVFP4Layout``, ...:
    0.3.75 keeps its name in ``_layout_type``, 0.33 its class in ``_layout_cls``)."""
    w = base_weight(patcher, key)
    if is_quantized(w):
        layout = getattr(w, "_layout_type", None) or getattr(w, "_layout_cls", None)
        return getattr(layout, "__name__", None) or str(layout)
    name = str(w.dtype).replace("torch.", "")
    module = comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0]) if "." in key else None
    if getattr(module, "scale_weight", None) is not None:
        return "scaled " + name
    return name


def key_patches(patcher, key: str) -> list:
    """The patch tuples ``(strength_patch, value, strength_model, offset, function)`` on ``key``.

    Touches ``ModelPatcher.patches`` (same dict of lists in both versions).
    """
    return list(patcher.patches.get(key, []))


def remove_key_patches(patcher, key: str, predicate) -> list:
    """Remove from ``patcher`` (a clone: clones copy the patch lists) the patches of ``key``
    for which ``predicate(patch_tuple)`` holds; returns them.

    Touches ``ModelPatcher.patches`` and ``patches_uuid`` (a new uuid makes ComfyUI re-patch
    on the next load, as ``add_patches`` does; both versions).
    """
    import uuid

    kept, removed = [], []
    for p in patcher.patches.get(key, []):
        (removed if predicate(p) else kept).append(p)
    if removed:
        if kept:
            patcher.patches[key] = kept
        else:
            patcher.patches.pop(key, None)
        patcher.patches_uuid = uuid.uuid4()
    return removed


def all_key_patches(patcher) -> dict:
    """``{key: [patch tuples]}`` of every patched key (``ModelPatcher.patches``)."""
    return {k: list(v) for k, v in patcher.patches.items()}


def patches_version(patcher) -> str:
    """A value that changes whenever the patcher's patches change (``patches_uuid``)."""
    return str(getattr(patcher, "patches_uuid", id(patcher.patches)))


def has_callback(patcher, call_type: str, key: str) -> bool:
    """Whether a callback was added under ``key`` (``ModelPatcher.callbacks``: a dict of dicts
    keyed by call type, then by the key given to ``add_callback_with_key``, in both versions)."""
    return key in getattr(patcher, "callbacks", {}).get(call_type, {})


def is_dynamic(patcher) -> bool:
    """Whether the patcher streams weights through dynamic VRAM (comfy-aimdo).

    0.33 adds ``ModelPatcher.is_dynamic()`` (a ``ModelPatcherDynamic`` returns True, and then
    loads, patches and unpatches weights on the fly, never through ``backup``); 0.3.75 has
    no such mode.
    """
    fn = getattr(patcher, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False


def lowvram_patches(module, key: str) -> list:
    """The ``LowVramPatch`` objects ComfyUI put in ``module.weight_function`` for ``key``.

    In both versions a module that did not fit gets ``weight_function = [LowVramPatch(key,
    patches, ...)]`` and its patches are recomputed on every forward; 0.33's ``__call__``
    applies patches prepared (prefetched) for the device instead of the patcher's list.
    """
    wf = getattr(module, "weight_function", None) or []
    cls = comfy.model_patcher.LowVramPatch
    return [f for f in wf if isinstance(f, cls) and getattr(f, "key", key) == key]


def merge_lowvram_weight(patcher, module, key: str) -> int:
    """Patch ``key`` once where its weight lives, instead of on every forward.

    What ComfyUI itself does for ``force_patch_weights``: ``patch_weight_to_device(key)``
    keeps the original in ``backup`` (restored by ``unpatch_model``) and writes the patched
    weight; the ``LowVramPatch`` wrappers are then removed and ``lowvram_patch_counter``
    lowered (0.3.75 keeps the counter on the model; 0.33 too, and reads it through a
    patcher method of the same name).  Returns how many wrappers were removed.
    """
    found = lowvram_patches(module, key)
    if not found:
        return 0
    patcher.patch_weight_to_device(key)
    for f in found:
        module.weight_function.remove(f)
    patcher.model.lowvram_patch_counter -= len(found)
    return len(found)


# --------------------------------------------------------------------------------------
# Casting layers (comfy.ops)
# --------------------------------------------------------------------------------------
def layer_weight_bias(mod, x: torch.Tensor, dtype: Optional[torch.dtype] = None):
    """A layer's weight and bias as ComfyUI's own forward would use them, without a copy when
    no cast is needed; ``dtype`` asks for them in that dtype instead of ``x``'s (float32 for a
    norm whose shift must not be rounded to a bf16/fp16 activation dtype).

    Touches ``comfy.ops.cast_bias_weight`` and the ``comfy_cast_weights`` / ``weight_function``
    / ``bias_function`` attributes of ComfyUI's layers.  0.33 adds keyword arguments
    (``compute_dtype``, ``want_requant``) and, with ``offloadable=True``, an explicit uncast;
    the default (``offloadable=False``) call, and its ``dtype`` keyword (the bias follows it),
    are the same in both.
    """
    if getattr(mod, "comfy_cast_weights", False) or getattr(mod, "weight_function", None) or getattr(mod, "bias_function", None):
        out = comfy.ops.cast_bias_weight(mod, x) if dtype is None else comfy.ops.cast_bias_weight(mod, x, dtype=dtype)
        return out[0], out[1]
    dtype = dtype or x.dtype
    w, b = mod.weight, mod.bias
    if w is not None and (w.dtype != dtype or w.device != x.device):
        w = w.to(x.device, dtype)
    if b is not None and (b.dtype != dtype or b.device != x.device):
        b = b.to(x.device, dtype)
    return w, b


def add_cast_functions(module, weight_fn=None, bias_fn=None) -> bool:
    """Run ``weight_fn`` / ``bias_fn`` on the weight / bias a ComfyUI layer casts for its forward.

    Touches the ``weight_function`` / ``bias_function`` lists of ``comfy.ops`` layers: in both
    versions ``cast_bias_weight`` (and 0.33's dynamic-VRAM cast) applies them in order after
    casting to the input dtype, and a layer with any of them takes its casting forward.  The
    lists are class attributes shared by every layer until ComfyUI assigns one (``load``
    assigns fresh lists), so they are replaced, never appended to in place.  Returns False
    for a module that is not a ComfyUI casting layer.
    """
    if not (hasattr(module, "weight_function") and hasattr(module, "bias_function")):
        return False
    if weight_fn is not None:
        module.weight_function = list(module.weight_function) + [weight_fn]
    if bias_fn is not None and getattr(module, "bias", None) is not None:
        module.bias_function = list(module.bias_function) + [bias_fn]
    return True


def remove_cast_functions(module, *fns) -> None:
    """Take the functions ``fns`` (by identity) out of a layer's ``weight_function`` /
    ``bias_function`` lists (see :func:`add_cast_functions`)."""
    for attr in ("weight_function", "bias_function"):
        lst = getattr(module, attr, None)
        if lst and any(f is g for f in lst for g in fns):
            setattr(module, attr, [f for f in lst if not any(f is g for g in fns)])


def compute_dtype_of(patcher, module) -> torch.dtype:
    """The dtype ``module`` of ``patcher`` computes in: ComfyUI casts weights to the input,
    which is the model's ``manual_cast_dtype`` when it has one, else the stored dtype.

    Touches ``BaseModel.manual_cast_dtype`` (both versions; a CLIP's patcher holds the text
    encoder, which has none: its stored dtype is its compute dtype)."""
    cast = getattr(patcher.model, "manual_cast_dtype", None)
    w = getattr(module, "weight", None)
    return cast or (w.dtype if w is not None else torch.float32)


# --------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------
def model_condition_kwargs(patcher, entry, x: torch.Tensor) -> dict:
    """``apply_model`` keyword arguments (``c_crossattn``, ``y``, ...) for one conditioning
    entry ``[tensor, options]`` at the batch size of ``x``.

    Touches ``BaseModel.extra_conds`` and ``CONDRegular.process_cond`` (same keywords in both
    versions; 0.33 adds conditioning types whose ``process_cond`` takes further keywords).
    """
    t, opts = entry
    conds = patcher.model.extra_conds(cross_attn=t, noise=x, device=x.device, **opts)
    return {k: c.process_cond(batch_size=x.shape[0], device=x.device).cond for k, c in conds.items()}


# --------------------------------------------------------------------------------------
# Cross-attention
# --------------------------------------------------------------------------------------
_ATTN_TAKES_OPTIONS: Optional[bool] = None


def default_attention(q, k, v, extra_options: dict) -> torch.Tensor:
    """ComfyUI's own optimised attention for an attn2 replacement that does not capture.

    Touches ``comfy.ldm.modules.attention.optimized_attention`` (a module global chosen at
    start-up, so it is looked up at call time) and the ``extra_options`` keys ``n_heads`` and
    ``attn_precision``; ``transformer_options`` is passed when the function accepts it (both
    versions take ``**kwargs``).
    """
    global _ATTN_TAKES_OPTIONS
    fn = comfy_attention.optimized_attention
    kw = {"attn_precision": extra_options.get("attn_precision")}
    if _ATTN_TAKES_OPTIONS is None:
        try:
            params = inspect.signature(fn).parameters
            _ATTN_TAKES_OPTIONS = "transformer_options" in params or any(
                p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            _ATTN_TAKES_OPTIONS = False
    if _ATTN_TAKES_OPTIONS:
        kw["transformer_options"] = extra_options
    return fn(q, k, v, extra_options["n_heads"], **kw)


def attention_heads(extra_options: dict) -> int:
    """Number of heads an attn2 replacement is called with (``extra_options["n_heads"]``)."""
    return int(extra_options["n_heads"])


def attention_map_size(extra_options: dict) -> Optional[tuple]:
    """(H, W) of the latent an attn2 replacement runs on, or None when not given.

    ``extra_options["activations_shape"]`` (the ``[B, C, H, W]`` of the spatial transformer's
    input) in both versions; ``original_shape`` is the fallback.
    """
    shape = extra_options.get("activations_shape")
    if shape is None:
        shape = extra_options.get("original_shape")
    if shape is not None and len(shape) == 4:
        return int(shape[-2]), int(shape[-1])
    return None


# --------------------------------------------------------------------------------------
# Joint attention of DiTs (MMDiT, Flux)
# --------------------------------------------------------------------------------------
ATTENTION_OVERRIDE = "optimized_attention_override"


class DitBlock(NamedTuple):
    """A joint-attention block of a DiT, keyed as ``patches_replace["dit"]`` replacements are."""

    name: str          # "double_block" or "single_block" (the replacement key's first part)
    index: int
    text_first: bool   # the joint sequence is [text, image] (False: [image, text])
    registers: int     # learnt tokens ahead of the text tokens (MMDiT's register_length)


def dit_joint_blocks(diffusion_model) -> list:
    """Every joint-attention block of a DiT as a :class:`DitBlock`; empty for other models.

    Touches the block lists both versions' forwards iterate when they look up
    ``transformer_options["patches_replace"]["dit"][(name, i)]``: Flux's ``double_blocks``
    ("double_block", i; [txt, img], or [img, txt] for 0.3.75's ``flipped_img_txt`` blocks) and
    ``single_blocks`` ("single_block", i; always cat(txt, img)), MMDiT's ``joint_blocks``
    ("double_block", i; cat(context, x), where context starts with ``register_length``
    learnt registers).
    """
    out = []
    joint = getattr(diffusion_model, "joint_blocks", None)
    if joint is not None:
        regs = int(getattr(diffusion_model, "register_length", 0) or 0)
        return [DitBlock("double_block", i, True, regs) for i in range(len(joint))]
    for i, blk in enumerate(getattr(diffusion_model, "double_blocks", None) or []):
        out.append(DitBlock("double_block", i, not bool(getattr(blk, "flipped_img_txt", False)), 0))
    if out:
        out += [DitBlock("single_block", i, True, 0) for i in range(len(getattr(diffusion_model, "single_blocks", None) or []))]
    return out


def dit_patch_size(diffusion_model) -> tuple:
    """(ph, pw) of a DiT's patch embedding: ``patch_size`` (an int on Flux and MMDiT in both
    versions; a tuple on MMDiT's ``PatchEmbed``)."""
    p = getattr(diffusion_model, "patch_size", 1)
    if isinstance(p, (tuple, list)):
        return int(p[-2]), int(p[-1])
    return int(p), int(p)


def attention_override_supported() -> bool:
    """Whether ``optimized_attention`` consults ``transformer_options["optimized_attention_override"]``
    (``comfy.ldm.modules.attention.wrap_attn``: in 0.3.75 and 0.33.x)."""
    return callable(getattr(comfy_attention, "wrap_attn", None))


def with_attention_override(transformer_options: dict, override) -> dict:
    """A shallow copy of ``transformer_options`` whose attention calls go to
    ``override(run, q, k, v, heads, ..., **kwargs)``, where ``run(*args, **kwargs)`` computes the
    attention as it would have been (ComfyUI's function, through an override already there).

    Touches ``wrap_attn``'s protocol: it calls ``override(func, *args, **kwargs)`` with
    ``_inside_attn_wrapper`` set in ``kwargs`` (so ``func`` does not dispatch again) and, in
    0.33.x, with tensor containers already unwrapped for overrides without ``container_function``.
    """
    if not attention_override_supported():
        raise RuntimeError("this ComfyUI has no optimized_attention_override (comfy.ldm.modules.attention.wrap_attn)")
    prev = transformer_options.get(ATTENTION_OVERRIDE)

    def chained(func, *args, **kwargs):
        run = func if prev is None else functools.partial(prev, func)
        return override(run, *args, **kwargs)

    return {**transformer_options, ATTENTION_OVERRIDE: chained}


def attention_qk(args: tuple, kwargs: dict) -> tuple:
    """(q, k as [B, heads, L, d], mask or None) of an ``optimized_attention`` call.

    Flux calls it as ``(q, k, v, heads, skip_reshape=True, mask=...)`` with [B, H, L, d]
    tensors, MMDiT as ``(q, k, v, heads=...)`` with [B, L, H*d] ones (both versions).
    """
    q, k = args[0], args[1]
    heads = int(args[3]) if len(args) > 3 else int(kwargs["heads"])
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    if not kwargs.get("skip_reshape", False):
        b = q.shape[0]
        d = q.shape[-1] // heads
        q = q.reshape(b, -1, heads, d).transpose(1, 2)
        k = k.reshape(b, -1, heads, d).transpose(1, 2)
    return q, k, mask


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------
def clip_word_tokenizer(clip, key: Optional[str] = None):
    """(the Hugging Face tokenizer, the start-token id) behind a CLIP's ``key`` tokenizer.

    Touches ``SD1Tokenizer.clip`` (the attribute name of the inner ``SDTokenizer``),
    ``SDTokenizer.tokenizer`` and ``start_token``: the same in both versions.  For
    multi-encoder tokenizers (SDXL's ``clip_l``/``clip_g``) ``key`` names the part.
    Returns (None, None) when the CLIP has no such tokenizer.
    """
    tok = clip.tokenizer
    if key is not None and hasattr(tok, f"clip_{key}"):
        inner = getattr(tok, f"clip_{key}")
    else:
        name = getattr(tok, "clip", None)
        inner = getattr(tok, name, None) if isinstance(name, str) else None
    hf = getattr(inner, "tokenizer", None)
    if hf is None or not hasattr(hf, "convert_ids_to_tokens"):
        return None, None
    return hf, getattr(inner, "start_token", None)


def text_encoder_present(clip, name: str) -> bool:
    """Whether ``clip``'s model has the text encoder ``name`` ("t5xxl", "clip_l", "clip_g").

    Touches the attribute of that name on ``clip.cond_stage_model``: SD3's ``SD3ClipModel`` sets
    it to None for an encoder that is not loaded (its output then lacks that part); Flux's
    ``FluxClipModel`` always has ``clip_l`` and ``t5xxl``.  Same in both versions.
    """
    return getattr(getattr(clip, "cond_stage_model", None), name, None) is not None


def t5_piece_tokenizer(clip):
    """The Hugging Face (sentencepiece) tokenizer behind ``clip``'s T5 tokenizer, or None.

    Touches ``clip.tokenizer.t5xxl.tokenizer`` (``SD3Tokenizer`` and ``FluxTokenizer`` in both
    versions); its pieces start a word with "\u2581".
    """
    inner = getattr(getattr(clip, "tokenizer", None), "t5xxl", None)
    hf = getattr(inner, "tokenizer", None)
    return hf if hf is not None and hasattr(hf, "convert_ids_to_tokens") else None


# --------------------------------------------------------------------------------------
# Folder listings
# --------------------------------------------------------------------------------------
def register_model_folder(name: str, default_path: str, extensions: set) -> None:
    """A ``models/<name>`` folder type for ``extensions``, keeping paths users added for it in
    ``extra_model_paths.yaml``, its listing refreshed.

    Touches ``folder_paths.folder_names_and_paths`` (``{name: (paths, extensions)}`` in both
    versions).  ``add_model_folder_path`` would leave the extension set empty (any file).
    """
    paths, _exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths)
    if default_path not in paths:
        paths.append(default_path)
    folder_paths.folder_names_and_paths[name] = (paths, set(extensions))
    forget_file_list(name)


def forget_file_list(folder: str) -> None:
    """Make the next ``folder_paths.get_filename_list(folder)`` re-read the disk.

    Touches ``folder_paths.filename_list_cache`` (a module dict in both versions; the
    per-request ``cache_helper`` is only active inside a request and cleared after it).
    """
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(folder, None)


# --------------------------------------------------------------------------------------
# Model sampling
# --------------------------------------------------------------------------------------
def prediction_kind(model_sampling) -> str:
    """What the model predicts: "eps", "v", "flow", "x0" or the class name.

    Touches the classes of ``comfy.model_sampling`` (``EPS``, ``V_PREDICTION``, ``CONST``,
    ``X0``; same hierarchy in both versions).  0.33 adds ``IMG_TO_IMG_FLOW(CONST)``, whose
    model output is the result itself: a CONST subclass counts as flow matching only while it
    keeps CONST's ``calculate_denoised`` and ``noise_scaling``.
    """
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST):
        cls = type(model_sampling)
        if cls.calculate_denoised is ms.CONST.calculate_denoised and cls.noise_scaling is ms.CONST.noise_scaling:
            return "flow"
        return cls.__name__
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.X0):
        return "x0"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    return type(model_sampling).__name__


def is_flow(model_sampling) -> bool:
    """Whether the model is flow matching in ComfyUI's ``CONST`` parameterisation:
    ``x_t = (1 - t) x0 + t * noise_scale * n``, output the velocity, ``x0 = x_t - t * output``.

    :func:`prediction_kind` == "flow" (a ``CONST`` whose ``calculate_denoised`` and
    ``noise_scaling`` are ``CONST``'s own), and ``inverse_noise_scaling`` and
    ``calculate_input`` are ``CONST``'s too: SD3.x (``ModelSamplingDiscreteFlow``), Flux
    (``ModelSamplingFlux``), also with ``ModelSamplingSD3``/``ModelSamplingFlux`` shift nodes.
    0.33's ``IMG_TO_IMG_FLOW`` (output = result) is not.
    """
    const = comfy.model_sampling.CONST
    cls = type(model_sampling)
    return (prediction_kind(model_sampling) == "flow"
            and getattr(cls, "inverse_noise_scaling", None) is const.inverse_noise_scaling
            and getattr(cls, "calculate_input", None) is const.calculate_input)


def flow_noise_scale(model_sampling) -> float:
    """The factor on the unit noise in a flow model's ``noise_scaling`` (``x_1 = s * n``).

    0.33's ``CONST.noise_scaling`` multiplies the noise by ``getattr(self, "noise_scale", 1.0)``
    (``ModelSamplingDiscreteFlow.set_noise_scale``: 8 for the HiDream-O1 pixel model, 1
    otherwise); 0.3.75 has no such factor (1.0).
    """
    return float(getattr(model_sampling, "noise_scale", 1.0))


def _denoised_methods():
    ms = comfy.model_sampling
    return tuple(getattr(ms, n).calculate_denoised for n in ("EPS", "V_PREDICTION", "EDM") if hasattr(ms, n))


def is_ve_eps_or_v(model_sampling) -> bool:
    """Whether the model uses variance-exploding noise x0 + σ·n and predicts ε or v.

    Compares method identities (``calculate_denoised``, ``noise_scaling``,
    ``inverse_noise_scaling`` of ``EPS``/``V_PREDICTION``/``EDM``): a subclass that keeps
    them behaves the same, one that overrides any of them (flow, x0, LCM, ...) does not.
    """
    cls = type(model_sampling)
    eps = comfy.model_sampling.EPS
    return (getattr(cls, "calculate_denoised", None) in _denoised_methods()
            and getattr(cls, "noise_scaling", None) is eps.noise_scaling
            and getattr(cls, "inverse_noise_scaling", None) is eps.inverse_noise_scaling)


def sigma_data(model_sampling) -> float:
    """The data's standard deviation the model's noise schedule assumes (``sigma_data``).

    Touches ``model_sampling.sigma_data`` (set by ``ModelSamplingDiscrete`` and
    ``ModelSamplingContinuousEDM.set_parameters`` in both versions): 1.0 for SD1.x, SD2.x
    and SDXL, 0.5 for EDM-type models (``ModelSamplingContinuousEDM`` "edm", Playground
    v2.5).  Read by ``calculate_input`` and EDM's ``calculate_denoised``; a model_sampling
    without the attribute is taken as 1.0.
    """
    return float(getattr(model_sampling, "sigma_data", 1.0))


# --------------------------------------------------------------------------------------
# LoRA machinery
# --------------------------------------------------------------------------------------
def lora_key_maps(model, clip) -> tuple[dict, dict]:
    """(UNet, text-encoder) maps from LoRA key names to ComfyUI weight keys.

    Touches ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` (same signature in
    both versions).  Either argument may be None.
    """
    unet = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    te = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    return unet, te


def patched_weight(patches: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` with ``patches`` applied by ComfyUI's own LoRA math, in float32.

    Touches ``comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=...)``
    (same in both versions; 0.33 additionally computes GPU patches in ``lora_compute_dtype``
    inside the patcher, which does not concern a CPU float32 call).
    """
    return comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32)


def apply_lora(model, clip, lora_sd: dict, strength: float):
    """Clones of ``model`` and ``clip`` with a LoRA state dict applied as ``LoraLoader`` does.

    Touches ``comfy.sd.load_lora_for_models`` (same five arguments in both versions).
    """
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, strength, strength)


def diffusers_unet_key_map(unet_config: dict) -> dict:
    """diffusers UNet parameter names -> ComfyUI names (``comfy.utils.unet_to_diffusers``; same
    in both versions for SD1.x/SD2.x/SDXL configurations)."""
    return comfy.utils.unet_to_diffusers(unet_config)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------
def metadata_disabled() -> bool:
    """Whether ComfyUI runs with ``--disable-metadata`` (its savers then store no prompt or
    workflow).  Touches ``comfy.cli_args.args.disable_metadata`` (same flag in both versions)."""
    from comfy.cli_args import args

    return bool(getattr(args, "disable_metadata", False))


# --------------------------------------------------------------------------------------
# Node progress text
# --------------------------------------------------------------------------------------
def executing_node_id() -> Optional[str]:
    """The id of the node the executor is running now, or None outside a prompt.

    Touches ``comfy_execution.utils.get_executing_context`` (an ``ExecutionContext`` with
    ``node_id`` in both versions).
    """
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return getattr(ctx, "node_id", None) if ctx is not None else None


def progress_text(text: str, node_id: Optional[str] = None) -> bool:
    """Show ``text`` on the running node in the editor (what core nodes do with
    ``PromptServer.instance.send_progress_text``; same signature in both versions).
    Returns False when there is no server (in-process runs, tests) or no node."""
    node_id = node_id or executing_node_id()
    try:
        import server
    except ImportError:
        return False
    inst = getattr(server.PromptServer, "instance", None)
    if inst is None or node_id is None or not hasattr(inst, "send_progress_text"):
        return False
    inst.send_progress_text(text, node_id)
    return True
