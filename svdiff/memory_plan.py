"""The device memory a spectral-shift training run needs, planned before any work.

A run holds, at its peak (one training step):

=================  ==========================================================  ============
part               what                                                        how known
=================  ==========================================================  ============
model              the base weights as loaded (their own dtype: fp32, bf16,    exact
                   fp8 ...), UNet/DiT and, when it trains, the text encoder
factors            U (m, r), sigma (r) and V^T (r, n) of every trained matrix  exact
                   weight (Eq. 2; r = min(m, n), or the rank of appendix E.1),
                   U and V^T in the dtype the decomposition is held in
deltas             delta (fp32, Eq. 2 / the 1-D additive shifts) and its      exact
                   gradient
optimizer          Adam/AdamW: two fp32 moments per delta value; SGD (no       exact
                   momentum, as the pack makes it): none
activations        what autograd keeps for the backward pass at the training   estimate
                   resolution and batch (instance + prior samples)
margin             transient buffers of one layer's forward/backward and the  heuristic
                   allocator's rounding: 10 % of the above, at least 256 MiB
=================  ==========================================================  ============

**Activations** are an estimate from an :class:`ActivationProfile` per model family:
the bytes autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``
during one forward pass of ComfyUI's own model class on the meta device (nothing allocated),
at 512 and 1024 px in a 2-byte dtype, attention counted as a fused (flash / memory-efficient)
kernel keeps it: q, k, v, output and a float32 log-sum-exp row (what PyTorch's SDPA keeps on a
GPU).  Two passes bound it: every weight frozen (only the input-gradient path: what the pack's
frozen layers keep) and every weight trained (every Linear/Conv also keeps its input, as the
recompose route does).  The plan interpolates between them by the share of matrix-weight
elements trained.  With gradient checkpointing it is the inputs kept at each checkpointed block
plus the largest block's own activations (recomputed in the backward pass).  Between the two
measured resolutions and beyond, the bytes are linear in the pixel count (the attention kernels
are linear in memory).  Not counted: the CUDA context and libraries (already outside the free
memory a device reports), cuDNN/cuBLAS workspaces, the VAE and text encoders when they are
loaded only to encode the data before training, and attention kernels that keep the full
attention matrix (ComfyUI's sub-quadratic/split attention on some setups).
``tools/memory_plan_table.py`` re-measures the profiles and prints the README table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import torch

from .decompose import STORAGE_DTYPE
from .shift import delta_length, is_spectral_shape

GIB = float(1 << 30)
MIB = 1 << 20

#: Optimizer state values kept per trained value (``svdiff.training.make_optimizer``).
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "SGD": 0}

#: Ranks tried, largest first, when a plan does not fit (0 = all singular values).
FALLBACK_RANKS = (0, 256, 128, 64, 32, 16, 8, 4)


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


# ---------------------------------------------------------------------------------------
# Exact parts
# ---------------------------------------------------------------------------------------
def _matrix(shape) -> tuple:
    m, n = int(shape[0]), 1
    for s in shape[1:]:
        n *= int(s)
    return m, n


def factor_bytes(shapes: dict, rank: int = 0, factor_dtype: torch.dtype = STORAGE_DTYPE) -> int:
    """Bytes of U[:, :r], sigma[:r] (float32) and V^T[:r] of every matrix weight in ``shapes``
    (key -> weight shape; Eq. 2 with r of appendix E.1); 1-D weights hold no factors."""
    es = torch.empty((), dtype=factor_dtype).element_size()
    total = 0
    for shape in shapes.values():
        if is_spectral_shape(shape):
            m, n = _matrix(shape)
            r = delta_length(shape, rank)
            total += (m + n) * r * es + r * 4
    return total


def delta_values(shapes: dict, rank: int = 0) -> int:
    """Number of trained values: len(delta) per matrix weight, the size of each 1-D weight."""
    return sum(delta_length(s, rank) for s in shapes.values())


def matrix_elements(shapes: dict) -> int:
    return sum(_matrix(s)[0] * _matrix(s)[1] for s in shapes.values() if is_spectral_shape(s))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of tensors as stored (works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------
# Activations (estimate)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationProfile:
    """Saved-for-backward bytes of one sample (2-byte dtype) as ``const + per_pixel * pixels``,
    for the frozen and the all-trained bound, without and with gradient checkpointing.
    Each pair is (const, per_pixel), measured at 512 and 1024 px (see the module doc)."""

    frozen: tuple
    trained: tuple
    frozen_ckpt: tuple
    trained_ckpt: tuple

    def bytes(self, pixels: int, trained_share: float, checkpointing: bool) -> float:
        lo, hi = (self.frozen_ckpt, self.trained_ckpt) if checkpointing else (self.frozen, self.trained)
        a = lo[0] + lo[1] * pixels
        b = hi[0] + hi[1] * pixels
        return max(0.0, a + (b - a) * min(1.0, max(0.0, trained_share)))


def linear_fit(pixels: tuple, values: tuple) -> tuple:
    """(const, per_pixel) through two measurements."""
    (p0, p1), (v0, v1) = pixels, values
    slope = (v1 - v0) / (p1 - p0)
    return (float(v0 - slope * p0), float(slope))


#: Measured by ``tools/memory_plan_table.py`` (ComfyUI 0.3.75 model classes on the meta device,
#: bf16, one sample, 512 and 1024 px; Flux with 256 text tokens); (const bytes, bytes per pixel).
PROFILES: dict = {
    "SD15": ActivationProfile(frozen=(3_851_648, 2941.04), trained=(4_034_560, 3557.92),
                              frozen_ckpt=(98_688, 539.0), trained_ckpt=(224_640, 609.0)),
    "SDXL": ActivationProfile(frozen=(25_631_488, 5064.97), trained=(26_009_472, 6544.97),
                              frozen_ckpt=(3_942_528, 774.42), trained_ckpt=(3_955_328, 954.42)),
    "Flux": ActivationProfile(frozen=(1_199_601_664, 18358.53), trained=(2_374_058_496, 36191.03),
                              frozen_ckpt=(26_839_040, 433.66), trained_ckpt=(47_648_768, 749.69)),
}

#: ComfyUI model-config class name -> profile family.
FAMILIES = {"SD15": "SD15", "SD20": "SD15", "SD21UnclipL": "SD15", "SD21UnclipH": "SD15", "SDXL": "SDXL",
            "SDXLRefiner": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "Flux": "Flux", "FluxSchnell": "Flux"}
FALLBACK_FAMILY = "SDXL"


def profile_for(architecture: str) -> tuple:
    """(family name, profile, note): the profile of ``architecture``, else the fallback family's."""
    fam = FAMILIES.get(architecture)
    if fam in PROFILES:
        return fam, PROFILES[fam], ""
    return FALLBACK_FAMILY, PROFILES[FALLBACK_FAMILY], f"no activation profile for {architecture}: {FALLBACK_FAMILY}'s is used"


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanInputs:
    """What a plan depends on (shapes: key -> base-weight shape)."""

    model_bytes: int                 # every weight loaded for training (exact, as loaded)
    all_shapes: dict                 # every shiftable weight of the model (for the trained share)
    trained_shapes: dict             # the weights the subset trains
    rank: int = 0
    optimizer: str = "AdamW"
    resolution: int = 512
    samples: int = 1                 # samples per forward: batch (x2 with prior preservation)
    compute_bytes: int = 2           # element size of the training dtype
    checkpointing: bool = False
    architecture: str = "SD15"
    factor_dtype: torch.dtype = STORAGE_DTYPE
    extra_shapes: dict = field(default_factory=dict)  # trained text-encoder weights (not in the share)


@dataclass(frozen=True)
class MemoryPlan:
    model: int
    factors: int
    deltas: int
    optimizer: int
    activations: int
    margin: int
    family: str
    note: str = ""

    @property
    def total(self) -> int:
        return self.model + self.factors + self.deltas + self.optimizer + self.activations + self.margin

    def parts(self) -> list:
        return [("model", self.model), ("factors", self.factors), ("deltas+grads", self.deltas),
                ("optimizer", self.optimizer), ("activations (est.)", self.activations), ("margin", self.margin)]

    def line(self) -> str:
        return "memory plan: " + ", ".join(f"{n} {gib(b)}" for n, b in self.parts()) + f" = {gib(self.total)}"


def plan(p: PlanInputs) -> MemoryPlan:
    """The memory plan of a run (see the module doc for what is exact and what estimated)."""
    trained = dict(p.trained_shapes)
    trained.update(p.extra_shapes)
    factors = factor_bytes(trained, p.rank, p.factor_dtype)
    values = delta_values(trained, p.rank)
    deltas = values * 4 * 2  # fp32 delta and its fp32 gradient
    opt = values * 4 * OPTIMIZER_STATES.get(p.optimizer, 2)
    family, prof, note = profile_for(p.architecture)
    every = matrix_elements(p.all_shapes)
    share = matrix_elements(p.trained_shapes) / every if every else 1.0
    per_sample = prof.bytes(p.resolution * p.resolution, share, p.checkpointing)
    acts = int(per_sample * p.samples * p.compute_bytes / 2)
    base = p.model_bytes + factors + deltas + opt + acts
    margin = max(256 * MIB, base // 10)
    return MemoryPlan(p.model_bytes, factors, deltas, opt, acts, margin, family, note)


# ---------------------------------------------------------------------------------------
# Fitting a device
# ---------------------------------------------------------------------------------------
def device_free_bytes(device) -> Optional[int]:
    """Bytes a training run may use on ``device``: CUDA's free memory (``mem_get_info``) plus
    what this process's allocator holds (models ComfyUI can unload, cached blocks).  None where
    no limit is known (the CPU, other backends)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev))


@dataclass(frozen=True)
class Fit:
    """A setting that fits: subset, rank, trained values and its plan."""

    subset: str
    rank: int
    values: int
    plan: MemoryPlan

    def describe(self) -> str:
        r = f"rank {self.rank}" if self.rank else "rank 0 (all singular values)"
        return f"subset {self.subset} at {r} ({gib(self.plan.total)})"


def fitting_settings(p: PlanInputs, limit: int, subsets: dict) -> list:
    """Settings that fit ``limit``, most trained values first: for every subset
    (name -> its trained shapes) the largest rank of ``FALLBACK_RANKS`` whose plan fits."""
    out = []
    for name, shapes in subsets.items():
        if not shapes:
            continue
        for r in FALLBACK_RANKS:
            q = replace(p, trained_shapes=shapes, rank=r)
            pl = plan(q)
            if pl.total <= limit:
                out.append(Fit(name, r, delta_values(shapes, r), pl))
                break
    out.sort(key=lambda f: -f.values)
    return out


def refusal(p: PlanInputs, pl: MemoryPlan, limit: int, subsets: dict, current: str) -> str:
    """Why the plan does not fit and what does: the same subset at a lower rank, the largest
    fitting subset, or (when no subset fits) gradient checkpointing / a lower resolution."""
    head = f"the run needs about {gib(pl.total)} but {gib(limit)} is free on the device ({pl.line()})"
    fits = fitting_settings(p, limit, subsets)
    same = [f for f in fits if f.subset == current]
    tips = []
    if same:
        tips.append(same[0].describe())
    best = next((f for f in fits if f.subset != current), None)
    if best is not None and (not same or best.values > same[0].values):
        tips.append(best.describe())
    if tips:
        return f"{head}. Fits: {' or '.join(tips)}"
    if not p.checkpointing:
        ck = fitting_settings(replace(p, checkpointing=True), limit, subsets)
        if ck:
            return f"{head}. Fits with gradient_checkpointing on: {ck[0].describe()}"
    return (f"{head}. No subset or rank fits: the model and activations alone need more; lower the resolution "
            "or batch_size, turn on gradient_checkpointing, or load the model in a smaller dtype")
