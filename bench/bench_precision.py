"""Precision drift table: a spectral shift on the tiny SD1-architecture UNet stored in every weight
format the running ComfyUI loads (bf16, fp16, plain and scaled fp8, quantized layouts).

Per format, against the float32 model in the same run:
- format error: relative error of the unpatched forward (what the format costs by itself);
- patched error: relative error of the forward with the shift applied (goal: <= 1.5x format error);
- change error: relative error of the change the shift makes (patched - unpatched);
- 1-D survival: mean |delta output| of a norm layer under a 5e-4 shift of its scale, as a ratio of
  float32's (goal 0.9..1.1), with the pack's float32 norm weights and, as the baseline, with
  ComfyUI's own cast to the activation dtype (the injection switched off).

Usage: .venv/bin/python bench/bench_precision.py   (part of `make bench`; CPU, about a minute)
"""

from __future__ import annotations

import os
import time

import torch

from _common import boot

NORM_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm2.weight"
KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight",
        "diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight"]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def shift_for(adapter, mp, keys, scale, seed=1):
    from svdiff.shift import SpectralShift, delta_length

    shapes = adapter.shiftable_shapes(mp, "diffusion_model.")
    g = torch.Generator().manual_seed(seed)
    return SpectralShift({k: torch.randn(delta_length(shapes[k]), generator=g) * scale for k in keys},
                         {k: shapes[k] for k in keys}, {"architecture": "TinySD"})


def main():
    boot()
    from svdiff_testkit import comfy_env
    from svdiff_testkit import quantized as Q
    from svdiff_testkit.probes import unet_forward

    adapter, shifts, compat = (comfy_env.pack_module(m) for m in ("nodes.adapter", "nodes.shifts", "nodes.comfy_compat"))

    def fwd(mp):
        with torch.inference_mode():
            return unet_forward(mp, grad_mode=torch.inference_mode).float()

    def apply(mp, sh):
        with torch.inference_mode():
            return shifts.apply_shift("bench", mp, None, sh, 1.0, 1.0, "bench")[0]

    def norm_change(mp, sh):
        module = mp.get_model_object(NORM_KEY[: -len(".weight")])
        got = []
        h = module.register_forward_hook(lambda m, i, o: got.append(o.detach().float().clone()))
        try:
            fwd(mp)
            fwd(apply(mp, sh))
        finally:
            h.remove()
        return float((got[1] - got[0]).abs().mean())

    print(f"ComfyUI {comfy_env.comfy_version(comfy_env.comfy_path())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f} "
          "(other sessions share this machine)")
    t0 = time.perf_counter()
    ref = Q.build("fp32")
    sh, sh1 = shift_for(adapter, ref, KEYS, 0.3), shift_for(adapter, ref, [NORM_KEY], 5e-4)
    base_ref, out_ref = fwd(ref), fwd(apply(ref, sh))
    n_ref = norm_change(ref, sh1)
    rows = []
    for fmt in Q.ALL:
        reason = Q.missing(fmt)
        if reason:
            rows.append((fmt, "-", reason))
            continue
        low = Q.build(fmt)
        base, out = fwd(low), fwd(apply(low, sh))
        f_err, p_err, c_err = rel(base, base_ref), rel(out, out_ref), rel(out - base, out_ref - base_ref)
        n_new = norm_change(low, sh1) / n_ref
        inject = adapter.NormShiftsFP32.inject
        adapter.NormShiftsFP32.inject = lambda self, patcher: None  # ComfyUI's own cast: the baseline
        try:
            n_old = norm_change(Q.build(fmt), sh1) / n_ref
        finally:
            adapter.NormShiftsFP32.inject = inject
        goal = "met" if p_err <= 1.5 * f_err + 2e-3 and 0.9 <= n_new <= 1.1 else "NOT met"
        rows.append((fmt, compat.weight_format(low, KEYS[0]),
                     f"{f_err:8.4f} {p_err:8.4f} {c_err:8.4f}   {n_new:6.3f} {n_old:6.3f}   {goal}"))
    print(f"\n{'format':16} {'stored as':26} {'format':>8} {'patched':>8} {'change':>8}   {'1-D':>6} {'1-D':>6}")
    print(f"{'':16} {'':26} {'error':>8} {'error':>8} {'error':>8}   {'pack':>6} {'cast':>6}   goal")
    for fmt, stored, text in rows:
        print(f"{fmt:16} {stored:26} {text}")
    print(f"\n1-D columns: mean |delta output| of {NORM_KEY.split('.', 1)[1]} under a 5e-4 shift, as a ratio of "
          "float32's (pack: float32 norm weights; cast: ComfyUI's cast to the activation dtype). "
          "Goal: patched error <= 1.5x format error + 0.002 and 1-D ratio in 0.9..1.1.")
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
