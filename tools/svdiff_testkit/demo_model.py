"""The demo model and demo files, set up for ``make demo``, ``make serve`` and the tests only.

A plain install of the pack never imports this: the demo-only custom node package
``tools/demo_nodes`` calls :func:`install` when ComfyUI loads it, and the harness links that
package into a private ComfyUI base directory with :func:`link_demo_nodes`.

:func:`install` (inside a running ComfyUI):
  * registers the demo model type with ComfyUI's checkpoint detection: the pretrained toy
    model of ``tools/toyworld`` when its weights are present, else the tiny random model of
    :mod:`svdiff_testkit.tiny`;
  * writes/links the demo checkpoint into ``models/checkpoints``;
  * copies the pack's sample pictures (``assets/*.png``) into ComfyUI's ``input/`` folder,
    where LoadImage lists them.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import sys

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TOOLS)
ASSETS = os.path.join(REPO, "assets")
ICON = "icon.png"  # assets/icon.png: the pack's icon (pyproject [tool.comfy] Icon)
WORKFLOWS = os.path.join(REPO, "example_workflows")
DEMO_NODES_DIR = os.path.join(TOOLS, "demo_nodes")
DEMO_NODES_LINK = "SVDiffDemoModel"
TINY_CKPT = "svdiff_demo_tiny.safetensors"
TOY_CKPT = "toyworld.safetensors"
# The checkpoint name the bundled workflows use (what an SD1.5 user has).
WORKFLOW_CKPT = "v1-5-pruned-emaonly.safetensors"


def toyworld_weights() -> str | None:
    """The pretrained toy model's committed weights, when they are in the tree."""
    p = os.path.join(TOOLS, "toyworld", "weights", TOY_CKPT)
    if os.path.isfile(p) and os.path.isfile(os.path.join(TOOLS, "toyworld", "model.py")):
        return p
    return None


def demo_kind() -> str:
    """``"toyworld"`` when the pretrained toy model is in the tree, else ``"tiny"``."""
    return "toyworld" if toyworld_weights() else "tiny"


def demo_checkpoint_name() -> str:
    return TOY_CKPT if demo_kind() == "toyworld" else TINY_CKPT


def link_demo_nodes(base: str) -> str:
    """Link ``tools/demo_nodes`` into ``<base>/custom_nodes`` (the harness's ComfyUI only)."""
    cn = os.path.join(base, "custom_nodes")
    os.makedirs(cn, exist_ok=True)
    link = os.path.join(cn, DEMO_NODES_LINK)
    if not os.path.lexists(link):
        os.symlink(DEMO_NODES_DIR, link)
    return link


def register_model_type() -> str:
    """Put the demo architecture first in ComfyUI's checkpoint detection list."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    if demo_kind() == "toyworld":
        toy = importlib.import_module("toyworld.model")
        toy.register()
        return "toyworld"
    from svdiff_testkit import tiny

    tiny.register_tiny_sd()
    return "tiny"


def ensure_checkpoint(folder: str | None = None) -> str:
    """The demo checkpoint in ``models/checkpoints`` (written once; atomic)."""
    import folder_paths

    folder = folder or folder_paths.get_folder_paths("checkpoints")[0]
    os.makedirs(folder, exist_ok=True)
    name = demo_checkpoint_name()
    dest = os.path.join(folder, name)
    if os.path.exists(dest):
        return dest
    tmp = dest + f".partial-{os.getpid()}"
    if demo_kind() == "toyworld":
        shutil.copyfile(toyworld_weights(), tmp)
    else:
        from svdiff_testkit import tiny

        tiny.write_checkpoint(tmp, seed=0)
    os.replace(tmp, dest)
    getattr(folder_paths, "filename_list_cache", {}).pop("checkpoints", None)
    return dest


def copy_assets(input_dir: str | None = None) -> list[str]:
    """Copy the pack's sample pictures into ComfyUI's input folder (LoadImage lists them)."""
    import folder_paths

    input_dir = input_dir or folder_paths.get_input_directory()
    os.makedirs(input_dir, exist_ok=True)
    out = []
    for src in sorted(glob.glob(os.path.join(ASSETS, "*.png"))):
        if os.path.basename(src) == ICON:  # the pack's icon, not a sample picture
            continue
        dest = os.path.join(input_dir, os.path.basename(src))
        if not os.path.exists(dest) or os.path.getsize(dest) != os.path.getsize(src):
            shutil.copyfile(src, dest)
        out.append(dest)
    return out


def install() -> dict:
    """Everything the demo needs inside a running ComfyUI (idempotent)."""
    kind = register_model_type()
    ckpt = ensure_checkpoint()
    images = copy_assets()
    return {"kind": kind, "checkpoint": ckpt, "checkpoint_name": os.path.basename(ckpt), "images": images}


# Step counts and sizes for the demo model on 2 CPU cores (a real checkpoint uses the
# workflows' own settings).  Inputs named like this are capped on every node that has them;
# CLASS_CAPS override them per node class.
DEMO_CAPS = {"steps": 4, "num_prior_images": 2, "prior_steps": 4, "preview_count": 2}
CLASS_CAPS = {"SVDiffTrain": {"steps": 24}}
DEMO_SIZE = 64  # pixels: an 8x8 latent for the SD-style demo model


def shrink_prompt(prompt: dict, caps: dict | None = None, size: int = DEMO_SIZE, class_caps: dict | None = None) -> dict:
    """A copy of an API prompt with step counts capped and image sizes set to ``size``."""
    import copy

    out = copy.deepcopy(prompt)
    for entry in out.values():
        inp = entry["inputs"]
        c = dict(DEMO_CAPS, **(caps or {}))
        c.update(CLASS_CAPS.get(entry["class_type"], {}))
        c.update((class_caps or {}).get(entry["class_type"], {}))
        for k, cap in c.items():
            v = inp.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                inp[k] = cap
        if entry["class_type"] in ("EmptyLatentImage", "ImageScale") or "resolution" in inp:
            for k in ("width", "height", "resolution"):
                if isinstance(inp.get(k), int) and inp[k] > size:
                    inp[k] = size
    return out


def checkpoint_unet_shapes(path: str) -> dict:
    """``{"diffusion_model.<key>.weight": shape}`` of a checkpoint's UNet weights that a spectral
    shift can patch (floating, at least 1-D), read from the file's header only."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
                sl = f.get_slice(k)
                shape = tuple(sl.get_shape())
                if len(shape) >= 1 and sl.get_dtype() in ("F16", "F32", "BF16", "F64"):
                    out[k[len("model."):]] = shape
    return out


def tiny_checkpoint_with_shift(ckpt_name: str, shift_name: str, seed: int) -> str:
    """The tiny model's checkpoint ``ckpt_name`` in models/checkpoints and a random shift for it
    at models/svdiff/``shift_name`` (listed at once); returns the models/svdiff folder."""
    import folder_paths

    from svdiff_testkit import tiny

    tiny.install_checkpoint(ckpt_name, seed=0)
    shift_dir = os.path.join(folder_paths.models_dir, "svdiff")
    write_random_shift(folder_paths.get_full_path("checkpoints", ckpt_name), os.path.join(shift_dir, shift_name), seed=seed)
    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
    return shift_dir


def write_random_shift(ckpt_path: str, out_path: str, seed: int, scale: float = 0.02) -> str:
    """A small random spectral shift for the demo checkpoint (tests of the load/combine graphs)."""
    import torch

    from svdiff import shiftfile  # the pack's core, aliased by the harness
    from svdiff.shift import SpectralShift, delta_length

    shapes = checkpoint_unet_shapes(ckpt_path)
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(delta_length(s), generator=g) * scale for k, s in shapes.items()}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    shiftfile.save_shift(SpectralShift(deltas, shapes, {"architecture": demo_kind()}), out_path, overwrite=True)
    return out_path
