"""Training bookkeeping for spectral shifts: optimizer, per-step randomness, resumable state.

* Two learning rates (appendix A): spectral shifts of 2-D/4-D kernels (about 1e-3) and the
  additive shifts of 1-D weights (about 1e-6).
* Every random draw of step s comes from a generator seeded by (seed, s, stream), and the
  data order from (seed, epoch): training N steps, saving, and resuming for N more gives the
  same bits as 2N steps in one run.
* The training state (delta in float32, optimizer moments, step, settings) is written beside
  a saved shift so that a run can be resumed.

Plain PyTorch.
"""

from __future__ import annotations

import json
import math

import torch

OPTIMIZERS = ("AdamW", "Adam", "SGD")
STATE_SUFFIX = ".train-state"  # safetensors inside; not listed as a shift file
_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


STREAM_DATA, STREAM_NOISE, STREAM_PRIOR_DATA, STREAM_PRIOR_GEN, STREAM_CUTMIX, STREAM_BUCKET = 1, 2, 3, 4, 5, 6


def generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The CPU generator of one step and purpose."""
    return torch.Generator().manual_seed(mix_seed(seed, step, stream))


def data_indices(seed: int, step: int, batch_size: int, n: int, stream: int = STREAM_DATA) -> list:
    """Indices of the samples of ``step``: epochs of seeded permutations of range(n)."""
    if n <= 0:
        return []
    out = []
    for j in range(batch_size):
        pos = step * batch_size + j
        epoch, at = divmod(pos, n)
        perm = torch.randperm(n, generator=generator(seed, epoch, stream + 100))
        out.append(int(perm[at]))
    return out


def timestep_draw(gen: torch.Generator, count: int, num_timesteps: int) -> torch.Tensor:
    """Uniform discrete timesteps t in [0, T) (Eq. 1: t ~ Uniform(1, T))."""
    return torch.randint(0, num_timesteps, (count,), generator=gen)


def make_optimizer(name: str, spectral: list, vectors: list, lr: float, lr_1d: float):
    """The optimizer with two parameter groups (spectral shifts, 1-D shifts)."""
    groups = []
    if spectral:
        groups.append({"params": spectral, "lr": lr, "name": "spectral"})
    if vectors:
        groups.append({"params": vectors, "lr": lr_1d, "name": "vector"})
    if not groups:
        raise ValueError("nothing to train")
    if name == "AdamW":
        return torch.optim.AdamW(groups)
    if name == "Adam":
        return torch.optim.Adam(groups)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rates for optimizer step ``step`` (0-based) of ``total``.

    Warmup: (step + 1) / warmup for the first ``warmup`` steps (never 0).  Then, with
    p = (step - warmup) / (total - warmup) in [0, 1): "constant" 1, "linear" 1 - p, "cosine"
    (1 + cos(pi p)) / 2.  A pure function of the step, so a resumed run continues the schedule
    exactly.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; one of {LR_SCHEDULES}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def set_learning_rates(optimizer, base_lrs: list, factor: float) -> None:
    """Each parameter group's learning rate = its base rate * ``factor`` (exactly the base at 1)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base if factor == 1.0 else base * factor


def state_path_for(shift_path: str) -> str:
    """Where the training state of a saved shift lives: <name>.train-state beside it (safetensors format)."""
    base = shift_path[: -len(".safetensors")] if shift_path.endswith(".safetensors") else shift_path
    return base + STATE_SUFFIX


def training_state(step: int, params: dict, optimizer, settings: dict) -> tuple[dict, dict]:
    """(tensors, metadata) of the resumable state: delta in float32 and the optimizer's moments."""
    tensors = {}
    index = {id(p): k for k, p in params.items()}
    for k, p in params.items():
        tensors[f"delta/{k}"] = p.detach().float().cpu().contiguous()
    for p, st in optimizer.state.items():
        k = index.get(id(p))
        if k is None:
            continue
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{name}/{k}"] = v.detach().cpu().contiguous().reshape(-1) if v.ndim == 0 else v.detach().cpu().contiguous()
    meta = {"step": str(int(step)), "settings": json.dumps(settings, sort_keys=True), "format": "svdiff-train-state", "version": "1"}
    return tensors, meta


def save_training_state(path: str, step: int, params: dict, optimizer, settings: dict) -> str:
    from safetensors.torch import save_file

    from .fileio import atomic_write_via

    tensors, meta = training_state(step, params, optimizer, settings)
    atomic_write_via(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=True)
    return path


def load_training_state(path: str) -> tuple[int, dict, dict, dict]:
    """(step, deltas, optimizer tensors by key -> {name: tensor}, settings) from a state file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "svdiff-train-state":
            raise ValueError(f"{path} is not an SVDiff training-state file")
        deltas, opt = {}, {}
        for name in f.keys():
            t = f.get_tensor(name)
            if name.startswith("delta/"):
                deltas[name[6:]] = t
            elif name.startswith("opt/"):
                _, field, key = name.split("/", 2)
                opt.setdefault(key, {})[field] = t
    if not all(torch.isfinite(t).all() for t in deltas.values()):
        raise ValueError(f"{path} holds NaN or Inf values")
    return int(meta.get("step", "0")), deltas, opt, json.loads(meta.get("settings", "{}"))


def restore_optimizer(optimizer, params: dict, opt_tensors: dict) -> int:
    """Put saved moments back into ``optimizer`` for the parameters in ``params``; returns how many."""
    n = 0
    for k, p in params.items():
        st = opt_tensors.get(k)
        if not st:
            continue
        state = {}
        for name, v in st.items():
            if name == "step":
                state[name] = v.reshape(()).clone().float()
            else:
                state[name] = v.clone().to(p.device, p.dtype)
        optimizer.state[p] = state
        n += 1
    return n


def settings_mismatch(saved: dict, current: dict, keys) -> list:
    """The settings among ``keys`` that differ between a saved state and the current run."""
    return [k for k in keys if k in saved and saved.get(k) != current.get(k)]
