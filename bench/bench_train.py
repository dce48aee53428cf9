"""SVDiff Train step time and peak memory against ComfyUI's TrainLoraNode and a recompose baseline.

Fixed configuration (issue 3, "Benchmark"): the SD1.5 UNet architecture with random weights,
256x256 pixels (32x32 latents), one instance + one prior image per step, fp32, CPU, no
gradient checkpointing, AdamW.  Methods, each run in its OWN subprocess (so RSS peaks do
not mix) through the real node's ``execute`` under ``torch.inference_mode()`` as ComfyUI's
executor calls it:

* ``svdiff``     SVDiff Train, subset UNet, rank 0 (all singular values), route chosen per
                 layer by the node's cost model (``side_path=auto``);
* ``lora``       ComfyUI's own ``TrainLoraNode``, LoRA rank 8 (fp32 training and LoRA dtype),
                 the instance and prior latent as two LATENTs with ``batch_size=2``;
* ``recompose``  the full-matrix-recompose baseline of the public implementations
                 (W' = U diag(ReLU(sigma+delta)) V^T rebuilt on every forward): SVDiff Train with
                 ``side_path=recompose``.  It forms W + U diag(ReLU(sigma+delta) - sigma) V^T,
                 the same matrix in residual form, with the same m*n*k product per layer per
                 forward and the same weight gradient dW = g^T x in the backward pass;
* ``side``       (optional) SVDiff Train with the side path U(Delta * (V^T x)) forced everywhere.

Step time: the ComfyUI progress-bar hook stamps the end of every optimizer step (both nodes
report one tick per step); after ``--warmup`` steps the mean gap of the next ``--steps`` is
reported.  Peak memory: ``ru_maxrss`` at the end of the child minus its RSS right after the
model was built ("over model"), and the absolute high-water mark.

The SVD of every SD1.5 UNet weight is computed once by a ``warm`` child into the pack's disk
SVD cache under a fixed ComfyUI base directory (default ``build/bench_train``) that every
child reuses; decomposition time is reported on its own and never inside a step.

    .venv/bin/python bench/bench_train.py                   # full configuration (256 px)
    .venv/bin/python bench/bench_train.py --quick --steps 2 # 128 px, for development
    .venv/bin/python bench/bench_train.py --methods svdiff,lora,recompose,side
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_BASE = os.path.join(REPO, "build", "bench_train")
METHODS = ("svdiff", "lora", "recompose", "side")
LABELS = {
    "svdiff": "SVDiff Train (UNet, auto route)",
    "lora": "ComfyUI TrainLoraNode (LoRA r8)",
    "recompose": "Recompose baseline (W' rebuilt)",
    "side": "SVDiff Train (side path forced)",
}
RESULT_TAG = "BENCH_TRAIN_RESULT "


# ---------------------------------------------------------------------------------------
# child side
# ---------------------------------------------------------------------------------------
def rss_mb() -> float:
    """RSS as it stands (no garbage collection or heap trim first); NaN where /proc has none."""
    from svdiff_testkit.memory import rss_mb as read_rss  # tools/ is on sys.path once child_boot ran

    return read_rss(settle=False) or float("nan")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def child_boot(base: str):
    sys.path.insert(0, HERE)
    import _common  # noqa: F401  (puts tools/ on sys.path)
    from svdiff_testkit import comfy_env

    comfy_env.boot(base)
    return _common


def unet_matrix_keys(ad, subsets, mp) -> list:
    from svdiff.shift import is_spectral_shape

    shapes = ad.shiftable_shapes(mp, ad.UNET_PREFIX)
    return [k for k in subsets.select(shapes, "UNet") if is_spectral_shape(shapes[k])]


def child_warm(args) -> dict:
    """Decompose every UNet matrix of the benchmark model into the disk cache (or find it there)."""
    _common = child_boot(args.base)
    from svdiff_testkit.comfy_env import pack_module
    import comfy.model_management as mm
    import svdiff.subsets as subsets

    ad = pack_module("nodes.adapter")
    mp = _common.sd15_patcher(seed=args.seed)
    keys = unet_matrix_keys(ad, subsets, mp)
    cache = ad.svd_cache()
    t0 = time.perf_counter()
    for key in keys:
        w = ad.base_weight(mp, key)
        cache.get(w, device=mm.get_torch_device(), fp=ad.weight_fingerprint(w))
    return {"method": "warm", "seconds": time.perf_counter() - t0, "matrices": len(keys),
            "computed": cache.stats["computed"], "disk_hits": cache.stats["disk_hits"],
            "disk_mb": cache.disk_bytes() / 2**20}


def child_train(args) -> dict:
    _common = child_boot(args.base)
    import torch
    import comfy.utils
    from svdiff_testkit.comfy_env import pack_module

    method = args.method
    lat = args.resolution // 8
    mp = _common.sd15_patcher(seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    inst = torch.randn(1, 4, lat, lat, generator=g)
    prior = torch.randn(1, 4, lat, lat, generator=g)
    cond_inst = torch.randn(1, 77, 768, generator=g)
    cond_prior = torch.randn(1, 77, 768, generator=g)
    import gc

    gc.collect()
    rss_model = rss_mb()
    maxrss_build = maxrss_mb()

    ticks: list = []

    def hook(value, total, preview, node_id=None):
        ticks.append((time.perf_counter(), int(value), int(total)))

    comfy.utils.set_progress_bar_global_hook(hook)
    n_steps = args.warmup + args.steps
    extra = {}
    t_start = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        if method == "lora":
            import comfy_extras.nodes_train as NT

            out = NT.TrainLoraNode.execute(
                model=[mp], latents=[{"samples": inst}, {"samples": prior}],
                positive=[[[cond_inst, {}]], [[cond_prior, {}]]], batch_size=[2], grad_accumulation_steps=[1],
                steps=[n_steps], learning_rate=[5e-4], rank=[8], optimizer=["AdamW"], loss_function=["MSE"],
                seed=[args.seed], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
                gradient_checkpointing=[False], existing_lora=["[None]"])
            lora_sd = out.result[1]
            extra["trained_values"] = int(sum(p.numel() for p in lora_sd.values()))
            extra["loss"] = out.result[2]["loss"]
        else:
            train = pack_module("nodes.train")
            ad = pack_module("nodes.adapter")
            cache = ad.svd_cache()
            route = {"svdiff": "auto", "recompose": "recompose", "side": "side"}[method]
            out = train.SVDiffTrain.execute(
                model=[mp], latents=[{"samples": inst}], positive=[[[cond_inst, {}]]],
                prior_conditioning=[[[cond_prior, {}]]], prompt=["photo of a sks dog"], class_prompt=["photo of a dog"],
                prior_weight=[1.0], num_prior_images=[1], prior_steps=[1], subset=["UNet"], rank=[0],
                steps=[n_steps], batch_size=[1], learning_rate=[1e-3], learning_rate_1d=[1e-6], optimizer=["AdamW"],
                seed=[args.seed], resolution=[args.resolution], gradient_checkpointing=[False], training_dtype=["fp32"],
                side_path=[route], save_every=[0], filename_prefix=["bench/train"], resume_from=["[None]"],
                train_text_encoder=[False])
            shift = out.result[2]
            extra["trained_values"] = int(shift.num_values())
            extra["routes"] = shift.metadata["training"].get("routes")
            extra["loss"] = out.result[3]["loss"]
            extra["svd_computed"] = cache.stats["computed"]
            extra["svd_disk_hits"] = cache.stats["disk_hits"]
    t_total = time.perf_counter() - t_start
    comfy.utils.set_progress_bar_global_hook(None)

    # one tick per optimizer step: the last n_steps ticks whose total is n_steps, values 1..n
    ends = {}
    for t, v, tot in ticks:
        if tot == n_steps and 1 <= v <= n_steps:
            ends[v] = t
    if sorted(ends) != list(range(1, n_steps + 1)):
        raise RuntimeError(f"could not find one progress tick per step in {ticks[-n_steps - 3:]}")
    gaps = [ends[i + 1] - ends[i] for i in range(args.warmup, n_steps)] if args.warmup >= 1 else None
    if gaps is None:  # no warm-up: the first step is timed from the call, preparation included
        gaps = [ends[1] - t_start] + [ends[i + 1] - ends[i] for i in range(1, n_steps)]
    first = ends[1] - t_start
    return {
        "method": method, "resolution": args.resolution, "steps_timed": len(gaps),
        "step_s": sum(gaps) / len(gaps), "step_min_s": min(gaps), "step_max_s": max(gaps), "gaps": gaps,
        "first_step_incl_setup_s": first, "total_s": t_total,
        "rss_model_mb": rss_model, "maxrss_build_mb": maxrss_build, "maxrss_mb": maxrss_mb(),
        "peak_over_model_mb": maxrss_mb() - rss_model, "threads": torch.get_num_threads(), **extra,
    }


# ---------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------
def run_child(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--base", args.base,
           "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]
    env = dict(os.environ, SVDIFF_DISK_CACHE="1")
    env.setdefault("SVDIFF_DISK_CACHE_GB", "8")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            r["wall_s"] = time.perf_counter() - t0
            return r
    tail = "\n".join(p.stdout.splitlines()[-40:])
    raise SystemExit(f"the {method} child failed (exit {p.returncode}):\n{tail}")


def fmt_ratio(x: float, base: float) -> str:
    return f"{x / base:5.2f}x" if base > 0 else "  n/a"


def table(results: dict, args) -> str:
    lines = []
    L = results.get("lora")
    hdr = f"| {'method':33s} | s/step | vs LoRA | peak over model MB | vs LoRA | peak RSS MB | trained values | routes (side/recompose) |"
    lines += [hdr, "|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|"]
    for m in args.methods:
        r = results[m]
        routes = r.get("routes") or {}
        rt = f"{routes.get('side', 0)}/{routes.get('recompose', 0)}" if routes else "-"
        lines.append(
            f"| {LABELS[m]:33s} | {r['step_s']:6.2f} | {fmt_ratio(r['step_s'], L['step_s']) if L else 'n/a':>7s} | "
            f"{r['peak_over_model_mb']:18.0f} | {fmt_ratio(r['peak_over_model_mb'], L['peak_over_model_mb']) if L else 'n/a':>7s} | "
            f"{r['maxrss_mb']:11.0f} | {r['trained_values']:14d} | {rt:>23s} |")
    return "\n".join(lines)


def goals(results: dict) -> list:
    out = []
    S, L, R = results.get("svdiff"), results.get("lora"), results.get("recompose")
    if S and L:
        t, m = S["step_s"] / L["step_s"], S["peak_over_model_mb"] / L["peak_over_model_mb"]
        mt = S["maxrss_mb"] / L["maxrss_mb"]
        out.append(f"goal step time <= 1.5x LoRA: {t:.2f}x -> {'MET' if t <= 1.5 else 'NOT MET'}")
        out.append(f"goal peak memory <= 1.5x LoRA: {m:.2f}x over the model ({mt:.2f}x absolute RSS) -> "
                   f"{'MET' if m <= 1.5 else 'NOT MET'}")
    if S and R:
        t = S["step_s"] / R["step_s"]
        out.append(f"goal clearly faster than recompose (<= 0.8x its step time): {t:.2f}x -> {'MET' if t <= 0.8 else 'NOT MET'}")
    return out


def parent(args) -> None:
    os.makedirs(args.base, exist_ok=True)
    print(f"SD1.5 UNet architecture, random weights, {args.resolution}x{args.resolution} px "
          f"({args.resolution // 8}x{args.resolution // 8} latents), 1 instance + 1 prior per step, fp32, CPU, "
          f"no gradient checkpointing; {args.warmup} warm-up + {args.steps} timed steps; each method in its own process",
          flush=True)
    w = run_child("warm", args)
    state = "computed now" if w["computed"] else "already on disk"
    print(f"SVD of {w['matrices']} UNet matrices: {w['seconds']:.1f} s ({state}: {w['computed']} computed, "
          f"{w['disk_hits']} from disk; cache {w['disk_mb']:.0f} MB in {args.base}/user/svdiff_cache)", flush=True)
    results = {}
    for m in args.methods:
        print(f"running {m} ...", flush=True)
        r = run_child(m, args)
        results[m] = r
        print(f"  {m}: {r['step_s']:.2f} s/step (min {r['step_min_s']:.2f}, max {r['step_max_s']:.2f} over {r['steps_timed']}), "
              f"peak {r['maxrss_mb']:.0f} MB, model {r['rss_model_mb']:.0f} MB, first step incl. set-up "
              f"{r['first_step_incl_setup_s']:.1f} s, threads {r['threads']}"
              + (f", SVDs computed in the run: {r['svd_computed']}" if "svd_computed" in r else ""), flush=True)
    print()
    print(table(results, args))
    print()
    for line in goals(results):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "warm": w, "results": results}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128x128 px instead of 256x256 (development)")
    ap.add_argument("--resolution", type=int, default=0, help="pixels (multiple of 64); default 256, 128 with --quick")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per method")
    ap.add_argument("--methods", default="svdiff,lora,recompose,side", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=os.environ.get("SVDIFF_BENCH_BASE", DEFAULT_BASE),
                    help="ComfyUI base directory holding the disk SVD cache (reused across runs)")
    ap.add_argument("--json", default="", help="also write the raw results to this file")
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = ap.parse_args()
    if not args.resolution:
        args.resolution = 128 if args.quick else 256
    if args.resolution % 64:
        ap.error("--resolution must be a multiple of 64")
    args.base = os.path.abspath(args.base)
    if args.method:
        r = child_warm(args) if args.method == "warm" else child_train(args)
        print(RESULT_TAG + json.dumps(r), flush=True)
        return
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    parent(args)


if __name__ == "__main__":
    main()
