"""Arithmetic on spectral shifts: add, interpolate, scale, select layers, rank limit.

Everything here works on delta *before* any patching.  The patched singular values are
Sigma' = diag(ReLU(sigma + delta')) with one merged delta' per weight; two shifts applied as
two stacked patches would instead give ReLU(sigma + delta_1) + ReLU(sigma + delta_2) - sigma,
which differs wherever a ReLU clamps.  So every operation returns a single SpectralShift.

==============  ===========================================================================
operation       definition (per weight key k; a key missing from an input counts as 0)
==============  ===========================================================================
add             delta' = sum_i w_i delta_i                         (Eq. 4, with weights)
interpolate     delta' = alpha delta_1 + (1 - alpha) delta_2        (Eq. 5, 0 <= alpha <= 1)
                for n > 2 inputs: delta' = sum_i w_i delta_i with sum_i w_i = 1
scale           delta' = s delta         (appendix E.3; s < 0 reverses the concept)
select_layers   delta'_k = delta_A,k for keys chosen by a Table 1 subset, a style-mixing
                preset or a regex; delta_B,k for every other key (Sec. 4.4, Fig. 10)
rank_limit      keep the first r entries of each matrix's delta (the shifts of the r largest
                singular values, appendix E.1); 1-D weights are untouched
==============  ===========================================================================

Weights that do not sum to 1 in ``interpolate`` are **refused** (not normalised): a silent
renormalisation would change the strength of every concept; ``add`` is the operation for
arbitrary weights.  ``alpha`` outside [0, 1] is refused for the same reason (extrapolation
is ``add`` with weights alpha and 1 - alpha).

Shifts are refused when they belong to different architectures: when a key is present in
both with different base-weight shapes (the message names the first such key), or when
their ``architecture`` metadata differ.  Shifts over different subsets of the same
architecture combine, missing keys counting as zero.  Rank-limited inputs are padded with
zeros; the result keeps the longest stored length per key.

Each result records in ``metadata["history"]`` the operation, its parameters and a summary
of every input (its source file and its own history).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Optional, Sequence

import torch

from .shift import SpectralShift, delta_length, is_spectral_shape
from . import subsets as _subsets


class ShiftArithmeticError(ValueError):
    """An operation that cannot be done; the message says which input or key is at fault."""


def _label(i: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i] if i < 26 else f"#{i + 1}"


def _summary(shift: SpectralShift, i: int) -> dict:
    m = shift.metadata
    out = {"input": _label(i), "weights": len(shift), "values": shift.num_values()}
    for f in ("source_file", "architecture", "subset", "rank"):
        if m.get(f) not in (None, ""):
            out[f] = m[f]
    if m.get("history"):
        out["history"] = m["history"]
    return out


def check_compatible(shifts: Sequence[SpectralShift]) -> dict:
    """Refuse shifts of different architectures; return the union key -> base shape.

    A key present in two inputs with different base-weight shapes is refused, naming the
    first such key (in the order of the first input holding it).  Different non-empty
    ``architecture`` metadata are refused too.
    """
    if not shifts:
        raise ShiftArithmeticError("no spectral shift given")
    for i, s in enumerate(shifts):
        if not isinstance(s, SpectralShift):
            raise ShiftArithmeticError(f"input {_label(i)} is a {type(s).__name__}, not a spectral shift")
    shapes: dict = {}
    owner: dict = {}
    for i, s in enumerate(shifts):
        for k, shp in s.shapes.items():
            shp = tuple(shp)
            if k in shapes and shapes[k] != shp:
                raise ShiftArithmeticError(
                    f"inputs {_label(owner[k])} and {_label(i)} belong to different architectures: "
                    f"first mismatching key {k!r} is {list(shapes[k])} in {_label(owner[k])} and {list(shp)} in {_label(i)}"
                )
            if k not in shapes:
                shapes[k] = shp
                owner[k] = i
    archs = [(i, s.metadata.get("architecture") or "") for i, s in enumerate(shifts)]
    named = [(i, a) for i, a in archs if a]
    for i, a in named[1:]:
        if a != named[0][1]:
            j = named[0][0]
            common = [k for k in shifts[j].shapes if k in shifts[i].shapes]
            only = [k for k in shifts[i].shapes if k not in shifts[j].shapes]
            first = only[0] if only else (common[0] if common else "?")
            raise ShiftArithmeticError(
                f"inputs {_label(j)} ({named[0][1]}) and {_label(i)} ({a}) were made for different architectures; "
                f"first differing key {first!r}"
            )
    return shapes


def _combined_metadata(shifts: Sequence[SpectralShift], op: str, params: dict, keys: Iterable[str]) -> dict:
    arch = next((s.metadata.get("architecture") for s in shifts if s.metadata.get("architecture")), "")
    subs = []
    for s in shifts:
        sub = s.metadata.get("subset") or ""
        if sub and sub not in subs:
            subs.append(sub)
    fps = {s.metadata.get("base_fingerprint") or "" for s in shifts}
    trig = []
    for s in shifts:
        for w in str(s.metadata.get("trigger_words", "") or "").split(","):
            w = w.strip()
            if w and w not in trig:
                trig.append(w)
    hist = [{"op": op, **params, "inputs": [_summary(s, i) for i, s in enumerate(shifts)]}]
    return {
        "architecture": arch,
        "subset": "+".join(subs),
        "rank": 0,
        "base_fingerprint": fps.pop() if len(fps) == 1 else "",
        "trigger_words": ", ".join(trig),
        "description": "",
        "history": hist,
    }


def _stored_length(shifts: Sequence[SpectralShift], key: str) -> int:
    return max(int(s.deltas[key].shape[0]) for s in shifts if key in s.deltas)


def _padded(shift: SpectralShift, key: str, n: int) -> torch.Tensor:
    """delta of ``key`` as float32 of length n (zeros when absent or beyond its rank)."""
    out = torch.zeros(n, dtype=torch.float32)
    d = shift.deltas.get(key)
    if d is not None:
        m = min(n, int(d.shape[0]))
        out[:m] = d[:m].float()
    return out


def weighted_delta_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Eq. 4 for one weight: sum_i w_i delta_i in float32, on the first delta's device.

    Rank-limited deltas (appendix E.1) are shorter than the number of singular values; a
    shorter delta counts as zero beyond its length.  With the weights as the strengths s_i
    of appendix E.3, ReLU(sigma + sum_i s_i delta_i) is the composed shift.
    """
    n = max(int(d.shape[0]) for d in deltas)
    out = torch.zeros(n, dtype=torch.float32, device=deltas[0].device)
    for d, w in zip(deltas, weights):
        out[: d.shape[0]] += float(w) * d.float().to(out.device)
    return out


def _finish(deltas: dict, shapes: dict, meta: dict) -> SpectralShift:
    ranks = set()
    for k, d in deltas.items():
        if is_spectral_shape(shapes[k]):
            ranks.add(int(d.shape[0]) if d.shape[0] < delta_length(shapes[k]) else 0)
    meta["rank"] = max(ranks) if ranks and 0 not in ranks else 0
    return SpectralShift(deltas, {k: tuple(shapes[k]) for k in deltas}, meta)


def _check_weights(weights: Sequence[float], n: int, what: str) -> list:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ShiftArithmeticError(f"{what}: {len(w)} weights for {n} shifts")
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise ShiftArithmeticError(f"{what}: weight of input {_label(i)} is {x}")
    return w


def add(shifts: Sequence[SpectralShift], weights: Optional[Sequence[float]] = None, _op: str = "add", _params=None) -> SpectralShift:
    """Eq. 4 with weights: delta' = sum_i w_i delta_i per key (missing keys = 0).

    Needs two or more shifts (a single shift is ``scale``).  Default weights are all 1.
    """
    shifts = list(shifts)
    if len(shifts) < 2:
        raise ShiftArithmeticError(f"{_op} needs at least two spectral shifts, got {len(shifts)}")
    w = _check_weights(weights if weights is not None else [1.0] * len(shifts), len(shifts), "weights")
    shapes = check_compatible(shifts)
    deltas = {}
    for k in shapes:
        n = _stored_length(shifts, k)
        acc = torch.zeros(n, dtype=torch.float32)
        for s, wi in zip(shifts, w):
            if k in s.deltas and wi != 0.0:
                acc += wi * _padded(s, k, n)
        deltas[k] = acc
    params = _params if _params is not None else {"weights": w}
    return _finish(deltas, shapes, _combined_metadata(shifts, _op, params, deltas))


def interpolate(shifts: Sequence[SpectralShift], alpha: Optional[float] = None, weights: Optional[Sequence[float]] = None,
                tolerance: float = 1e-4) -> SpectralShift:
    """Eq. 5: delta' = alpha delta_1 + (1 - alpha) delta_2 (two shifts, 0 <= alpha <= 1).

    With more than two shifts, ``weights`` (one per shift) must sum to 1 (within
    ``tolerance``); they are refused otherwise, never silently normalised.
    """
    shifts = list(shifts)
    if len(shifts) < 2:
        raise ShiftArithmeticError(f"interpolate needs at least two spectral shifts, got {len(shifts)}")
    if len(shifts) == 2 and weights is None:
        if alpha is None:
            raise ShiftArithmeticError("interpolate of two shifts needs alpha")
        a = float(alpha)
        if not (0.0 <= a <= 1.0):
            raise ShiftArithmeticError(f"alpha {a} is outside [0, 1]; Eq. 5 interpolates (use add with weights to extrapolate)")
        w = [a, 1.0 - a]
        params = {"alpha": a}
    else:
        if weights is None:
            raise ShiftArithmeticError(f"interpolate of {len(shifts)} shifts needs one weight per shift, summing to 1")
        w = _check_weights(weights, len(shifts), "interpolate weights")
        total = sum(w)
        if abs(total - 1.0) > tolerance:
            raise ShiftArithmeticError(
                f"interpolate weights {w} sum to {total:g}, not 1; they are not normalised silently "
                f"(divide them by {total:g} yourself, or use add for unnormalised weights)"
            )
        if any(x < 0 for x in w):
            raise ShiftArithmeticError(f"interpolate weights {w} include a negative weight; use add to extrapolate")
        params = {"weights": w}
    return add(shifts, w, _op="interpolate", _params=params)


def scale(shift: SpectralShift, s: float) -> SpectralShift:
    """Appendix E.3: delta' = s delta (stored), so ReLU(sigma + s delta) at strength 1.

    s = 1 is the identity, s = 0 gives a zero shift, s < 0 reverses the concept.
    """
    if not isinstance(shift, SpectralShift):
        raise ShiftArithmeticError(f"scale needs a spectral shift, got {type(shift).__name__}")
    s = float(s)
    if not math.isfinite(s):
        raise ShiftArithmeticError(f"scale {s} is not a finite number")
    deltas = {k: d.float() * s for k, d in shift.deltas.items()}
    meta = _combined_metadata([shift], "scale", {"scale": s}, deltas)
    meta["subset"] = shift.metadata.get("subset", "")
    meta["training"] = shift.metadata.get("training", {})
    out = _finish(deltas, shift.shapes, meta)
    out.metadata["rank"] = shift.metadata.get("rank", out.metadata["rank"])
    return out


def layer_predicate(preset: Optional[str] = None, pattern: Optional[str] = None,
                    keys: Optional[Iterable[str]] = None) -> tuple[Callable[[str, tuple], bool], str]:
    """(predicate(key, shape), description) for a subset / style preset name or a regex.

    ``preset`` names a subset of :mod:`svdiff.subsets` (Table 1 for UNets, the DiT equivalents)
    or a style preset (:data:`svdiff.subsets.STYLE_PRESETS`); it must fit the model family and
    UNet layout that ``keys`` show.  ``pattern`` is a regular expression searched in each key.
    Both given: a key must match both.
    """
    preds, desc = [], []
    if preset:
        try:
            pred, what = _subsets.preset_predicate(preset, keys or ())
        except _subsets.SubsetError as e:
            raise ShiftArithmeticError(str(e)) from None
        preds.append(pred)
        desc.append(what)
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ShiftArithmeticError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        preds.append(lambda k, s, rx=rx: bool(rx.search(k)))
        desc.append(f"pattern {pattern!r}")
    if not preds:
        raise ShiftArithmeticError("select layers needs a preset or a pattern")
    return (lambda k, s: all(p(k, s) for p in preds)), " and ".join(desc)


def select_layers(chosen: SpectralShift, rest: SpectralShift, preset: Optional[str] = None,
                  pattern: Optional[str] = None) -> SpectralShift:
    """Sec. 4.4 style mixing: selected keys from ``chosen`` (A), every other key from ``rest`` (B).

    The selection is evaluated on the union of both shifts' keys; a selected key that A lacks
    (or an unselected key that B lacks) is zero and left out.  An empty selection is refused.
    """
    shapes = check_compatible([chosen, rest])
    pred, desc = layer_predicate(preset, pattern, shapes)
    selected = [k for k, s in shapes.items() if pred(k, s)]
    if not selected:
        raise ShiftArithmeticError(f"the layer selection ({desc}) matches none of the {len(shapes)} keys of the two shifts")
    sel = set(selected)
    deltas = {}
    for k in shapes:
        src = chosen if k in sel else rest
        if k in src.deltas:
            deltas[k] = src.deltas[k].float().clone()
    params = {"selection": desc, "selected_keys": len(selected), "from_A": sum(1 for k in selected if k in chosen.deltas),
              "from_B": sum(1 for k in deltas if k not in sel)}
    return _finish(deltas, shapes, _combined_metadata([chosen, rest], "select_layers", params, deltas))


def rank_limit(shift: SpectralShift, rank: int) -> SpectralShift:
    """Appendix E.1: keep the shifts of the r largest singular values of every matrix.

    Matrices with at most r singular values are kept whole; 1-D weights are untouched.  r
    must be >= 1 and smaller than the largest matrix's number of singular values (otherwise
    the limit changes nothing and is refused as a likely mistake).
    """
    if not isinstance(shift, SpectralShift):
        raise ShiftArithmeticError(f"rank limit needs a spectral shift, got {type(shift).__name__}")
    r = int(rank)
    if r < 1:
        raise ShiftArithmeticError(f"rank {r} must be at least 1")
    mats = [k for k in shift.deltas if is_spectral_shape(shift.shapes[k])]
    if not mats:
        raise ShiftArithmeticError("the shift has no matrix weights (only 1-D ones); there is no rank to limit")
    largest = max(delta_length(shift.shapes[k]) for k in mats)
    if r >= largest:
        kmax = max(mats, key=lambda k: delta_length(shift.shapes[k]))
        raise ShiftArithmeticError(
            f"rank {r} is not smaller than the largest matrix's {largest} singular values ({kmax!r}); nothing would change"
        )
    deltas = {}
    truncated = 0
    for k, d in shift.deltas.items():
        if is_spectral_shape(shift.shapes[k]) and d.shape[0] > r:
            deltas[k] = d[:r].float().clone()
            truncated += 1
        else:
            deltas[k] = d.float().clone()
    meta = _combined_metadata([shift], "rank_limit", {"rank": r, "matrices_truncated": truncated}, deltas)
    meta["subset"] = shift.metadata.get("subset", "")
    meta["training"] = shift.metadata.get("training", {})
    out = _finish(deltas, shift.shapes, meta)
    out.metadata["rank"] = r
    return out


def cosine_similarity_matrix(shifts: Sequence[SpectralShift]) -> torch.Tensor:
    """Appendix E.2 / Fig. 15: cosine similarity of two shifts averaged over layers.

    Entry (i, j) is the mean over the keys present (with non-zero delta) in both shifts of
    cos(delta_i,k, delta_j,k), deltas padded to full length; NaN when they share no key.
    """
    n = len(shifts)
    out = torch.full((n, n), float("nan"))
    for i in range(n):
        for j in range(n):
            a, b = shifts[i], shifts[j]
            common = [k for k in a.deltas if k in b.deltas]
            vals = []
            for k in common:
                x = a.full_delta(k).double() if is_spectral_shape(a.shapes[k]) else a.deltas[k].double()
                y = b.full_delta(k).double() if is_spectral_shape(b.shapes[k]) else b.deltas[k].double()
                nx, ny = x.norm(), y.norm()
                if nx > 0 and ny > 0:
                    vals.append(float((x @ y) / (nx * ny)))
            if vals:
                out[i, j] = sum(vals) / len(vals)
    return out
