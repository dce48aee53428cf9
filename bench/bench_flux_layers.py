"""Flux-size decomposition, measured on one double and one single block and extrapolated.

Issue 16, item 7: one Flux.1 double-stream block and one single-stream block at their real
sizes (hidden 3072, 24 heads, MLP ratio 4; ComfyUI's own classes from ``comfy.ldm.flux.layers``,
random weights), every matrix decomposed cold with the route a load runs (``compact_factors``:
sigma and the small square factor, what the cache stores; the streamed load never forms U) and,
in the same run, the rank-64 truncated route; per layer: shape, seconds, U+V bytes (fp16, what a
full decomposition would hold, e.g. for training), the compact cache bytes.  The whole of Flux-dev has 19 double and 38 single blocks (plus
input/output layers that are small next to them), so the table extrapolates the two blocks by
those counts.  ``torch.linalg.svd`` on the largest matrix gives the baseline ratio in the same
run.  No GPU: on this 2-core CPU this takes a few minutes.
"""

from __future__ import annotations

import os
import time

import torch

from _common import boot, machine_line

DOUBLE, SINGLE = 19, 38  # Flux-dev's block counts


HIDDEN = int(os.environ.get("SVDIFF_BENCH_FLUX_HIDDEN", "3072"))  # smaller only to smoke-test this script


def blocks():
    import comfy.ops
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

    ops = comfy.ops.disable_weight_init
    g = torch.Generator().manual_seed(0)
    heads = max(1, HIDDEN // 128)
    with torch.no_grad():
        d = DoubleStreamBlock(HIDDEN, heads, mlp_ratio=4.0, qkv_bias=True, operations=ops)
        s = SingleStreamBlock(HIDDEN, heads, mlp_ratio=4.0, operations=ops)
        for m in (d, s):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return d, s


def measure(block, label: str) -> list:
    from svdiff.decompose import compact_factors, compact_nbytes, decompose, num_singular_values

    rows = []
    for name, p in block.named_parameters():
        if p.ndim < 2:
            continue
        w = p.detach()
        t0 = time.perf_counter()
        compact_factors(w)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        decompose(w, rank=64)
        t_r64 = time.perf_counter() - t0
        uv = (w.shape[0] + w[0].numel()) * num_singular_values(w.shape) * 2
        rows.append((f"{label}.{name}", tuple(w.shape), t_full, t_r64, uv, compact_nbytes(tuple(w.shape))))
    return rows


def main() -> None:
    boot()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from svdiff.decompose import compact_factors

    print(machine_line("before"))
    if HIDDEN != 3072:
        print(f"SMOKE RUN: hidden {HIDDEN}, not Flux's 3072; the extrapolation below is not Flux-dev's")
    d, s = blocks()
    rows = measure(d, "double") + measure(s, "single")
    print(f"{'layer':42s} {'shape':>16s} {'full s':>8s} {'r=64 s':>8s} {'U+V fp16':>10s} {'cache':>10s}")
    for name, shape, tf, tr, uv, cb in rows:
        print(f"{name:42s} {str(shape):>16s} {tf:8.2f} {tr:8.2f} {uv / 2**20:8.1f}Mi {cb / 2**20:8.1f}Mi")

    def total(prefix, i):
        return sum(r[i] for r in rows if r[0].startswith(prefix))

    print("\nextrapolated to Flux-dev (19 double + 38 single blocks; input/output layers not counted):")
    for label, i, unit, scale in (("cold decomposition, full", 2, "s", 1), ("cold decomposition, rank 64", 3, "s", 1),
                                  ("U+V held (fp16)", 4, "GiB", 2**30), ("compact disk cache", 5, "GiB", 2**30)):
        whole = (DOUBLE * total("double", i) + SINGLE * total("single", i)) / scale
        print(f"  {label:30s} {whole:10.2f} {unit}")
    biggest = max((p for p in d.parameters() if p.ndim >= 2), key=lambda p: p.numel()).detach()
    t0 = time.perf_counter()
    torch.linalg.svd(biggest.float(), full_matrices=False)
    t_svd = time.perf_counter() - t0
    t0 = time.perf_counter()
    compact_factors(biggest)
    t_gram = time.perf_counter() - t0
    print(f"\nlargest matrix {tuple(biggest.shape)}: torch.linalg.svd {t_svd:.2f} s, pack route {t_gram:.2f} s "
          f"(ratio {t_svd / t_gram:.2f}x, same run)")
    print(machine_line("after"))


if __name__ == "__main__":
    main()
