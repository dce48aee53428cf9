"""Glue for interchange: ComfyUI's key maps and base weights in, ``svdiff.interchange`` calls.

* diffusers -> ComfyUI key maps for the SD1.x / SD2.x UNet (``comfy.utils.unet_to_diffusers``
  on the loaded model's own UNet config) and text encoder (the HF names ComfyUI keeps under
  ``clip_l.transformer.`` / ``clip_h.transformer.``);
* :func:`shift_from_foreign`: svdiff-pytorch files -> SpectralShift (used by Load Spectral Shift);
* :func:`shift_to_pytorch_layout`: the reverse (scalar projection of 1-D deltas, with warnings);
* :func:`weight_deltas_from_lora` / :func:`shift_from_weight_deltas`: any LoRA ComfyUI loads
  (through ComfyUI's own loader and ``calculate_weight``) -> nearest spectral shift;
* :func:`shift_to_lora`: spectral shift -> kohya-style LoRA dict in ComfyUI's key layout.
"""

from __future__ import annotations

import re

import torch

from ..svdiff import interchange as core
from ..svdiff import shiftfile
from ..svdiff.shift import SpectralShift, is_spectral_shape
from . import comfy_compat as compat
from .adapter import UNET_PREFIX, architecture_of, base_weight, shiftable_shapes, svd_cache
from .common import check_interrupt, compute_device, log, progress

TE_PREFIX = "text_model."
_TE_KEY = re.compile(r"^(clip_[a-z]+)\.transformer\.(text_model\..+)\.weight$")


# --------------------------------------------------------------------------------------
# key maps
# --------------------------------------------------------------------------------------
def unet_key_map(model) -> dict:
    """diffusers module name (``down_blocks.0.attentions.0.…to_k``) -> ComfyUI weight key."""
    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    out = {}
    for dk, ck in compat.diffusers_unet_key_map(cfg).items():
        if dk.endswith(".weight"):
            out[dk[: -len(".weight")]] = UNET_PREFIX + ck
    return out


def text_encoder_key_map(clip_patcher_or_sd) -> dict:
    """HF CLIPTextModel module name (``text_model.encoder.layers.0.self_attn.q_proj``) -> ComfyUI key.

    ComfyUI keeps the HF names of the SD1.x (``clip_l``) and SD2.x (``clip_h``) text
    encoders under ``<clip>.transformer.``.  With several towers the first of clip_l,
    clip_h, clip_g is used.
    """
    keys = clip_patcher_or_sd.keys() if isinstance(clip_patcher_or_sd, dict) else clip_patcher_or_sd.model.state_dict().keys()
    towers: dict = {}
    for k in keys:
        m = _TE_KEY.match(k)
        if m:
            towers.setdefault(m.group(1), {})[m.group(2)] = k
    for t in ("clip_l", "clip_h", "clip_g"):
        if t in towers:
            return towers[t]
    return next(iter(towers.values()), {})


def _patcher_of(clip):
    return clip.patcher


# --------------------------------------------------------------------------------------
# svdiff-pytorch files
# --------------------------------------------------------------------------------------
def shift_from_foreign(path: str, tensors: dict, metadata: dict, layout: str, model=None, clip=None) -> SpectralShift:
    """A shift file in another layout (svdiff-pytorch) as a SpectralShift for ``model``/``clip``.

    A UNet file needs the MODEL and a text-encoder file the CLIP (the base weights convert
    the scalar deltas of 1-D norm scales).  Keys that map to no weight are logged and kept in
    ``metadata["import_report"]``.  Raises ShiftFileError naming the file.
    """
    if layout != core.PYTORCH_LAYOUT:
        raise shiftfile.ShiftFileError(path, f"is in the {layout} layout, which this pack cannot convert")
    te = {k: v for k, v in tensors.items() if k.startswith(TE_PREFIX)}
    unet = {k: v for k, v in tensors.items() if not k.startswith(TE_PREFIX)}
    parts = []
    if unet:
        if model is None:
            raise shiftfile.ShiftFileError(path, "is an svdiff-pytorch UNet file; connect the MODEL it was trained on to convert it")
        parts.append((unet, model, unet_key_map(model), "UNet"))
    if te:
        if clip is None:
            raise shiftfile.ShiftFileError(path, "is an svdiff-pytorch text-encoder file; connect the CLIP it was trained on to convert it")
        parts.append((te, _patcher_of(clip), text_encoder_key_map(_patcher_of(clip)), "text encoder"))
    deltas, shapes, reports = {}, {}, {}
    for part, patcher, kmap, what in parts:
        model_shapes = shiftable_shapes(patcher)
        targets = {kmap[core.strip_delta(n)] for n in part if core.strip_delta(n) in kmap}
        base_1d = {k: base_weight(patcher, k) for k in targets if k in model_shapes and not is_spectral_shape(model_shapes[k])}
        try:
            sh, rep = core.shift_from_pytorch_layout(part, kmap, model_shapes, base_1d, source=what + " part")
        except core.InterchangeError as e:
            raise shiftfile.ShiftFileError(path, str(e)) from None
        if rep["unmapped"]:
            log.warning("svdiff: %d of %d keys of %s map to no %s weight (first: %s)", len(rep["unmapped"]), rep["total"], path, what, rep["unmapped"][0])
        deltas.update(sh.deltas)
        shapes.update(sh.shapes)
        reports[what] = {k: (v[:20] if isinstance(v, list) else v) for k, v in rep.items()}
    import os

    meta = {
        "architecture": architecture_of(model) if model is not None else "",
        "subset": "",
        "rank": 0,
        "description": f"converted from the {layout} layout",
        "source_file": os.path.basename(path),
        "file_dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else "",
        "import_report": reports,
        "history": [{"op": "import", "layout": layout, **{w: {"mapped": r["mapped"], "unmapped": len(r["unmapped"])} for w, r in reports.items()}}],
    }
    return SpectralShift(deltas, shapes, meta)


def shift_to_pytorch_layout(shift: SpectralShift, model=None, clip=None) -> tuple[dict, dict, dict]:
    """(UNet tensors, text-encoder tensors, report) in the svdiff-pytorch layout.

    1-D deltas are projected onto a scalar per weight (svdiff-pytorch's form); the report's
    ``projected`` gives the fraction of each 1-D delta that was lost, and a warning is logged.
    """
    out_u, out_t, report = {}, {}, {}
    unet_part = {k: v for k, v in shift.deltas.items() if k.startswith(UNET_PREFIX)}
    te_part = {k: v for k, v in shift.deltas.items() if not k.startswith(UNET_PREFIX)}
    for part, who, target, what in ((unet_part, model, out_u, "UNet"), (te_part, clip, out_t, "text encoder")):
        if not part:
            continue
        if who is None:
            raise ValueError(f"the shift has {len(part)} {what} weights; connect the {'MODEL' if what == 'UNet' else 'CLIP'} to write them")
        patcher = who if what == "UNet" else _patcher_of(who)
        kmap = unet_key_map(who) if what == "UNet" else text_encoder_key_map(patcher)
        inv = {v: k for k, v in kmap.items()}
        sub = SpectralShift(part, {k: shift.shapes[k] for k in part}, {})
        base_1d = {k: base_weight(patcher, k) for k in part if not is_spectral_shape(shift.shapes[k])}
        t, rep = core.shift_to_pytorch_layout(sub, inv, base_1d)
        target.update(t)
        report[what] = rep
        if rep["projected"]:
            log.warning("svdiff: %d 1-D %s deltas were projected onto svdiff-pytorch's scalar form (up to %.0f%% of a delta lost)",
                        len(rep["projected"]), what, 100 * rep["max_lost"])
    return out_u, out_t, report


# --------------------------------------------------------------------------------------
# LoRA / fine-tune -> spectral shift
# --------------------------------------------------------------------------------------
def _new_patches(old, new) -> dict:
    out = {}
    for k, lst in compat.all_key_patches(new).items():
        n_old = len(compat.key_patches(old, k)) if old is not None else 0
        if len(lst) > n_old:
            out[k] = lst[n_old:]
    return out


def weight_deltas_from_lora(model, clip, lora_sd: dict, strength: float = 1.0) -> tuple[list, dict]:
    """Delta W of every weight a LoRA patches, computed by ComfyUI's own loader.

    Returns ([(patcher, key, Delta W float32)], info) with info = {keys, ignored: [bias
    keys etc. a spectral shift cannot carry]}.  Any adapter ComfyUI loads (LoRA, LoCon,
    LoHa, LoKr, OFT, DoRA, full diffs) works, since its own ``calculate_weight`` is used.
    """
    new_model, new_clip = compat.apply_lora(model, clip, lora_sd, strength)
    pairs = []
    if model is not None:
        pairs.append((model, _new_patches(model, new_model)))
    if clip is not None:
        pairs.append((_patcher_of(clip), _new_patches(_patcher_of(clip), _patcher_of(new_clip))))
    out, ignored = [], []
    for patcher, patches in pairs:
        shapes = shiftable_shapes(patcher)
        for key, plist in patches.items():
            if key not in shapes:
                ignored.append(key)
                continue
            check_interrupt()
            w = base_weight(patcher, key).detach().to("cpu", torch.float32)
            w2 = compat.patched_weight(plist, w.clone(), key)
            out.append((patcher, key, (w2.float() - w)))
    return out, {"keys": len(out), "ignored": ignored}


def weight_deltas_from_models(model, finetuned) -> list:
    """Delta W = W_finetuned - W_base for every shiftable UNet weight the two models share."""
    a, b = shiftable_shapes(model), shiftable_shapes(finetuned)
    out = []
    for k, s in a.items():
        if k in b and tuple(b[k]) == tuple(s):
            check_interrupt()
            d = base_weight(finetuned, k).detach().float().cpu() - base_weight(model, k).detach().float().cpu()
            if torch.count_nonzero(d):
                out.append((model, k, d))
    return out


def shift_from_weight_deltas(items: list, architecture: str = "", source: str = "") -> tuple[SpectralShift, dict]:
    """Project each Delta W onto its base weight's singular basis (see svdiff.interchange)."""
    cache = svd_cache()
    device = compute_device()
    deltas, shapes, stats = {}, {}, {}
    pbar = progress(max(1, len(items)))
    for patcher, key, dw in items:
        check_interrupt()
        w = base_weight(patcher, key)
        shape = tuple(w.shape)
        if is_spectral_shape(shape):
            dec = cache.get(w, device=device)
            d, st = core.project_weight_delta(dec.U.float(), dec.S, dec.Vh.float(), dw)
        else:
            d, st = core.vector_delta(dw)
        deltas[key], shapes[key], stats[key] = d, shape, st
        pbar.update(1)
    total = core.summarize_projection(stats)
    meta = {"architecture": architecture, "subset": "", "rank": 0, "description": f"projected from {source}",
            "history": [{"op": "from_weight_change", "source": source, **{k: v for k, v in total.items() if k != "energy"}}]}
    return SpectralShift(deltas, shapes, meta), {"total": total, "per_key": stats}


# --------------------------------------------------------------------------------------
# spectral shift -> LoRA
# --------------------------------------------------------------------------------------
def _preferred_lora_names(key_map: dict, unet: bool) -> dict:
    """ComfyUI key -> the LoRA name to write, chosen among the names ComfyUI's loader maps to it.

    Preference: kohya names from diffusers module names (``lora_unet_down_blocks_…``,
    ``lora_te_text_model_…``, read by most tools), then ``lora_unet_<ComfyUI name>``, then
    ComfyUI's generic names (``text_encoders.<key>``).
    """
    by_key: dict = {}
    for name, key in key_map.items():
        if not isinstance(key, str):
            continue  # (key, slice) targets: diffusers names of one part of a fused weight (DiT q/k/v)
        by_key.setdefault(key, []).append(name)

    def rank(name, key):
        base = key[len(UNET_PREFIX):-len(".weight")].replace(".", "_") if unet else None
        if unet:
            if name.startswith("lora_unet_") and name != "lora_unet_" + base:
                return 0
            if name.startswith("lora_unet_"):
                return 1
            return 3
        if name.startswith("lora_te_"):
            return 0
        if name.startswith("text_encoders."):
            return 2
        return 3

    return {k: sorted(names, key=lambda n: (rank(n, k), n))[0] for k, names in by_key.items()}


def shift_to_lora(shift: SpectralShift, model=None, clip=None, rank: int = 0) -> tuple[dict, dict]:
    """A LoRA state dict equal to the shift (rank 0) or its best rank-r truncation per weight.

    Returns (state dict, report) with report = {weights, skipped: [keys], relative_error
    (Frobenius, over all weights), max_error, rank}.
    """
    unet_map, te_map = compat.lora_key_maps(model, clip)
    unet_names = _preferred_lora_names(unet_map, True) if model is not None else {}
    te_names = _preferred_lora_names(te_map, False) if clip is not None else {}
    cache = svd_cache()
    device = compute_device()
    entries, skipped, stats = {}, [], {}
    pbar = progress(max(1, len(shift)))
    for key, d in shift.deltas.items():
        check_interrupt()
        if key.startswith(UNET_PREFIX):
            patcher, name = model, unet_names.get(key)
        else:
            patcher, name = (_patcher_of(clip) if clip is not None else None), te_names.get(key)
        if patcher is None or name is None:
            skipped.append(key)
            pbar.update(1)
            continue
        w = base_weight(patcher, key)
        if tuple(w.shape) != tuple(shift.shapes[key]):
            raise ValueError(f"weight {key!r} is {list(w.shape)} in the model but {list(shift.shapes[key])} in the shift")
        if is_spectral_shape(w.shape):
            dec = cache.get(w, device=device)
            res = core.lora_factors(dec.U.float(), dec.S, dec.Vh.float(), d, w.shape, rank)
            if res is not None:
                up, down, st = res
                entries[name] = (up, down)
                stats[key] = st
        elif torch.count_nonzero(d):
            entries[name] = d.float()
            stats[key] = {"rank": 0, "full_rank": 0, "energy": float((d.double() ** 2).sum()), "error": 0.0}
        pbar.update(1)
    energy = sum(s["energy"] for s in stats.values())
    dropped = sum(s["energy"] * s["error"] ** 2 for s in stats.values())
    report = {
        "weights": len(entries),
        "skipped": skipped,
        "rank": int(rank),
        "relative_error": (dropped / energy) ** 0.5 if energy > 0 else 0.0,
        "max_error": max((s["error"] for s in stats.values()), default=0.0),
        "max_rank": max((s["rank"] for s in stats.values()), default=0),
    }
    return core.lora_state_dict(entries), report
