"""Cost of a spectral shift per sampling step in ComfyUI's low-VRAM mode.

In low-VRAM mode ComfyUI leaves weights unpatched and calls calculate_weight on every
forward pass.  We load the SD1.5 UNet architecture with a tiny memory budget so every
module takes that path, and time UNet forwards (32x32 latent, batch 1) for: the base
model; the shifted model as the pack loads it by default (shifted weights patched once at
load by an ON_LOAD callback, then streamed like any weight); and ComfyUI's per-forward
path (SVDIFF_LOWVRAM_MERGE=0), first step and later steps with the adapter's residual
cache (SVDIFF_RESIDUAL_CACHE_MB).

    .venv/bin/python bench/bench_lowvram.py
"""

import time

import _common

_common.boot()
import torch  # noqa: E402
from svdiff_testkit.comfy_env import pack_module  # noqa: E402
from svdiff.shift import SpectralShift, delta_length  # noqa: E402

ad = pack_module("nodes.adapter")
shifts = pack_module("nodes.shifts")
mp = _common.sd15_patcher()
shapes = ad.shiftable_shapes(mp, "diffusion_model.")
g = torch.Generator().manual_seed(0)
sh = SpectralShift({k: torch.randn(delta_length(s), generator=g) * 0.01 for k, s in shapes.items()}, shapes, {})
t0 = time.perf_counter()
shifted, _ = shifts.apply_shift("bench", mp, None, sh, 1.0, 1.0, "bench")
print(f"attach shift (SVD of {len(shapes)} weights, cold or cached): {time.perf_counter() - t0:.1f} s")

x = torch.randn(1, 4, 32, 32, generator=g)
ctx = torch.randn(1, 77, 768, generator=g)


def steps(patcher, n):
    patcher.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False, full_load=False)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            with torch.no_grad():
                patcher.model.apply_model(x, torch.tensor([500.0]), c_crossattn=ctx)
            times.append(time.perf_counter() - t)
    finally:
        patcher.unpatch_model()
    return times


import os  # noqa: E402

base = steps(mp, 4)
b = sum(base[1:]) / 3
t0 = time.perf_counter()
shifted.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False, full_load=False)
merge_s = time.perf_counter() - t0
shifted.unpatch_model()
merged = steps(shifted, 4)  # default: shifted weights patched once at load (ON_LOAD callback)
os.environ["SVDIFF_LOWVRAM_MERGE"] = "0"
pack_settings = pack_module("nodes.settings")
pack_settings.reload()
per_forward = steps(shifted, 4)  # ComfyUI's own per-forward path with the adapter's residual cache
del os.environ["SVDIFF_LOWVRAM_MERGE"]
pack_settings.reload()
print(f"base step {b:.2f} s")
print(f"merged at load (default): steps {sum(merged[1:]) / 3:.2f} s ({sum(merged[1:]) / 3 / b:.2f}x, goal < 1.10x); "
      f"first step {merged[0]:.2f} s; the merge itself {merge_s:.1f} s once per load")
print(f"per-forward path: first step {per_forward[0]:.2f} s ({per_forward[0] / b:.2f}x), "
      f"later steps {sum(per_forward[2:]) / 2:.2f} s ({sum(per_forward[2:]) / 2 / b:.2f}x, residual cache)")
print(f"residual cache in use: {ad.RESIDUAL_BUDGET.used / 1e6:.0f} MB of {ad.RESIDUAL_BUDGET.limit / 1e6:.0f} MB")
