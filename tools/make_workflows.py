"""Write the bundled workflows (``workflows/*.json``, the editor's UI format).

Each graph is built from the node definitions of a real ComfyUI booted in-process with
the pack loaded (so widget order, seed control values and slot types are what the editor
expects) by :class:`svdiff_testkit.workflow.WorkflowBuilder`.  A workflow is written only
when every node it uses exists in this checkout.

Run: ``.venv/bin/python tools/make_workflows.py`` (rewrites the workflows it can build).
Settings are those of the paper (Han et al., ICCV 2023) for Stable Diffusion 1.5; the demo
(tools/demo.py) and the tests shrink steps and sizes for their tiny model.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from svdiff_testkit.demo_model import WORKFLOW_CKPT  # noqa: E402
from svdiff_testkit.workflow import WorkflowBuilder  # noqa: E402

OUT = os.path.join(REPO, "workflows")
SHIFT_FILE = "my_subject_00001_.safetensors"  # what 01_single_subject saves first
NEG = "blurry, low quality, deformed"


def sampler_chain(b, model, clip, vae, col, prompt, seed=42, steps=50, cfg=7.5, width=512, height=512,
                  prefix="svdiff/sample", negative=NEG, latent=None, batch=1):
    """CLIPTextEncode x2 -> (EmptyLatentImage) -> KSampler (DDIM, eta 0) -> VAEDecode -> SaveImage."""
    pos = b.node("CLIPTextEncode", title="Prompt", col=col, text=prompt)
    neg = b.node("CLIPTextEncode", title="Negative prompt", col=col, text=negative)
    b.link(clip[0], clip[1], pos, "clip")
    b.link(clip[0], clip[1], neg, "clip")
    if latent is None:
        lat = b.node("EmptyLatentImage", col=col, width=width, height=height, batch_size=batch)
        latent = (lat, 0)
    ks = b.node("KSampler", col=col + 1, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim",
                scheduler="ddim_uniform", denoise=1.0)
    b.link(model[0], model[1], ks, "model")
    b.link(pos, 0, ks, "positive")
    b.link(neg, 0, ks, "negative")
    b.link(latent[0], latent[1], ks, "latent_image")
    dec = b.node("VAEDecode", col=col + 1)
    b.link(ks, 0, dec, "samples")
    b.link(vae[0], vae[1], dec, "vae")
    save = b.node("SaveImage", col=col + 2, filename_prefix=prefix)
    b.link(dec, 0, save, "images")
    return ks, dec, save


def wf_load_shift(defs):
    """02: the everyday use: Load Spectral Shift -> KSampler."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: generate with a shared spectral-shift file.\n\n"
        "Load Spectral Shift patches the model (and the text encoder if the file shifts it) with "
        "a spectral shift: each weight's singular values become ReLU(sigma + s*delta) (paper Eq. 2). "
        "Put the .safetensors file in models/svdiff; 'strength' is s (1 = as trained, 0 = off). "
        "Write the subject's rare token (here 'sks') in the prompt. Paper sampling: DDIM, eta = 0, "
        "50 steps, guidance 7.5, 512x512 on Stable Diffusion 1.5.",
        col=0,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    ls = b.node("SVDiffLoadShift", col=1, shift_name=SHIFT_FILE, strength_model=1.0, strength_clip=1.0)
    b.link(ck, 0, ls, "model")
    b.link(ck, 1, ls, "clip")
    sampler_chain(b, (ls, 0), (ls, 1), (ck, 2), col=2, prompt="a photo of sks robot on the beach, sunset",
                  prefix="svdiff/load_shift")
    return b.build()


WORKFLOWS = [
    ("02_load_shift.json", ["SVDiffLoadShift"], wf_load_shift),
]


def boot_defs():
    from svdiff_testkit import comfy_env
    from svdiff_testkit.workflow import object_info

    base = tempfile.mkdtemp(prefix="svdiff-mkwf-")
    comfy_env.boot(base)
    return object_info()


def main() -> None:
    defs = boot_defs()
    os.makedirs(OUT, exist_ok=True)
    for name, needs, fn in WORKFLOWS:
        missing = [n for n in needs if n not in defs]
        if missing:
            print(f"skip {name}: nodes not in this checkout: {missing}")
            continue
        wf = fn(defs)
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(wf, f, indent=2)
            f.write("\n")
        print(f"wrote workflows/{name} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)")


if __name__ == "__main__":
    main()
