"""Singular value decomposition of weight kernels, computed once and cached.

Sec. 3.2 of the paper: a weight tensor ``W_tensor`` of shape (c_out, c_in, h, w) is
reshaped to the matrix W = reshape(W_tensor) of shape (c_out, c_in*h*w) (as in FSGAN),
and decomposed as W = U diag(sigma) V^T with sigma in descending order.  "The SVD is a
one-time computation and can be cached": :class:`SVDCache` keeps decompositions in
memory (bounded, least recently used out first) and optionally on disk, keyed by a
fingerprint of the weight's bytes.

Algorithms (all give W = U diag(sigma) V^T; write A for W or W^T, whichever is tall, p x k):

* ``"svd"``: ``torch.linalg.svd`` in float32 (the reference);
* ``"gram64"`` (the default): eigendecomposition of the float64 Gram matrix
  A^T A = V diag(sigma^2) V^T, then U = A V diag(1/sigma), completed by a QR where sigma is
  numerically zero;
* ``"gram"``: the same with A^T A and U = A V diag(1/sigma) in float32 (the two
  p k^2 products) and the k x k eigendecomposition in float64, sigma_i = ||A v_i|| (one-sided, so
  every column of U has unit norm); checked per matrix -- the smallest sigma must be at least
  ``GRAM32_MIN_RATIO`` of the largest (one Cholesky) and a random probe of U^T U - I must stay
  below ``GRAM32_ORTH_TOL`` -- and done in float64 (``"gram64"``) where the condition number
  needs it.  Not the default: on the shared 2-core CPU of this project it measured no faster
  than ``"gram64"`` on the SD1.5 UNet (the float64 eigendecompositions dominate there; see
  ``bench/bench_decompose.py``), and it changes results at the float16-storage level.

A rank-r request (appendix E.1: only the top r singular values are shifted) uses
:func:`truncated_factors`: subspace iteration on A^T A with oversampling and a Rayleigh-Ritz
step per iteration, stopped when every top-r triplet has a residual ||A^T u - sigma v|| below
``TRUNCATED_TOL`` sigma_1 (the triplets are then exact for a weight within that relative
distance); when the products with A converge too slowly it goes on with the float64 Gram
matrix, and when that does not converge within about an eigendecomposition's cost it takes the
top r of that Gram matrix's full eigendecomposition (the full route, without a second product).

The cache stores only what cannot be cheaply recomputed (:class:`CompactFactors`): sigma
and the small square factor (k x k, float32), plus the few columns of the tall factor whose
sigma is too small to recompute it accurately; the tall factor U = A V diag(1/sigma) is
recomputed from the weight when it is needed (:meth:`CompactFactors.expand`), or never formed
(a shift's residual goes through the weight: :func:`svdiff.shift.compact_residual`).  The
default route computes new entries in that form directly (:func:`compact_factors`: one float64
Gram product and its eigendecomposition, no tall factor).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("svdiff")

STORAGE_DTYPE = torch.float16  # U and V^T are stored in half precision (see residual form)
GRAM64_NULL_RATIO = 1e-6  # float64 Gram: sigma below this * sigma_1 counts as a null direction
GRAM32_MIN_RATIO = 1e-3  # float32 Gram: smallest sigma / largest sigma it is trusted for
GRAM32_ORTH_TOL = 2e-5  # float32 Gram: ||(U^T U - I) x|| / ||x|| on random probes
RECOMPUTE_MIN_RATIO = 1e-3  # compact cache: columns of U with sigma below this * sigma_1 are stored
TRUNCATED_TOL = 1e-3  # truncated route: residual of every top-r triplet / sigma_1
ROUTE_COUNTS: Counter = Counter()  # how many matrices each route decomposed (bench/diagnostics)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Reshape a 2-D or 4-D (or any >=2-D) kernel to (c_out, c_in*kh*kw), as FSGAN does."""
    if weight.ndim < 2:
        raise ValueError(f"a weight with {weight.ndim} dimension(s) has no spectral decomposition")
    return weight.reshape(weight.shape[0], -1)


def num_singular_values(shape) -> int:
    """min(m, n) of the reshaped matrix of a kernel of this shape."""
    return tall_shape(shape)[0][1]


def tall_shape(shape) -> tuple:
    """((p, k), transpose): the shape of the tall form of a kernel's reshaped matrix (p >= k; A = W,
    or W^T when ``transpose``)."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"shape {shape} has no spectral decomposition")
    m, n = int(shape[0]), 1
    for s in shape[1:]:
        n *= int(s)
    return ((n, m), True) if m < n else ((m, n), False)


def effective_rank(shape, rank: int = 0) -> int:
    """The number of triplets a rank-``rank`` request keeps: 0 (all) when rank is 0 or >= min(m, n)."""
    k = num_singular_values(shape)
    return int(rank) if rank and 0 < int(rank) < k else 0


@dataclass
class Decomposition:
    """W = U diag(S) Vh for the reshaped matrix of one weight.

    U: (m, j), S: (j,) float32 descending, Vh: (j, n), with j = min(m, n), or j = r for a
    truncated (rank-r, appendix E.1) decomposition.  U and Vh are usually stored in float16;
    S always in float32.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    shape: tuple  # shape of the original weight tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Decomposition":
        return Decomposition(
            self.U.to(device=device, dtype=dtype or self.U.dtype),
            self.S.to(device=device),
            self.Vh.to(device=device, dtype=dtype or self.Vh.dtype),
            self.shape,
        )

    def truncate(self, r: int) -> "Decomposition":
        """The top ``r`` triplets (views of these factors)."""
        if r <= 0 or r >= self.rank:
            return self
        return Decomposition(self.U[:, :r], self.S[:r], self.Vh[:r], self.shape)

    def reconstruct(self) -> torch.Tensor:
        """U diag(S) Vh in float32, reshaped to the weight's shape."""
        U = self.U.float()
        Vh = self.Vh.float()
        return ((U * self.S.float()) @ Vh).reshape(self.shape)


@dataclass
class TallFactors:
    """A = Ua diag(S) Va^T for the tall form A of a weight matrix (A = W, or W^T when W is wide)."""

    Ua: torch.Tensor  # (p, j)
    S: torch.Tensor  # (j,) descending
    Va: torch.Tensor  # (k, j): the small square factor (k = min(m, n)), or its first j columns
    transpose: bool  # True when A = W^T

    def decomposition(self, shape: tuple, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Decomposition:
        """W = U diag(S) Vh on the CPU: (U, Vh) = (Ua, Va^T), or (Va, Ua^T) when A = W^T."""
        U, Vh = (self.Va, self.Ua.t()) if self.transpose else (self.Ua, self.Va.t())
        return Decomposition(
            U.to("cpu", storage_dtype).contiguous(),
            self.S.to("cpu", torch.float32).contiguous(),
            Vh.to("cpu", storage_dtype).contiguous(),
            tuple(shape),
        )


def tall(m: torch.Tensor) -> tuple:
    """(A, transposed): the matrix itself when m >= n, else its transpose."""
    transpose = m.shape[0] < m.shape[1]
    return (m.t() if transpose else m), transpose


def _sorted_one_sided(a: torch.Tensor, V: torch.Tensor) -> tuple:
    """(U, sigma, V) with sigma_i = ||A v_i||, U = A V diag(1/sigma), sorted by sigma descending."""
    B = a @ V
    S = torch.linalg.vector_norm(B, dim=0)
    if S.shape[0] > 1 and not bool((S[:-1] >= S[1:]).all()):  # rare: close values swapped; no copy otherwise
        order = torch.argsort(S, descending=True)
        S, B, V = S[order], B[:, order], V[:, order]
    return B.div_(S), S, V


def _gram64(a: torch.Tensor) -> tuple:
    """Eigendecomposition of the float64 Gram matrix A^T A (A tall, p x k, p >= k).

    A^T A = V diag(sigma^2) V^T (``eigh``), sigma_i = sqrt(lambda_i), U = A V diag(1/sigma).
    Columns whose sigma is numerically zero (rank-deficient weights) have no defined direction;
    they are completed to an orthonormal basis by a QR, so U is always orthonormal.  "Zero" is
    below GRAM64_NULL_RATIO sigma_1: under it A v / sigma is dominated by the rounding of the
    eigenvectors (errors ~ eps64 (sigma_1/sigma)^2), so such sigma are set to 0.
    """
    S, V = _gram_eig(gram64_matrix(a))
    k = S.shape[0]
    tol = S[0] * GRAM64_NULL_RATIO if k else 0.0
    good = int((S > tol).sum()) if k else 0
    U = torch.empty(a.shape[0], k, dtype=torch.float64, device=a.device)
    U[:, :good] = _times64(a, V[:, :good]) / S[:good]
    if good < k:  # complete the basis for the null directions
        fill = torch.randn(a.shape[0], k - good, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(a.device)
        q, _ = torch.linalg.qr(torch.cat([U[:, :good], fill], dim=1))
        U[:, good:] = q[:, good:]
        S[good:] = 0.0
    return U, S, V


GRAM_BLOCK_BYTES = 16 << 20  # row block of the float64 Gram product and of the residual products


def row_blocks(rows: int, cols: int, block_bytes: int = GRAM_BLOCK_BYTES, itemsize: int = 8):
    """Slices of ``rows`` rows, each block of (rows x cols) at most about ``block_bytes``."""
    step = max(1, block_bytes // max(1, cols * itemsize))
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def _times64(a: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A X in float64 (X float64), by row blocks of A (no float64 copy of the whole of A)."""
    out = torch.empty(a.shape[0], X.shape[1], dtype=torch.float64, device=a.device)
    for rows in row_blocks(a.shape[0], a.shape[1]):
        out[rows] = a[rows].double() @ X
    return out


def _gram_eig(G: torch.Tensor) -> tuple:
    """(sigma, V) from the Gram matrix G = A^T A = V diag(sigma^2) V^T, sigma descending."""
    evals, evecs = torch.linalg.eigh(G)
    return evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)


def _has_null(S: torch.Tensor) -> bool:
    """Whether descending ``S`` has numerically null values (below GRAM64_NULL_RATIO sigma_1)."""
    return not float(S[0]) > 0 or bool((S <= S[0] * GRAM64_NULL_RATIO).any())


def gram64_matrix(a: torch.Tensor) -> torch.Tensor:
    """A^T A in float64, summed over row blocks of A (no float64 copy of the whole of A).

    Only the block upper triangle is multiplied (column panels of about 128: (nb + 1) / (2 nb) of
    the products, about 0.56 for nb = 8) and mirrored, so G is exactly symmetric.
    """
    k = a.shape[1]
    nb = max(1, min(8, k // 128))
    edges = [k * i // nb for i in range(nb + 1)]
    G = torch.zeros(k, k, dtype=torch.float64, device=a.device)
    for rows in row_blocks(a.shape[0], k):
        blk = a[rows].double()
        for x in range(nb):
            lo, hi = edges[x], edges[x + 1]
            G[lo:hi, lo:].addmm_(blk[:, lo:hi].t(), blk[:, lo:])
    return torch.triu(G) + torch.triu(G, 1).t()


def _gram64_compact(a: torch.Tensor) -> Optional[tuple]:
    """(sigma, V, U_tail) of tall A by the float64 Gram route, without forming U: what the cache keeps.

    The same sigma and V as :func:`_gram64` (the same Gram matrix and eigendecomposition); only the
    columns of U that A V diag(1/sigma) cannot give accurately later (sigma below
    RECOMPUTE_MIN_RATIO sigma_1) are computed.  None when A has numerically null directions (their
    columns of U come from a QR completion of the whole of U: :func:`_gram64` does it).
    """
    k = a.shape[1]
    if k == 0:
        return None
    S, V = _gram_eig(gram64_matrix(a))
    if _has_null(S):
        return None
    t = int((S >= S[0] * RECOMPUTE_MIN_RATIO).sum())
    tail = None
    if t < k:
        tail = (_times64(a, V[:, t:]) / S[t:]).to("cpu", STORAGE_DTYPE).contiguous()
    return S.to("cpu", torch.float32).contiguous(), V.to("cpu", torch.float32).contiguous(), tail


def _orthogonality_probe(U: torch.Tensor, n: int = 4) -> float:
    """||(U^T U - I) X|| / ||X|| for a few fixed random X: an O(p k) check of U's orthonormality."""
    X = torch.randn(U.shape[1], n, generator=torch.Generator().manual_seed(1)).to(U.device, U.dtype)
    return float(torch.linalg.norm(U.t() @ (U @ X) - X) / torch.linalg.norm(X))


def _well_conditioned(G: torch.Tensor, ratio: float) -> bool:
    """Whether lambda_min(G) > ratio * lambda_max(G) for a symmetric PSD G (k^3/3: one Cholesky).

    lambda_max is estimated by a few power iterations (from below, within a factor of about 2);
    the Cholesky factorisation of G - mu I (float64) exists exactly when lambda_min > mu.
    """
    x = torch.ones(G.shape[0], 1, dtype=G.dtype, device=G.device)
    for _ in range(4):
        x = G @ x
        x = x / torch.linalg.vector_norm(x)
    lam_max = float((x.t() @ (G @ x)).squeeze())
    if not lam_max > 0:
        return False
    H = G.double() - ratio * lam_max * torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
    return int(torch.linalg.cholesky_ex(H).info) == 0


def gram32_or_none(a: torch.Tensor) -> Optional[tuple]:
    """The float32 Gram route on tall A, or None where float32 is not accurate enough.

    A^T A and U = A V diag(1/sigma) are formed in float32 (the two products of p k^2 that dominate
    the cost); the eigendecomposition of the k x k Gram matrix is done in float64, because in
    float32 it mixes the eigenvectors of close eigenvalues (patched-weight errors of ~5e-4 on
    random weights, above the float16 storage's 3e-4).  None (use the float64 route) when
    sigma_min < GRAM32_MIN_RATIO sigma_1, where the float32 Gram matrix cannot resolve the small
    directions (checked by one Cholesky before the eigendecomposition), or when U's
    orthonormality probe exceeds GRAM32_ORTH_TOL.
    """
    a = a.float()
    if a.shape[1] == 0:
        return None
    G = a.t() @ a
    if not _well_conditioned(G, GRAM32_MIN_RATIO**2):
        return None
    _, V = torch.linalg.eigh(G.double())
    U, S, V = _sorted_one_sided(a, V.float())
    if not bool(torch.isfinite(S).all()) or _orthogonality_probe(U) > GRAM32_ORTH_TOL:
        return None
    return U, S, V


def _gram(a: torch.Tensor) -> tuple:
    f = gram32_or_none(a)
    if f is not None:
        ROUTE_COUNTS["gram32"] += 1
        return f
    if a.device.type == "mps":  # no float64 there
        ROUTE_COUNTS["svd"] += 1
        return _svd_reference(a)
    ROUTE_COUNTS["gram64"] += 1
    return _gram64(a)


def _gram64_route(a: torch.Tensor) -> tuple:
    if a.device.type == "mps":
        return _svd_reference(a)
    return _gram64(a)


def _svd_reference(a: torch.Tensor) -> tuple:
    U, S, Vh = torch.linalg.svd(a.float(), full_matrices=False)
    return U, S, Vh.t()


ALGORITHMS: dict[str, Callable] = {"svd": _svd_reference, "gram": _gram, "gram64": _gram64_route}


def _ritz_step(X: torch.Tensor, Z: torch.Tensor, r: int) -> tuple:
    """Rayleigh-Ritz on span(Z) from X = A^T A Z: (E, sigma, Ritz vectors of the top r, their residual / sigma_1).

    The residual of triplet i is ||A^T u_i - sigma_i v_i|| with u_i = A v_i / sigma_i, i.e.
    ||X e_i / sigma_i - sigma_i Z e_i||; it is inf when A has fewer than r non-zero values.
    """
    H = Z.t() @ X
    evals, E = torch.linalg.eigh((H + H.t()) / 2)
    E, S = E.flip(1), evals.flip(0).clamp_min(0).sqrt()
    Er, Sr = E[:, :r], S[:r]
    if float(Sr[-1]) <= 0.0:
        return E, S, Z @ Er, float("inf")
    res = float(torch.linalg.vector_norm((X @ Er) / Sr - (Z @ Er) * Sr, dim=0).max()) / float(S[0])
    return E, S, Z @ Er, res


def truncated_factors(a: torch.Tensor, r: int, oversample: Optional[int] = None, tol: float = TRUNCATED_TOL,
                      max_iter: Optional[int] = None, fallback: bool = False) -> Optional[tuple]:
    """The top ``r`` singular triplets (U, sigma, V) of tall A (p x k) by subspace iteration, or None.

    A block of b = r + oversample orthonormal vectors Z is iterated as Z <- orth(A^T A Z) in
    float32, each iteration ending with a Rayleigh-Ritz step (:func:`_ritz_step`); it stops when
    every top-r residual ||A^T u - sigma v|| is below ``tol`` sigma_1 (Halko, Martinsson & Tropp
    2011, Alg. 4.4 with Rayleigh-Ritz: the triplets are then exact for a matrix within about tol
    of A, relatively).  Phase 1 multiplies by A and A^T (2 p k b per iteration).  When its
    residuals fall too slowly to converge within ``max_iter`` (default: about half the cost of a
    full decomposition, k // (2 b)), phase 2 forms the float64 Gram matrix A^T A once (what the
    full route forms too) and goes on with k x b products, up to about the cost of an
    eigendecomposition.  When that does not converge either: None, or with ``fallback`` the top r
    of the full eigendecomposition of that same Gram matrix (no second Gram product).  None also
    when A has fewer than r non-zero singular values.
    """
    a = a.float()
    k = a.shape[1]
    b = min(k, r + (oversample if oversample is not None else max(16, r // 2)))
    max_iter = max(1, k // (2 * b)) if max_iter is None else max_iter
    Z, _ = torch.linalg.qr(torch.randn(k, b, generator=torch.Generator().manual_seed(0)).to(a.device))
    history: list = []
    for it in range(max_iter):
        X = a.t() @ (a @ Z)
        E, S, V, res = _ritz_step(X, Z, r)
        if res <= tol:
            return _sorted_one_sided(a, V)
        if res == float("inf"):
            return None
        history.append(res)
        Z, _ = torch.linalg.qr(X @ E)
        if not _may_converge(history, tol, max_iter - it - 1):
            break
    G = gram64_matrix(a)
    f = _truncated_gram_phase(a, G, Z.double(), r, tol, max(4, (3 * k) // b))
    if f is None and fallback:
        f = _top_from_gram(a, G, r)
    return f


def _truncated_gram_phase(a: torch.Tensor, G: torch.Tensor, Z: torch.Tensor, r: int, tol: float,
                          max_iter: int) -> Optional[tuple]:
    """Phase 2 of :func:`truncated_factors`: the same iteration on the float64 Gram matrix G = A^T A."""
    history: list = []
    for it in range(max_iter):
        X = G @ Z
        E, S, V, res = _ritz_step(X, Z, r)
        if res <= tol:
            ROUTE_COUNTS["truncated(gram phase)"] += 1
            return _sorted_one_sided(a, V.float())
        if res == float("inf"):
            return None
        history.append(res)
        if not _may_converge(history, tol, max_iter - it - 1):
            return None
        Z, _ = torch.linalg.qr(X @ E)
    return None


def _top_from_gram(a: torch.Tensor, G: torch.Tensor, r: int) -> Optional[tuple]:
    """The top ``r`` triplets from the full eigendecomposition of the float64 Gram matrix G = A^T A
    (what the full route computes; U = A V diag(1/sigma) for those r only); None where A has
    numerically null directions among them."""
    S, V = _gram_eig(G)
    S, V = S[:r], V[:, :r]
    if _has_null(S):
        return None
    ROUTE_COUNTS["truncated->eigh"] += 1
    return _times64(a, V) / S, S, V


def _may_converge(history: list, tol: float, left: int) -> bool:
    """Whether the residuals so far, shrinking geometrically at their last rate, reach ``tol`` in ``left`` iterations.

    Subspace iteration's residuals fall by about (sigma_{b+1} / sigma_r)^2 per iteration; a flat
    spectrum (random weights: the top r nearly degenerate) shows it after two iterations, and
    the caller's full decomposition then starts at once instead of after the whole budget.
    """
    if len(history) < 2:
        return True
    rate = history[-1] / history[-2]
    if rate >= 1.0:
        return False
    return history[-1] * rate**left <= tol


def use_truncated(k: int, r: int) -> bool:
    """Whether the truncated route can pay off: at least 3 iterations fit its budget (k >= 6 b)."""
    return 0 < r < k and k // (2 * min(k, r + max(16, r // 2))) >= 3


def factors(weight: torch.Tensor, algorithm: str = "gram64", device: Optional[torch.device] = None,
            rank: int = 0) -> TallFactors:
    """The tall factors of one weight (Sec. 3.2), computed on ``device``; top ``rank`` only if > 0."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown decomposition algorithm {algorithm!r}; choose from {sorted(ALGORITHMS)}")
    mat = as_matrix(weight.detach())
    if device is not None:
        mat = mat.to(device)
    if not torch.isfinite(mat).all():
        raise ValueError("weight has NaN or Inf entries; it cannot be decomposed")
    a, transpose = tall(mat)
    r = effective_rank(weight.shape, rank)
    f = None
    if r and algorithm in ("gram", "gram64") and use_truncated(a.shape[1], r):
        f = truncated_factors(a, r, fallback=True)
        ROUTE_COUNTS["truncated" if f is not None else "truncated->full"] += 1
    if f is None:
        U, S, V = ALGORITHMS[algorithm](a)
        f = (U[:, :r], S[:r], V[:, :r]) if r else (U, S, V)
    return TallFactors(f[0], f[1], f[2], transpose)


def decompose(
    weight: torch.Tensor,
    algorithm: str = "gram64",
    device: Optional[torch.device] = None,
    storage_dtype: torch.dtype = STORAGE_DTYPE,
    rank: int = 0,
) -> Decomposition:
    """Decompose one weight (Sec. 3.2, W = U Sigma V^T); the factors come back on the CPU.

    ``device``: where to compute (e.g. ComfyUI's compute device); float64 falls back to
    float32 SVD on devices without float64 support.  ``rank`` > 0: only the top ``rank``
    triplets (appendix E.1), without a full decomposition where that is cheaper.
    """
    return factors(weight, algorithm, device, rank).decomposition(tuple(weight.shape), storage_dtype)


# -- compact form (what the disk cache stores) ---------------------------------------------
@dataclass
class CompactFactors:
    """One weight's decomposition in the form the cache keeps: sigma, the small square factor, and
    the few columns of the tall factor that cannot be recomputed.

    With A the tall form of the weight matrix (W, or W^T when W is wide; ``transpose``),
    A = Ua diag(S) Va^T.  The first ``head`` columns of Ua are A Va diag(1/S) (recomputed from
    the weight whenever they are needed); ``U_tail`` holds the others (sigma below
    RECOMPUTE_MIN_RATIO sigma_1, or null directions), in float16.
    S: (j,) float32 descending; V = Va: (k, j) float32; U_tail: (p, j - head) or None.
    """

    S: torch.Tensor
    V: torch.Tensor
    U_tail: Optional[torch.Tensor]
    shape: tuple  # shape of the original weight tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def head(self) -> int:
        return self.rank - (int(self.U_tail.shape[1]) if self.U_tail is not None else 0)

    @property
    def transpose(self) -> bool:
        return tall_shape(self.shape)[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.V, self.U_tail) if t is not None)

    def parts(self) -> dict:
        out = {"S": self.S, "V": self.V}
        if self.U_tail is not None:
            out["U_tail"] = self.U_tail
        return out

    @classmethod
    def of(cls, f: TallFactors, shape: tuple) -> "CompactFactors":
        """The compact form of full or truncated tall factors (Ua is dropped but for its tail)."""
        d = compact_parts(f)
        return cls(d["S"], d["V"], d.get("U_tail"), tuple(shape))

    @classmethod
    def from_parts(cls, parts: dict, shape: tuple) -> "CompactFactors":
        """From stored parts; ValueError when they do not fit a weight of ``shape``."""
        (p, k), _ = tall_shape(shape)
        S, V, tail = parts["S"], parts["V"], parts.get("U_tail")
        n = int(S.shape[0]) if S.ndim == 1 else -1
        ok = n >= 0 and tuple(V.shape) == (k, n) and (tail is None or (tail.shape[0] == p and tail.shape[1] <= n))
        if not ok:
            raise ValueError("cached factors have the wrong shape")
        return cls(S.float(), V.float(), tail, tuple(shape))

    def truncate(self, j: int) -> "CompactFactors":
        """The first ``j`` triplets (views)."""
        if j <= 0 or j >= self.rank:
            return self
        t = min(self.head, j)
        tail = self.U_tail[:, : j - t] if j > t else None
        return CompactFactors(self.S[:j], self.V[:, :j], tail, self.shape)

    def expand(self, weight: torch.Tensor, device=None, storage_dtype: torch.dtype = STORAGE_DTYPE) -> Decomposition:
        """The :class:`Decomposition` of ``weight`` (the weight these factors are of): Ua = A Va diag(1/sigma)."""
        a, transpose = tall(as_matrix(weight.detach()))
        a = a.to(device).float() if device is not None else a.float()
        j, t = self.rank, self.head
        S = self.S.to(a.device, torch.float32)
        V = self.V.to(a.device, torch.float32)
        Ua = torch.empty(a.shape[0], j, dtype=torch.float32, device=a.device)
        Ua[:, :t] = (a @ V[:, :t]) / S[:t]
        if t < j:
            Ua[:, t:] = self.U_tail.to(a.device, torch.float32)
        return TallFactors(Ua, S, V, transpose).decomposition(tuple(weight.shape), storage_dtype)


def compact_parts(f: TallFactors) -> dict:
    """sigma, the small square factor Va (float32), and the columns of Ua that A Va / sigma cannot give.

    Columns with sigma_i < RECOMPUTE_MIN_RATIO sigma_1 (and null directions) are kept in float16
    as ``U_tail``; the rest of Ua is recomputed on load (:meth:`CompactFactors.expand`, or the
    residual through the weight, :func:`svdiff.shift.compact_residual`).
    """
    S = f.S.float()
    j = int(S.shape[0])
    t = int((S >= S[0] * RECOMPUTE_MIN_RATIO).sum()) if j and float(S[0]) > 0 else 0
    out = {"S": S.cpu().contiguous(), "V": f.Va.float().cpu().contiguous()}
    if t < j:
        out["U_tail"] = f.Ua[:, t:].to("cpu", STORAGE_DTYPE).contiguous()
    return out


def compact_nbytes(shape, rank: int = 0) -> int:
    """Bytes of the compact form of a weight of this shape (without any U_tail)."""
    k = num_singular_values(shape)
    j = effective_rank(shape, rank) or k
    return 4 * k * j + 4 * j


def compact_factors(weight: torch.Tensor, algorithm: str = "gram64", device: Optional[torch.device] = None,
                    rank: int = 0) -> CompactFactors:
    """The compact form of one weight's decomposition (Sec. 3.2), computed on ``device``.

    The default full-rank route (``gram64``) never forms the tall factor (:func:`_gram64_compact`:
    one float64 Gram product and its eigendecomposition); other algorithms, rank requests and
    rank-deficient weights go through :func:`factors`.
    """
    if algorithm == "gram64" and not effective_rank(weight.shape, rank):
        mat = as_matrix(weight.detach())
        if device is not None:
            mat = mat.to(device)
        if mat.device.type != "mps":
            if not torch.isfinite(mat).all():
                raise ValueError("weight has NaN or Inf entries; it cannot be decomposed")
            out = _gram64_compact(tall(mat)[0])
            if out is not None:
                ROUTE_COUNTS["gram64(compact)"] += 1
                return CompactFactors(*out, tuple(weight.shape))
    return CompactFactors.of(factors(weight, algorithm, device, rank), tuple(weight.shape))


def fingerprint(weight: torch.Tensor) -> str:
    """A content hash of a tensor (dtype, shape and bytes): the cache key of its SVD."""
    t = weight.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(weight.shape)}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()


# -- disk cap -------------------------------------------------------------------------------
DEFAULT_DISK_LIMIT = 8 << 30  # until a checkpoint's plan chooses one
AUTO_DISK_MIN = 1 << 30


def choose_disk_cap(need: int, free: int, used: int, user_cap: Optional[int] = None) -> tuple:
    """(cap in bytes, reason) for the SVD disk cache of a checkpoint whose compact factors take ``need``.

    ``free``: free bytes on the cache's filesystem; ``used``: bytes the cache already holds (it may
    grow into them again).  A user cap (SVDIFF_DISK_CACHE_GB) is kept, but never beyond the space
    there is.  Otherwise: room for this checkpoint and about three more of its size (at least
    1 GiB), never more than half of the space the cache could take (free + used).
    """
    avail = max(0, int(free) + int(used))
    if user_cap is not None:
        return min(int(user_cap), avail), "set by SVDIFF_DISK_CACHE_GB"
    cap = min(max(4 * int(need), AUTO_DISK_MIN), avail // 2)
    reason = "4x this checkpoint's factors" if cap == 4 * int(need) else (
        "the 1 GiB minimum" if cap == AUTO_DISK_MIN else "half of the free space")
    return cap, reason


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _free_bytes(folder: str) -> int:
    p = os.path.abspath(folder)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return 0


class SVDCache:
    """Decompositions keyed by weight fingerprint (and rank), in compact form: memory LRU + disk store.

    memory_limit: bytes of compact factors kept in memory (least recently used out first; 0 keeps
    none: every request is served from disk, which the OS page cache keeps in memory while it can).
    disk_dir: a folder for ``<fingerprint>[-r<rank>].safetensors`` files in compact form (None:
    no disk cache); disk_limit: bytes on disk, least recently used files out first; None lets
    :meth:`plan_disk` choose it per checkpoint from the free space (8 GiB until then).
    """

    def __init__(
        self,
        memory_limit: int = 4 << 30,
        disk_dir: Optional[str] = None,
        disk_limit: Optional[int] = DEFAULT_DISK_LIMIT,
        algorithm: str = "gram64",
    ):
        self.memory_limit = int(memory_limit)
        self.disk_dir = disk_dir
        self.user_disk_limit = None if disk_limit is None else int(disk_limit)
        self.disk_limit = DEFAULT_DISK_LIMIT if disk_limit is None else int(disk_limit)
        self.algorithm = algorithm
        self._mem: "OrderedDict[str, CompactFactors]" = OrderedDict()
        self._mem_bytes = 0
        self._lock = threading.RLock()
        self._plans: dict = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "computed": 0}

    # -- memory -------------------------------------------------------------
    def _remember(self, key: str, cf: CompactFactors) -> None:
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return
            n = cf.nbytes()
            if n > self.memory_limit:
                return  # a budget of 0 keeps nothing: the disk tier (and the OS page cache) serve reloads
            self._mem[key] = cf
            self._mem_bytes += n
            while self._mem_bytes > self.memory_limit and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._mem_bytes -= old.nbytes()

    def _recall(self, key: str) -> Optional[CompactFactors]:
        with self._lock:
            cf = self._mem.get(key)
            if cf is not None:
                self._mem.move_to_end(key)
            return cf

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    def __len__(self) -> int:
        return len(self._mem)

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()
            self._mem_bytes = 0

    # -- disk -----------------------------------------------------------------
    def _disk_path(self, key: str) -> Optional[str]:
        if not self.disk_dir:
            return None
        return os.path.join(self.disk_dir, key[:2], key + ".safetensors")

    def _load_disk(self, key: str, shape: tuple) -> Optional[CompactFactors]:
        """The entry ``key`` for a weight of ``shape``, or None; damaged files are removed."""
        path = self._disk_path(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            from safetensors.torch import load_file

            d = load_file(path)
            if "V" in d:
                cf = CompactFactors.from_parts(d, shape)
            else:  # the full float16 U, Vh files of earlier versions
                cf = _legacy_entry(d, shape)
            os.utime(path)  # least-recently-used bookkeeping
            return cf
        except Exception:
            try:
                os.remove(path)  # a damaged cache entry is recomputed, never trusted
            except OSError:
                pass
            return None

    def _store_disk(self, key: str, parts: dict) -> bool:
        """Write one entry; False when there is no disk tier or it could not be written."""
        path = self._disk_path(key)
        if path is None or self.disk_limit <= 0:
            return False
        from safetensors.torch import save_file

        from .fileio import atomic_write_via

        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_via(path, lambda tmp: save_file(parts, tmp, metadata={"format": "svdiff-svd-compact-1"}), overwrite=True)
        except OSError:
            return False  # a full or read-only disk only costs a recomputation next time
        self._trim_disk()
        return os.path.isfile(path)

    def _disk_entries(self) -> list:
        entries = []
        if not self.disk_dir or not os.path.isdir(self.disk_dir):
            return entries
        for root, _, files in os.walk(self.disk_dir):
            for f in files:
                if f.endswith(".safetensors"):
                    p = os.path.join(root, f)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    entries.append((st.st_mtime, st.st_size, p))
        return entries

    def _trim_disk(self) -> None:
        entries = self._disk_entries()
        total = sum(e[1] for e in entries)
        for _, size, p in sorted(entries):
            if total <= self.disk_limit:
                break
            try:
                os.remove(p)
                total -= size
            except OSError:
                pass

    def disk_bytes(self) -> int:
        return sum(e[1] for e in self._disk_entries())

    def plan_disk(self, shapes, label: str = "this checkpoint", rank: int = 0) -> Optional[int]:
        """Choose the disk cap for a checkpoint whose matrices have ``shapes``; one log line per new choice.

        Returns the cap in bytes (None without a disk cache).  See :func:`choose_disk_cap`.
        """
        if not self.disk_dir:
            return None
        shapes = [tuple(s) for s in shapes if len(tuple(s)) >= 2]
        need = sum(compact_nbytes(s, rank) for s in shapes)
        used = self.disk_bytes()
        free = _free_bytes(self.disk_dir)
        cap, reason = choose_disk_cap(need, free, used, self.user_disk_limit)
        with self._lock:
            self.disk_limit = cap
            memo = (label, need)
            if memo not in self._plans:
                self._plans[memo] = True
                fits = "" if need <= cap else "; it does not all fit: the least recently used factors are recomputed when needed"
                log.info("svdiff: SVD disk cache cap %s for %s (%s): its %d matrices need %s in compact form, "
                         "%s free on %s, %s cached%s", _size(cap), label, reason, len(shapes), _size(need),
                         _size(free), self.disk_dir, _size(used), fits)
        if used > cap:
            self._trim_disk()
        return cap

    # -- the entry points -------------------------------------------------------
    @staticmethod
    def _key(fp: str, r: int) -> str:
        return f"{fp}-r{r}" if r else fp

    def _lookup(self, fp: str, r: int, shape: tuple) -> Optional[CompactFactors]:
        """An entry for (fp, rank r) from memory or disk: its own, or the first r of a full one."""
        key = self._key(fp, r)
        for k_, trunc in ((key, 0), (fp, r)) if r else ((key, 0),):
            cf = self._recall(k_)
            if cf is not None:
                self.stats["memory_hits"] += 1
                return cf.truncate(trunc)
        for k_, trunc in ((key, 0), (fp, r)) if r else ((key, 0),):
            cf = self._load_disk(k_, shape)
            if cf is not None:
                self.stats["disk_hits"] += 1
                self._remember(k_, cf)
                return cf.truncate(trunc)
        return None

    def _keep(self, key: str, cf: CompactFactors) -> bool:
        """Store a new entry (disk, then memory); whether it can be found again later."""
        on_disk = self._store_disk(key, cf.parts())
        self._remember(key, cf)
        return on_disk or self._recall(key) is not None

    def has(self, fp: str, shape: tuple, rank: int = 0) -> bool:
        """Whether an entry for this weight (or a full one serving the rank) is in memory or on disk."""
        r = effective_rank(shape, rank)
        keys = (self._key(fp, r), fp) if r else (fp,)
        with self._lock:
            if any(k_ in self._mem for k_ in keys):
                return True
        paths = [self._disk_path(k_) for k_ in keys]
        return any(p is not None and os.path.isfile(p) for p in paths)

    def compact(self, weight: torch.Tensor, device: Optional[torch.device] = None, fp: Optional[str] = None,
                rank: int = 0) -> CompactFactors:
        """The compact factors of ``weight`` (an unpatched base weight): memory, disk, or computed and kept."""
        fp = fp or fingerprint(weight)
        r = effective_rank(weight.shape, rank)
        cf = self._lookup(fp, r, tuple(weight.shape))
        return cf if cf is not None else self._compute(weight, device, fp, r)[0]

    def _compute(self, weight: torch.Tensor, device, fp: str, r: int) -> tuple:
        """(new compact factors of ``weight``, whether the cache could keep them)."""
        cf = compact_factors(weight, self.algorithm, device=device, rank=r)
        self.stats["computed"] += 1
        return cf, self._keep(self._key(fp, r), cf)

    def ensure(self, weight: torch.Tensor, device: Optional[torch.device] = None, fp: Optional[str] = None,
               rank: int = 0) -> Optional[CompactFactors]:
        """Make the factors of ``weight`` available to a later :meth:`compact` without holding them.

        Computes and stores them unless an entry exists.  Returns None when the cache can serve
        them later, or the factors themselves when it cannot keep them (no disk tier and no room
        in memory, or a failed write): the caller must then hold them.
        """
        fp = fp or fingerprint(weight)
        r = effective_rank(weight.shape, rank)
        if self.has(fp, tuple(weight.shape), r):
            return None
        cf, kept = self._compute(weight, device, fp, r)
        return None if kept else cf

    def get(self, weight: torch.Tensor, device: Optional[torch.device] = None, fp: Optional[str] = None,
            rank: int = 0) -> Decomposition:
        """The full :class:`Decomposition` (U, S, Vh) of ``weight``, from cache when possible.

        ``rank`` > 0 (and below min(m, n)): only the top ``rank`` triplets, cached under their
        own key; a full entry in memory or on disk serves such a request too.  A cached entry is
        expanded through the weight (U = A V diag(1/sigma), one float32 product); a new one is
        computed in compact form (:func:`compact_factors`), kept, and expanded the same way.
        """
        return self.compact(weight, device=device, fp=fp, rank=rank).expand(weight, device)


def _legacy_entry(d: dict, shape: tuple) -> CompactFactors:
    """The compact form of an earlier version's file (float16 U and Vh of W)."""
    U, S, Vh = d["U"], d["S"], d["Vh"]
    k = num_singular_values(shape)
    if U.shape != (shape[0], k) or S.shape != (k,) or Vh.shape[0] != k:
        raise ValueError("cached factors have the wrong shape")
    transpose = tall_shape(shape)[1]
    Ua, Va = (Vh.t(), U) if transpose else (U, Vh.t())
    return CompactFactors.of(TallFactors(Ua.float(), S.float(), Va.float(), transpose), shape)


def time_decompositions(weights, algorithm: str) -> float:
    """Seconds to decompose every weight in ``weights`` (used by the benchmark)."""
    t0 = time.perf_counter()
    for w in weights:
        decompose(w, algorithm)
    return time.perf_counter() - t0
