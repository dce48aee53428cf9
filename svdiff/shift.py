"""The spectral shift: a value holding delta per weight, and the patched-weight formulas.

Eq. 2 of the paper:  W_delta = U Sigma_delta V^T  with  Sigma_delta = diag(ReLU(sigma + delta)),
with a strength s scaling delta inside the ReLU (appendix E.3: diag(ReLU(sigma + s delta))).

We evaluate it in *residual form*

    W' = W + U diag(ReLU(sigma + s delta) - sigma) V^T

in float32 and cast back to the weight's dtype.  Mathematically identical to Eq. 2
(U diag(sigma) V^T = W), but exact at delta = 0 whatever the precision of the stored U and
V (they are kept in float16), and it only adds the change.

A rank-limited shift (appendix E.1) stores only the first r entries of delta (the shifts
of the r largest singular values); the rest are zero.

1-D weights (the scales of GroupNorm/LayerNorm) have no spectrum; as in the official
code they get an additive full-length delta: w' = w + s delta.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .decompose import CompactFactors, Decomposition, as_matrix, num_singular_values, row_blocks


def is_spectral_shape(shape) -> bool:
    return len(tuple(shape)) >= 2


def delta_length(shape, rank: int = 0) -> int:
    """Number of delta entries stored for a weight of this shape (Eq. 2 / appendix E.1)."""
    shape = tuple(shape)
    if is_spectral_shape(shape):
        k = num_singular_values(shape)
        return min(k, rank) if rank and rank > 0 else k
    if len(shape) == 1:
        return int(shape[0])
    raise ValueError(f"a weight of shape {shape} cannot carry a spectral shift")


def shifted_sigma(S: torch.Tensor, delta: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """ReLU(sigma + s*delta) for the first len(delta) values; sigma beyond them is kept."""
    S = S.float()
    d = delta.to(S.device, torch.float32)
    r = d.shape[0]
    if r > S.shape[0]:
        raise ValueError(f"delta has {r} entries but the weight has only {S.shape[0]} singular values")
    out = S.clone()
    out[:r] = torch.relu(S[:r] + strength * d)
    return out


def spectral_residual(dec: Decomposition, delta: torch.Tensor, strength: float = 1.0, device=None) -> torch.Tensor:
    """U diag(ReLU(sigma + s*delta) - sigma) V^T in float32, shaped like the weight.

    Only the first r = len(delta) singular directions can change, so only those columns
    of U and rows of V^T are used (a rank-r shift costs m*n*r, not m*n*k).
    """
    r = int(delta.shape[0])
    if r > dec.rank:
        raise ValueError(f"delta has {r} entries but the weight has only {dec.rank} singular values")
    S = dec.S[:r].to(device=device, dtype=torch.float32)
    d = delta.to(device=device, dtype=torch.float32)
    change = torch.relu(S + strength * d) - S
    U = dec.U[:, :r].to(device=device, dtype=torch.float32)
    Vh = dec.Vh[:r].to(device=device, dtype=torch.float32)
    return ((U * change) @ Vh).reshape(dec.shape)


def compact_residual(cf: CompactFactors, delta: torch.Tensor, strength: float, weight: torch.Tensor,
                     device=None) -> torch.Tensor:
    """Eq. 2's residual U diag(h) V^T, h = ReLU(sigma + s*delta) - sigma, from compact factors.

    With A the tall form of W (W, or W^T when W is wide) and U = A V diag(1/sigma) for the first
    ``cf.head`` directions (the columns of U the cache does not keep), the residual of A is

        R_A = A (V_t diag(h_t / sigma_t) V_t^T) + U_tail diag(h_tail) V_tail^T,

    so W' = W + R needs only sigma, the small square factor V and the weight itself: no tall
    factor is formed.  A is read in blocks of rows (columns of W when it is wide), each cast to
    float32 on ``device``, so the only weight-sized tensor is the residual itself.  Only the
    first len(delta) directions change (a rank-r shift costs about 2 m n r, not m n k).
    Returns the residual in float32, shaped like the weight; exactly zero where delta is.
    """
    if tuple(weight.shape) != tuple(cf.shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the factors' {tuple(cf.shape)}")
    d = delta.to(device=device, dtype=torch.float32)
    j = int(d.shape[0])
    if j > cf.rank:
        raise ValueError(f"delta has {j} entries but the weight has only {cf.rank} singular values")
    cf = cf.truncate(j)
    S = cf.S.to(device=device, dtype=torch.float32)
    V = cf.V.to(device=device, dtype=torch.float32)
    h = torch.relu(S + strength * d) - S
    t = cf.head
    W = as_matrix(weight.detach())
    out = torch.zeros(W.shape, dtype=torch.float32, device=S.device)
    if t:
        _add_head_residual(out, W, V[:, :t], h[:t] / S[:t], cf.transpose)
    if t < j:
        T = cf.U_tail.to(device=S.device, dtype=torch.float32) * h[t:]
        out += (V[:, t:] @ T.t()) if cf.transpose else (T @ V[:, t:].t())
    return out.reshape(weight.shape)


def _add_head_residual(out: torch.Tensor, W: torch.Tensor, Vt: torch.Tensor, g: torch.Tensor, transpose: bool) -> None:
    """out += W M (tall W) or M W (wide W), M = Vt diag(g) Vt^T, by blocks of W cast to float32.

    For few directions (2 t < k) the product goes through the k x t factors instead of M.
    """
    k, t = Vt.shape
    B = Vt * g
    M = B @ Vt.t() if 2 * t >= k else None
    if not transpose:
        for rows in row_blocks(W.shape[0], W.shape[1], itemsize=4):
            blk = W[rows].to(device=out.device, dtype=torch.float32)
            out[rows] = blk @ M if M is not None else (blk @ B) @ Vt.t()
        return
    for cols in row_blocks(W.shape[1], W.shape[0], itemsize=4):
        blk = W[:, cols].to(device=out.device, dtype=torch.float32)
        out[:, cols] = M @ blk if M is not None else Vt @ (B.t() @ blk)


def apply_spectral_shift(
    weight: torch.Tensor, dec: Decomposition, delta: torch.Tensor, strength: float = 1.0
) -> torch.Tensor:
    """W + U diag(ReLU(sigma + s delta) - sigma) V^T, computed in float32, returned in W's dtype."""
    if tuple(weight.shape) != tuple(dec.shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the decomposition's {dec.shape}")
    w = weight.float() + spectral_residual(dec, delta, strength, device=weight.device)
    return w.to(weight.dtype)


def apply_vector_shift(weight: torch.Tensor, delta: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """w + s delta for a 1-D weight (norm scale), in float32, returned in w's dtype."""
    if weight.shape != delta.shape:
        raise ValueError(f"1-D delta of shape {tuple(delta.shape)} does not match weight {tuple(weight.shape)}")
    return (weight.float() + strength * delta.to(weight.device, torch.float32)).to(weight.dtype)


def shapes_fingerprint(shapes: dict) -> str:
    """A short hash of the key -> weight-shape table (identifies an architecture)."""
    blob = json.dumps({k: list(v) for k, v in sorted(shapes.items())}, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


@dataclass
class SpectralShift:
    """delta for a set of weights, with the shapes of the weights they belong to.

    deltas: state-dict key -> 1-D float tensor (len = min(m, n) or rank r for matrices,
            len = numel for 1-D weights).
    shapes: state-dict key -> shape of the *base weight* (needed to validate and patch).
    metadata: architecture, subset, rank, fingerprints, training settings, description,
              and ``history`` (a list of the operations that made this value).
    """

    deltas: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        for k, d in self.deltas.items():
            if k not in self.shapes:
                raise ValueError(f"spectral shift key {k!r} has no base-weight shape")
            if d.ndim != 1:
                raise ValueError(f"delta for {k!r} must be 1-D, got shape {tuple(d.shape)}")
            shape = tuple(self.shapes[k])
            full = delta_length(shape)
            if is_spectral_shape(shape):
                if not 0 < d.shape[0] <= full:
                    raise ValueError(f"delta for {k!r} has {d.shape[0]} entries; its weight {shape} has {full} singular values")
            elif d.shape[0] != full:
                raise ValueError(f"delta for 1-D weight {k!r} has {d.shape[0]} entries, expected {full}")

    # -- views ---------------------------------------------------------------
    def keys(self) -> list:
        return list(self.deltas.keys())

    def __len__(self) -> int:
        return len(self.deltas)

    def num_values(self) -> int:
        return sum(int(d.numel()) for d in self.deltas.values())

    def spectral_keys(self) -> list:
        return [k for k in self.deltas if is_spectral_shape(self.shapes[k])]

    def vector_keys(self) -> list:
        return [k for k in self.deltas if not is_spectral_shape(self.shapes[k])]

    def with_prefix(self, prefix: str) -> "SpectralShift":
        """The part of this shift whose keys start with ``prefix`` (e.g. 'diffusion_model.')."""
        keys = [k for k in self.deltas if k.startswith(prefix)]
        return SpectralShift({k: self.deltas[k] for k in keys}, {k: self.shapes[k] for k in keys}, copy.deepcopy(self.metadata))

    def full_delta(self, key: str) -> torch.Tensor:
        """delta padded with zeros to the full number of singular values."""
        d = self.deltas[key].float()
        full = delta_length(self.shapes[key])
        if d.shape[0] == full:
            return d
        out = torch.zeros(full, dtype=torch.float32)
        out[: d.shape[0]] = d
        return out

    def copy(self) -> "SpectralShift":
        return SpectralShift(
            {k: v.detach().clone() for k, v in self.deltas.items()}, dict(self.shapes), copy.deepcopy(self.metadata)
        )

    def add_history(self, op: str, **params) -> None:
        self.metadata.setdefault("history", []).append({"op": op, **params})

    def __repr__(self) -> str:  # shown by ComfyUI in errors and previews
        arch = self.metadata.get("architecture", "?")
        return f"SpectralShift({len(self.deltas)} weights, {self.num_values()} values, architecture={arch})"


def zeros_like_weights(shapes: dict, keys: Optional[Iterable[str]] = None, rank: int = 0) -> SpectralShift:
    """A zero spectral shift over ``keys`` (default: every key of ``shapes``)."""
    keys = list(shapes) if keys is None else list(keys)
    deltas = {k: torch.zeros(delta_length(shapes[k], rank), dtype=torch.float32) for k in keys}
    return SpectralShift(deltas, {k: tuple(shapes[k]) for k in keys}, {"rank": int(rank or 0)})
