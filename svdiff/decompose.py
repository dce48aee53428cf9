"""Singular value decomposition of weight kernels, computed once and cached.

Sec. 3.2 of the paper: a weight tensor ``W_tensor`` of shape (c_out, c_in, h, w) is
reshaped to the matrix W = reshape(W_tensor) of shape (c_out, c_in*h*w) (as in FSGAN),
and decomposed as W = U diag(sigma) V^T with sigma in descending order.  "The SVD is a
one-time computation and can be cached": :class:`SVDCache` keeps decompositions in
memory (bounded, least recently used out first) and optionally on disk, keyed by a
fingerprint of the weight's bytes.

Two algorithms give the same factors:

* ``"svd"``: ``torch.linalg.svd`` in float32 (the reference);
* ``"gram"``: eigendecomposition of the Gram matrix of the smaller side in float64
  (W^T W = V diag(sigma^2) V^T), then U = W V diag(1/sigma), completed by a QR where
  sigma is numerically zero.  For the wide and tall matrices of a UNet it is 2-3x faster
  on a CPU than ``torch.linalg.svd`` and at least as accurate; see
  ``bench/bench_decompose.py``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

STORAGE_DTYPE = torch.float16  # U and V^T are stored in half precision (see residual form)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Reshape a 2-D or 4-D (or any >=2-D) kernel to (c_out, c_in*kh*kw), as FSGAN does."""
    if weight.ndim < 2:
        raise ValueError(f"a weight with {weight.ndim} dimension(s) has no spectral decomposition")
    return weight.reshape(weight.shape[0], -1)


def num_singular_values(shape) -> int:
    """min(m, n) of the reshaped matrix of a kernel of this shape."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"shape {shape} has no spectral decomposition")
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return min(int(shape[0]), n)


@dataclass
class Decomposition:
    """W = U diag(S) Vh for the reshaped matrix of one weight.

    U: (m, k), S: (k,) float32 descending, Vh: (k, n), with k = min(m, n).
    U and Vh are usually stored in float16; S always in float32.
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

    def reconstruct(self) -> torch.Tensor:
        """U diag(S) Vh in float32, reshaped to the weight's shape."""
        U = self.U.float()
        Vh = self.Vh.float()
        return ((U * self.S.float()) @ Vh).reshape(self.shape)


def _svd_reference(m: torch.Tensor):
    U, S, Vh = torch.linalg.svd(m.float(), full_matrices=False)
    return U, S, Vh


def _svd_gram(m: torch.Tensor):
    """SVD through the float64 Gram matrix of the smaller side.

    For a wide matrix (m < n) decompose W^T instead, so the Gram matrix is always k x k
    with k = min(m, n): W^T W = V diag(sigma^2) V^T (``eigh``), sigma_i = sqrt(lambda_i),
    and U = W V diag(1/sigma) -- one matrix product instead of a QR.  Columns whose sigma is
    numerically zero (rank-deficient weights) have no defined direction; they are completed
    to an orthonormal basis by a QR, so U is always orthonormal.
    """
    transpose = m.shape[0] < m.shape[1]
    a = (m.t() if transpose else m).double()  # tall: (p, k) with p >= k
    evals, evecs = torch.linalg.eigh(a.t() @ a)
    S = evals.flip(0).clamp_min(0).sqrt()
    V = evecs.flip(1)
    k = S.shape[0]
    tol = S[0] * max(a.shape) * 1e-12 if k else 0.0
    good = int((S > tol).sum()) if k else 0
    U = torch.empty(a.shape[0], k, dtype=torch.float64, device=a.device)
    U[:, :good] = (a @ V[:, :good]) / S[:good]
    if good < k:  # complete the basis for the null directions
        fill = torch.randn(a.shape[0], k - good, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(a.device)
        q, _ = torch.linalg.qr(torch.cat([U[:, :good], fill], dim=1))
        U[:, good:] = q[:, good:]
        S[good:] = 0.0
    if transpose:
        # W = a^T = V diag(S) U^T
        return V.float(), S.float(), U.t().float()
    return U.float(), S.float(), V.t().float()


ALGORITHMS: dict[str, Callable] = {"svd": _svd_reference, "gram": _svd_gram}


def decompose(
    weight: torch.Tensor,
    algorithm: str = "gram",
    device: Optional[torch.device] = None,
    storage_dtype: torch.dtype = STORAGE_DTYPE,
) -> Decomposition:
    """Decompose one weight (Sec. 3.2, W = U Sigma V^T); the factors come back on the CPU.

    ``device``: where to compute (e.g. ComfyUI's compute device); float64 falls back to
    float32 SVD on devices without float64 support.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown decomposition algorithm {algorithm!r}; choose from {sorted(ALGORITHMS)}")
    mat = as_matrix(weight.detach())
    if device is not None:
        mat = mat.to(device)
    if not torch.isfinite(mat).all():
        raise ValueError("weight has NaN or Inf entries; it cannot be decomposed")
    fn = ALGORITHMS[algorithm]
    if algorithm == "gram" and mat.device.type == "mps":  # no float64 there
        fn = _svd_reference
    U, S, Vh = fn(mat)
    return Decomposition(
        U.to("cpu", storage_dtype).contiguous(),
        S.to("cpu", torch.float32).contiguous(),
        Vh.to("cpu", storage_dtype).contiguous(),
        tuple(weight.shape),
    )


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


class SVDCache:
    """Decompositions keyed by weight fingerprint: memory LRU + optional disk store.

    memory_limit: bytes of U, S, Vh kept in memory (least recently used out first).
    disk_dir: a folder for ``<fingerprint>.safetensors`` files (None: no disk cache);
    disk_limit: bytes on disk; the least recently used files go first.
    """

    def __init__(
        self,
        memory_limit: int = 4 << 30,
        disk_dir: Optional[str] = None,
        disk_limit: int = 8 << 30,
        algorithm: str = "gram",
    ):
        self.memory_limit = int(memory_limit)
        self.disk_dir = disk_dir
        self.disk_limit = int(disk_limit)
        self.algorithm = algorithm
        self._mem: "OrderedDict[str, Decomposition]" = OrderedDict()
        self._mem_bytes = 0
        self._lock = threading.RLock()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "computed": 0}

    # -- memory -------------------------------------------------------------
    def _remember(self, fp: str, dec: Decomposition) -> None:
        with self._lock:
            if fp in self._mem:
                self._mem.move_to_end(fp)
                return
            self._mem[fp] = dec
            self._mem_bytes += dec.nbytes()
            while self._mem_bytes > self.memory_limit and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._mem_bytes -= old.nbytes()

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
    def _disk_path(self, fp: str) -> Optional[str]:
        if not self.disk_dir:
            return None
        return os.path.join(self.disk_dir, fp[:2], fp + ".safetensors")

    def _load_disk(self, fp: str, shape: tuple) -> Optional[Decomposition]:
        path = self._disk_path(fp)
        if path is None or not os.path.isfile(path):
            return None
        try:
            from safetensors.torch import load_file

            d = load_file(path)
            dec = Decomposition(d["U"], d["S"], d["Vh"], tuple(shape))
            k = num_singular_values(shape)
            if dec.U.shape != (shape[0], k) or dec.S.shape != (k,) or dec.Vh.shape[0] != k:
                raise ValueError("cached factors have the wrong shape")
            os.utime(path)  # least-recently-used bookkeeping
            return dec
        except Exception:
            try:
                os.remove(path)  # a damaged cache entry is recomputed, never trusted
            except OSError:
                pass
            return None

    def _store_disk(self, fp: str, dec: Decomposition) -> None:
        path = self._disk_path(fp)
        if path is None:
            return
        from safetensors.torch import save_file

        from .fileio import atomic_write_via

        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            atomic_write_via(path, lambda tmp: save_file({"U": dec.U, "S": dec.S, "Vh": dec.Vh}, tmp), overwrite=True)
        except OSError:
            return  # a full or read-only disk only costs a recomputation next time
        self._trim_disk()

    def _trim_disk(self) -> None:
        if not self.disk_dir or not os.path.isdir(self.disk_dir):
            return
        entries = []
        for root, _, files in os.walk(self.disk_dir):
            for f in files:
                if f.endswith(".safetensors"):
                    p = os.path.join(root, f)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    entries.append((st.st_mtime, st.st_size, p))
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
        if not self.disk_dir or not os.path.isdir(self.disk_dir):
            return 0
        return sum(
            os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(self.disk_dir) for f in fs if f.endswith(".safetensors")
        )

    # -- the entry point --------------------------------------------------------
    def get(self, weight: torch.Tensor, device: Optional[torch.device] = None, fp: Optional[str] = None) -> Decomposition:
        """The decomposition of ``weight`` (an unpatched base weight), from cache when possible."""
        fp = fp or fingerprint(weight)
        with self._lock:
            dec = self._mem.get(fp)
            if dec is not None:
                self._mem.move_to_end(fp)
                self.stats["memory_hits"] += 1
                return dec
        dec = self._load_disk(fp, tuple(weight.shape))
        if dec is not None:
            self.stats["disk_hits"] += 1
        else:
            dec = decompose(weight, self.algorithm, device=device)
            self.stats["computed"] += 1
            self._store_disk(fp, dec)
        self._remember(fp, dec)
        return dec


def time_decompositions(weights, algorithm: str) -> float:
    """Seconds to decompose every weight in ``weights`` (used by the benchmark)."""
    t0 = time.perf_counter()
    for w in weights:
        decompose(w, algorithm)
    return time.perf_counter() - t0
