"""SVDiff Train's memory plan for SD1.5, SDXL and Flux-dev, computed on the meta device.

    SVDIFF_COMFYUI=0.3.75 .venv/bin/python tools/memory_plan_table.py [--profiles] [--limit-gib 24]

Builds ComfyUI's own model classes with the configurations ComfyUI detects (weights in bf16,
nothing allocated) and prints the README table: the plan of ``svdiff.memory_plan`` per model,
subset/rank, resolution (batch 1 with prior preservation: 2 samples per forward, AdamW, bf16),
without and with gradient checkpointing, against a 24 GiB card.  ``--profiles`` re-measures
the activation profiles (``svdiff.memory_plan.PROFILES``) and prints them beside the table's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ROWS = [("SD15", "SD1.5", [("UNet", 0), ("UNet-CA", 0)]),
        ("SDXL", "SDXL", [("UNet", 0), ("UNet", 64), ("UNet-CA", 0)]),
        ("Flux", "Flux-dev", [("UNet", 0), ("UNet", 64), ("UNet-2D", 16)]),
        ("Flux", "Flux-dev fp8", [("UNet", 64), ("UNet-2D", 16)])]


def _boot():
    from svdiff_testkit import comfy_env

    argv = sys.argv[:]
    base = tempfile.mkdtemp(prefix="svdiff-plan-")
    comfy_env.prepare_base_dir(base)
    comfy_env.register_pack_package(comfy_env.pack_module_name(base))
    comfy_env.boot(base)
    sys.argv = argv
    return comfy_env


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim > 0 and v.is_floating_point()}


def table(limit_gib: float) -> list:
    import torch

    import svdiff.memory_plan as M
    from svdiff.subsets import select
    from svdiff_testkit import meta_models

    lines = ["| model | subset / rank | px | model | factors | deltas + grads | optimizer | activations (est.) | "
             "margin | total | checkpointed total | fits 24 GiB |", "|" + "---|" * 12]
    limit = limit_gib * M.GIB
    for fam, label, settings in ROWS:
        model = meta_models.build(fam, torch.float8_e4m3fn if label.endswith("fp8") else torch.bfloat16)
        shapes = _shapes(model)
        mbytes = M.tensor_bytes(model.state_dict().values())
        for subset, rank in settings:
            trained = {k: shapes[k] for k in select(shapes, subset)}
            for px in (512, 1024):
                p = M.PlanInputs(mbytes, shapes, trained, rank=rank, resolution=px, samples=2, architecture=fam)
                pl, ck = M.plan(p), M.plan(M.PlanInputs(**{**p.__dict__, "checkpointing": True}))
                fits = "yes" if pl.total <= limit else ("with checkpointing" if ck.total <= limit else "no")
                cells = [label, f"{subset} / {rank}", px] + [M.gib(b) for _, b in pl.parts()]
                lines.append("| " + " | ".join(str(c) for c in cells + [M.gib(pl.total), M.gib(ck.total), fits]) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", action="store_true")
    ap.add_argument("--limit-gib", type=float, default=24.0)
    a = ap.parse_args()
    _boot()
    if a.profiles:
        import svdiff.memory_plan as M
        from svdiff_testkit import meta_models

        for fam in meta_models.FAMILIES:
            print(fam, "measured:", meta_models.activation_profile(fam))
            print(fam, "table:   ", M.PROFILES[fam])
    print("\n".join(table(a.limit_gib)))


if __name__ == "__main__":
    main()
