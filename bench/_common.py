"""Shared set-up for the benchmarks: boot ComfyUI, build SD1.5-architecture models with random weights."""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tools"))

from svdiff_testkit import comfy_env  # noqa: E402

SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_attention=False, use_temporal_resblock=False)


def boot():
    # SVDIFF_BENCH_BASE reuses a ComfyUI base folder (and the SVD disk cache under its user/)
    base = os.environ.get("SVDIFF_BENCH_BASE") or tempfile.mkdtemp(prefix="svdiff-bench-")
    return comfy_env.boot(base)


def sd15_patcher(seed: int = 0, dtype=None):
    """A ModelPatcher of the SD1.5 UNet architecture with random (initialised) weights."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as SM
    from svdiff_testkit.tiny import init_weights

    cfg = SM.SD15(dict(SD15_UNET))
    cfg.set_inference_dtype(dtype or torch.float32, None)
    with torch.inference_mode(False):
        model = cfg.get_model({})
        init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def machine_line(label: str = "") -> str:
    """One line on what else ran on this (shared) machine: load average and the busiest other processes."""
    import subprocess

    load = os.getloadavg()
    try:
        ps = subprocess.run(["ps", "-eo", "pid=,pcpu=,comm=", "--sort=-pcpu"], capture_output=True, text=True, timeout=10).stdout
        me = os.getpid()
        busy = [ln.split(None, 2) for ln in ps.splitlines() if ln.strip()]
        busy = [f"{c} {p}%" for pid, p, c in busy if int(pid) != me and float(p) >= 5.0][:4]
    except (OSError, ValueError, subprocess.SubprocessError):
        busy = []
    return (f"machine {label}: shared, {os.cpu_count()} cores, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
            f"(1/5/15 min); other busy processes: {', '.join(busy) or 'none above 5% CPU'}")
