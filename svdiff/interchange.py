"""Interchange: svdiff-pytorch shift files, LoRA -> spectral shift, spectral shift -> LoRA.

Pure PyTorch: the key maps and base weights come from the caller (``nodes/interchange.py``
builds them from ComfyUI's own maps).

svdiff-pytorch layout
---------------------
The unofficial implementation saves one safetensors file per network (UNet,
``spectral_shifts.safetensors``; text encoder, ``spectral_shifts_te.safetensors``) holding
``<diffusers module name>.delta`` in float32, without metadata.  Matrices (Linear, Conv,
Embedding) carry delta of length min(rows, cols) of the reshaped kernel, exactly as ours
(Eq. 2).  1-D norm scales are decomposed as the 1 x n matrix w^T, whose only singular value
is ||w|| with V = w/||w||, so their single scalar delta means

    w' = w * ReLU(||w|| + delta) / ||w||.

At load we turn that into our additive 1-D form using the base weight,
``d = w (ReLU(||w|| + delta)/||w|| - 1)``, which is exact at strength 1.  Writing back,
our per-element d has no exact scalar equivalent: the least-squares scalar is
``delta = (w . d)/||w||`` (projection of w + d onto the direction of w), and the part of d
orthogonal to w is lost (reported as a fraction).

LoRA -> spectral shift (projection onto the base's singular basis)
------------------------------------------------------------------
The spectral shift nearest (Frobenius norm) to a weight change Delta W keeps U, V and moves
sigma: delta_i = u_i^T (W + Delta W) v_i - sigma_i = u_i^T Delta W v_i.  Its change
U diag(delta) V^T is the orthogonal projection P(Delta W) onto span{u_i v_i^T}; the kept
fraction is ||P(Delta W)||^2 / ||Delta W||^2.  When sigma_i + delta_i < 0 the ReLU of Eq. 2
clamps at application, so we also report the error of what is actually applied,
||Delta W - U diag(ReLU(sigma + delta) - sigma) V^T|| / ||Delta W||.

Spectral shift -> LoRA
----------------------
Delta W = U diag(c) V^T with c = ReLU(sigma + delta) - sigma is exactly a LoRA of rank
min(m, n): up = U diag(c), down = V^T.  Truncating to rank r keeps the r entries of largest
|c|; the relative Frobenius error is sqrt(sum of dropped c^2 / sum c^2).  1-D weights are
written as full differences (``.diff``, which ComfyUI and kohya-style loaders read).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .shift import SpectralShift, delta_length, is_spectral_shape

PYTORCH_LAYOUT = "svdiff-pytorch"
DELTA_SUFFIX = ".delta"


class InterchangeError(ValueError):
    """A file or value that cannot be converted; the message names the key."""


# --------------------------------------------------------------------------------------
# svdiff-pytorch <-> ours
# --------------------------------------------------------------------------------------
def norm_scalar_to_additive(weight: torch.Tensor, delta: float) -> torch.Tensor:
    """svdiff-pytorch's 1-D shift as our additive delta: w (ReLU(||w|| + delta)/||w|| - 1)."""
    w = weight.detach().double().reshape(-1)
    n = w.norm()
    if n == 0:
        return torch.zeros_like(w, dtype=torch.float32)
    return (w * (torch.relu(n + float(delta)) / n - 1.0)).float()


def additive_to_norm_scalar(weight: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    """Least-squares scalar delta for our additive 1-D d: ((w . d)/||w||, lost fraction).

    lost fraction = ||d - w (w . d)/||w||^2|| / ||d|| (0 when d is parallel to w).
    """
    w = weight.detach().double().reshape(-1)
    dd = d.detach().double().reshape(-1)
    n = w.norm()
    nd = dd.norm()
    if n == 0:
        return 0.0, 1.0 if nd > 0 else 0.0
    coef = float(w @ dd) / float(n)
    if nd == 0:
        return coef, 0.0
    rest = dd - w * (coef / float(n))
    return coef, float(rest.norm() / nd)


def strip_delta(name: str) -> str:
    return name[: -len(DELTA_SUFFIX)] if name.endswith(DELTA_SUFFIX) else name


def shift_from_pytorch_layout(tensors: dict, key_map: dict, shapes: dict, base_1d: dict,
                              source: str = "the file") -> tuple[SpectralShift, dict]:
    """Convert svdiff-pytorch tensors to a SpectralShift.

    tensors: ``<diffusers name>.delta`` -> tensor; key_map: diffusers module name (without
    ``.delta``) -> our key (``diffusion_model.….weight`` / ``clip_l.transformer.….weight``);
    shapes: our key -> base-weight shape; base_1d: our key -> base 1-D weight (norm scales).
    Returns (shift, report) with report = {mapped, unmapped: [names], norms_converted}.
    Keys that map nowhere are reported, not fatal; a mapped key whose length disagrees with
    its weight is refused naming the key.
    """
    deltas, out_shapes, unmapped = {}, {}, []
    norms = 0
    for name in sorted(tensors):
        t = tensors[name]
        mod = strip_delta(name)
        key = key_map.get(mod)
        if key is None or key not in shapes:
            unmapped.append(name)
            continue
        shape = tuple(shapes[key])
        v = t.detach().float().reshape(-1)
        if is_spectral_shape(shape):
            full = delta_length(shape)
            if not 0 < v.numel() <= full:
                raise InterchangeError(f"{source}: {name!r} has {v.numel()} values; its weight {key!r} {list(shape)} has {full} singular values")
            deltas[key] = v.clone()
        else:
            if v.numel() != 1:
                raise InterchangeError(
                    f"{source}: {name!r} has {v.numel()} values; svdiff-pytorch stores one scalar for the 1-D weight {key!r}"
                )
            if key not in base_1d:
                raise InterchangeError(f"{source}: no base weight given for the 1-D weight {key!r} (needed to convert its scalar delta)")
            deltas[key] = norm_scalar_to_additive(base_1d[key], float(v[0]))
            norms += 1
        out_shapes[key] = shape
    if not deltas:
        raise InterchangeError(f"{source}: none of its {len(tensors)} keys maps to a weight of the model (first: {next(iter(sorted(tensors)), '?')!r})")
    meta = {
        "architecture": "",
        "subset": "",
        "rank": 0,
        "description": f"converted from the {PYTORCH_LAYOUT} layout",
        "history": [{"op": "import", "layout": PYTORCH_LAYOUT, "mapped": len(deltas), "unmapped": len(unmapped), "norms_converted": norms}],
    }
    report = {"mapped": len(deltas), "total": len(tensors), "unmapped": unmapped, "norms_converted": norms}
    return SpectralShift(deltas, out_shapes, meta), report


def shift_to_pytorch_layout(shift: SpectralShift, inverse_map: dict, base_1d: dict) -> tuple[dict, dict]:
    """Our shift as svdiff-pytorch tensors (float32, ``<diffusers name>.delta``).

    inverse_map: our key -> diffusers module name.  Matrices get delta padded to
    min(m, n); 1-D weights get the least-squares scalar (see module docstring) and the
    report lists how much of each was lost.  Returns (tensors, report) with report =
    {written, unmapped: [keys], projected: {key: lost fraction}, max_lost}.
    """
    tensors, unmapped, projected = {}, [], {}
    for key in shift.deltas:
        name = inverse_map.get(key)
        if name is None:
            unmapped.append(key)
            continue
        if is_spectral_shape(shift.shapes[key]):
            tensors[name + DELTA_SUFFIX] = shift.full_delta(key).float().contiguous()
        else:
            if key not in base_1d:
                raise InterchangeError(f"no base weight for the 1-D weight {key!r}: it is needed to project its delta to a scalar")
            coef, lost = additive_to_norm_scalar(base_1d[key], shift.deltas[key])
            tensors[name + DELTA_SUFFIX] = torch.tensor([coef], dtype=torch.float32)
            projected[key] = lost
    report = {
        "written": len(tensors),
        "unmapped": unmapped,
        "projected": projected,
        "max_lost": max(projected.values()) if projected else 0.0,
    }
    return tensors, report


# --------------------------------------------------------------------------------------
# weight change (LoRA, fine-tune) -> spectral shift
# --------------------------------------------------------------------------------------
def project_weight_delta(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, delta_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """delta_i = u_i^T Delta W v_i and the energy bookkeeping of the projection.

    U (m, k), S (k,), Vh (k, n) of the *base* weight; delta_w shaped like the weight (any
    kernel shape, reshaped to (m, n)).  Returns (delta (k,), stats) with stats = {energy:
    ||Delta W||^2, kept: ||P(Delta W)||^2, applied_error: ||Delta W - U diag(ReLU(S+delta)-S) V^T||^2,
    clamped: number of i with S_i + delta_i < 0}.  U and Vh are taken as orthonormal.
    """
    m = U.shape[0]
    dw = delta_w.detach().reshape(m, -1).double()
    Ud, Vd, Sd = U.double(), Vh.double(), S.double()
    delta = ((Ud.t() @ dw) * Vd).sum(dim=1)
    energy = float((dw * dw).sum())
    kept = min(energy, float((delta * delta).sum()))  # <= energy; float16 factors are only nearly orthonormal
    c = torch.relu(Sd + delta) - Sd
    applied_err = max(0.0, energy - 2.0 * float((c * delta).sum()) + float((c * c).sum()))
    stats = {"energy": energy, "kept": kept, "applied_error": applied_err, "clamped": int((Sd + delta < 0).sum())}
    return delta.float(), stats


def vector_delta(delta_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A 1-D weight change is exactly an additive 1-D shift."""
    d = delta_w.detach().reshape(-1).float()
    e = float((d.double() ** 2).sum())
    return d.clone(), {"energy": e, "kept": e, "applied_error": 0.0, "clamped": 0}


def summarize_projection(stats: dict) -> dict:
    """Totals over keys: kept fraction (energy) and relative error of the applied shift."""
    energy = sum(s["energy"] for s in stats.values())
    kept = sum(s["kept"] for s in stats.values())
    err = sum(s["applied_error"] for s in stats.values())
    return {
        "weights": len(stats),
        "energy": energy,
        "kept_fraction": kept / energy if energy > 0 else 1.0,
        "applied_relative_error": math.sqrt(err / energy) if energy > 0 else 0.0,
        "clamped": sum(s["clamped"] for s in stats.values()),
    }


# --------------------------------------------------------------------------------------
# spectral shift -> LoRA
# --------------------------------------------------------------------------------------
def lora_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, delta: torch.Tensor, shape, rank: int = 0
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(up, down, stats) with up @ down = U diag(c) V^T truncated to ``rank`` (0: exact).

    c = ReLU(sigma + delta) - sigma over the stored entries of delta; the kept entries are
    those of largest |c|.  ``rank`` larger than the matrix's number of non-zero changes is
    clamped to it (the LoRA is then exact).  Conv kernels (cout, cin, kh, kw) give
    down (r, cin, kh, kw) and up (cout, r, 1, 1), the layout LoRA loaders expect.
    Returns None when the shift changes nothing in this weight.
    stats = {rank, full_rank, energy: sum c^2, error: sqrt(dropped/energy)}.
    """
    if rank < 0:
        raise InterchangeError(f"rank {rank} must be >= 0 (0 means full rank)")
    shape = tuple(shape)
    r0 = int(delta.shape[0])
    Sd = S[:r0].double()
    c = torch.relu(Sd + delta.double()) - Sd
    nz = int((c != 0).sum())
    if nz == 0:
        return None
    order = torch.argsort(c.abs(), descending=True)[:nz]
    r = nz if rank == 0 else min(rank, nz)
    idx = order[:r]
    energy = float((c * c).sum())
    kept = float((c[idx] ** 2).sum())
    up = (U[:, :r0].double()[:, idx] * c[idx]).float()
    down = Vh[:r0].double()[idx].float()
    if len(shape) > 2:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    err = math.sqrt(max(0.0, energy - kept) / energy) if (energy > 0 and r < nz) else 0.0
    return up.contiguous(), down.contiguous(), {"rank": r, "full_rank": nz, "energy": energy, "error": err}


def lora_state_dict(entries: dict) -> dict:
    """A kohya-style LoRA dict from {lora name: (up, down) | 1-D diff tensor}.

    Matrices: ``<name>.lora_up.weight``, ``<name>.lora_down.weight`` and ``<name>.alpha`` = r
    (so the loader's scale alpha/r is 1); 1-D: ``<name>.diff``.
    """
    out = {}
    for name, v in entries.items():
        if isinstance(v, tuple):
            up, down = v
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            out[f"{name}.diff"] = v.detach().float().contiguous()
    return out
