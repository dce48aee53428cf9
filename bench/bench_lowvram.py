"""Cost of a spectral shift per sampling step in ComfyUI's low-VRAM mode.

In low-VRAM mode ComfyUI leaves weights unpatched and calls calculate_weight on every
forward pass.  We load the SD1.5 UNet architecture with a tiny memory budget so every
module takes that path, and time UNet forwards (32x32 latent, batch 1) for: the base
model, the shifted model on its first forward (residuals computed), and later forwards
(the adapter's residual cache, SVDIFF_RESIDUAL_CACHE_MB).

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


base = steps(mp, 4)
sh_t = steps(shifted, 4)
b = sum(base[1:]) / 3
first = sh_t[0]
later = sum(sh_t[2:]) / 2
print(f"base step {b:.2f} s | shifted first step {first:.2f} s ({first / b:.2f}x) | shifted cached steps {later:.2f} s ({later / b:.2f}x, goal < 1.10x)")
print(f"residual cache in use: {ad.RESIDUAL_BUDGET.used / 1e6:.0f} MB of {ad.RESIDUAL_BUDGET.limit / 1e6:.0f} MB")
