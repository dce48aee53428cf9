"""Cost of shift arithmetic on a full SD1.5 UNet + CLIP-L shift (shapes from meta-device models).

Prints seconds and the ratio to a baseline measured in the same run: deep-copying one shift
(the least any operation producing a new shift must do).  Also prints the kept fraction of a
random rank-4 LoRA projected onto a random base's singular basis for a few SD1.5 shapes.
Run: .venv/bin/python bench/bench_arithmetic.py
"""

import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from svdiff_testkit import comfy_env  # noqa: E402

comfy_env.register_pack_package(comfy_env.pack_module_name(tempfile.mkdtemp(prefix="svdiff-bench-")))

import torch  # noqa: E402

import svdiff.arithmetic as A  # noqa: E402
import svdiff.interchange as X  # noqa: E402
from svdiff.shift import SpectralShift, delta_length  # noqa: E402


def sd15_shapes():
    base = tempfile.mkdtemp(prefix="svdiff-bench-")
    comfy_env.boot(base)
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
               in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
               channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8,
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_resblock=False,
               use_temporal_attention=False, num_head_channels=-1)
    u = UNetModel(**cfg, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    shapes = {"diffusion_model." + k: tuple(v.shape) for k, v in u.state_dict().items() if k.endswith(".weight")}
    c = comfy.sd1_clip.SD1ClipModel(device=torch.device("meta"))
    shapes.update({k: tuple(v.shape) for k, v in c.state_dict().items() if k.endswith(".weight")})
    return shapes


def rand(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return SpectralShift({k: torch.randn(delta_length(s), generator=g) * 0.01 for k, s in shapes.items()}, dict(shapes), {"architecture": "SD15"})


def timed(fn, n=5):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    shapes = sd15_shapes()
    a, b = rand(shapes, 1), rand(shapes, 2)
    print(f"SD1.5 UNet + CLIP-L: {len(a)} weights, {a.num_values()} delta values")
    base = timed(lambda: a.copy())
    print(f"baseline copy: {base * 1e3:.1f} ms")
    for name, fn in [("add", lambda: A.add([a, b], [0.5, 0.5])), ("interpolate", lambda: A.interpolate([a, b], alpha=0.3)),
                     ("scale", lambda: A.scale(a, -1.0)), ("rank limit 4", lambda: A.rank_limit(a, 4)),
                     ("select (style preset)", lambda: A.select_layers(a, b, preset="style: geometry (16,down,1)-(8,mid,0)")),
                     ("cosine matrix 2x2", lambda: A.cosine_similarity_matrix([a, b]))]:
        t = timed(fn)
        print(f"{name:24s} {t * 1e3:8.1f} ms  ratio to copy {t / base:6.2f}")
    g = torch.Generator().manual_seed(0)
    for m, n in [(320, 768), (1280, 1280), (640, 5760)]:
        W = torch.randn(m, n, generator=g, dtype=torch.float64) / n ** 0.5
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        dW = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64) * 1e-3
        _, st = X.project_weight_delta(U, S, Vh, dW)
        print(f"random rank-4 LoRA on a {m}x{n} weight: kept fraction {st['kept'] / st['energy']:.5f} (1/max(m,n) = {1 / max(m, n):.5f})")


if __name__ == "__main__":
    main()
