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
                  prefix="svdiff/sample", negative=NEG, latent=None, batch=1, band=0):
    """CLIPTextEncode x2 -> (EmptyLatentImage) -> KSampler (DDIM, eta 0) -> VAEDecode -> SaveImage."""
    pos = b.node("CLIPTextEncode", title="Prompt", col=col, band=band, text=prompt)
    neg = b.node("CLIPTextEncode", title="Negative prompt", col=col, band=band, text=negative)
    b.link(clip[0], clip[1], pos, "clip")
    b.link(clip[0], clip[1], neg, "clip")
    if latent is None:
        lat = b.node("EmptyLatentImage", col=col, band=band, width=width, height=height, batch_size=batch)
        latent = (lat, 0)
    ks = b.node("KSampler", col=col + 1, band=band, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim",
                scheduler="ddim_uniform", denoise=1.0)
    b.link(model[0], model[1], ks, "model")
    b.link(pos, 0, ks, "positive")
    b.link(neg, 0, ks, "negative")
    b.link(latent[0], latent[1], ks, "latent_image")
    dec = b.node("VAEDecode", col=col + 1, band=band)
    b.link(ks, 0, dec, "samples")
    b.link(vae[0], vae[1], dec, "vae")
    save = b.node("SaveImage", col=col + 2, band=band, filename_prefix=prefix)
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


SECOND_SHIFT = "my_second_subject_00001_.safetensors"


def load_images(b, names, col=0):
    """LoadImage per picture, joined into one batch with ImageBatch."""
    loads = [b.node("LoadImage", col=col, image=n) for n in names]
    out = (loads[0], 0)
    for ld in loads[1:]:
        ib = b.node("ImageBatch", col=col + 1)
        b.link(out[0], out[1], ib, "image1")
        b.link(ld, 0, ib, "image2")
        out = (ib, 0)
    return out


def wf_single_subject(defs):
    """01: DreamBooth-style spectral-shift training with prior preservation (Fig. 5)."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: single-subject generation (paper Sec. 3.2, Fig. 5).\n\n"
        "SVDiff Train fine-tunes only the singular values of the model's weights (a spectral shift, "
        "about 1.7 MB for SD1.5) on 3-5 photos of a subject with a rare token ('sks robot'), with the "
        "prior-preservation loss on images of the class ('a robot') that the model generates itself. "
        "Paper: 500-1000 steps, batch 1, learning rate 1e-3 for the spectral shifts and 1e-6 for 1-D "
        "weights. Save Spectral Shift writes models/svdiff/my_subject_00001_.safetensors; the sampler "
        "then shows the subject in a new context (DDIM, eta 0, 50 steps). Replace the pictures with "
        "your own (copy them into ComfyUI's input folder).",
        col=0,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    imgs = load_images(b, ["robot_01.png", "robot_02.png", "robot_03.png"], col=1)
    tr = b.node("SVDiffTrain", col=3, prompt="photo of a sks robot", class_prompt="photo of a robot",
                prior_weight=1.0, steps=500, learning_rate=1e-3, learning_rate_1d=1e-6, subset="UNet",
                batch_size=1, resolution=512, seed=0)
    b.link(ck, 0, tr, "model")
    b.link(ck, 1, tr, "clip")
    b.link(ck, 2, tr, "vae")
    b.link(imgs[0], imgs[1], tr, "images")
    sv = b.node("SVDiffSaveShift", col=4, filename_prefix="my_subject",
                description="toy robot, token 'sks robot' (SVDiff single-subject workflow)")
    b.link(tr, 2, sv, "shift")
    sampler_chain(b, (tr, 0), (tr, 1), (ck, 2), col=4, prompt="a photo of sks robot on the beach, sunset",
                  prefix="svdiff/single_subject")
    return b.build()


def wf_multi_subject(defs):
    """03: multi-subject generation with Cut-Mix-Unmix and negative-prompt guidance (Fig. 6, appendix C.3)."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: multi-subject generation with Cut-Mix-Unmix (paper Sec. 3.3, Fig. 6; appendix C.3).\n\n"
        "The Cut-Mix Builder pairs two subjects ('sks robot', 'hta duck'): with probability 0.6 (paper) a "
        "training sample puts both side by side with a prompt naming each ('photo of a sks robot on the left "
        "and a hta duck on the right'), otherwise it shows one; prior samples are mixed the same way. SVDiff "
        "Train learns ONE spectral shift for both, with prior preservation and the 'unmix' loss on the "
        "cross-attention maps (unmix_weight; the paper gives no value, 10 is a starting point). Paper: "
        "500-1000 steps, learning rates 1e-3 / 1e-6. To sample, use a prompt unlike the training ones; the "
        "Negative Guider (Eq. 9) uses the prior prompt 'photo of a robot and a duck' as negative with "
        "beta 0.5 against stitching seams.",
        col=0, height=300,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    robots = load_images(b, ["robot_01.png", "robot_02.png", "robot_03.png"], col=1)
    ducks = load_images(b, ["duck_01.png", "duck_02.png"], col=1)
    cm = b.node("SVDiffCutMixBuilder", col=3, token_1="sks", class_word_1="robot", token_2="hta",
                class_word_2="duck", probability=0.6, layout="left-right", and_prompt_probability=0.5, seed=0,
                resolution=512, preview_count=8)
    b.link(robots[0], robots[1], cm, "images_1")
    b.link(ducks[0], ducks[1], cm, "images_2")
    pv = b.node("PreviewImage", title="First training samples", col=3)
    b.link(cm, 1, pv, "images")
    tr = b.node("SVDiffTrain", col=4, prompt="(written per sample by the Cut-Mix Builder)",
                class_prompt="(written per sample by the Cut-Mix Builder)", prior_weight=1.0, steps=800,
                learning_rate=1e-3, learning_rate_1d=1e-6, subset="UNet", batch_size=1, resolution=512, seed=0,
                unmix_weight=10.0)
    b.link(ck, 0, tr, "model")
    b.link(ck, 1, tr, "clip")
    b.link(ck, 2, tr, "vae")
    b.link(cm, 0, tr, "training_set")
    sv = b.node("SVDiffSaveShift", col=5, filename_prefix="my_two_subjects",
                description="toy robot 'sks robot' and rubber duck 'hta duck' (SVDiff multi-subject workflow)")
    b.link(tr, 2, sv, "shift")
    pos = b.node("CLIPTextEncode", title="Prompt", col=5, text="a sks robot sitting beside a hta duck on a sofa")
    neg = b.node("CLIPTextEncode", title="Negative: the prior prompt", col=5, text="photo of a robot and a duck")
    emp = b.node("CLIPTextEncode", title="Empty prompt", col=5, text="")
    for c in (pos, neg, emp):
        b.link(tr, 1, c, "clip")
    gd = b.node("SVDiffNegativeGuider", col=6, cfg=7.5, beta=0.5)
    b.link(tr, 0, gd, "model")
    b.link(pos, 0, gd, "positive")
    b.link(neg, 0, gd, "negative")
    b.link(emp, 0, gd, "empty")
    noise = b.node("RandomNoise", col=6, noise_seed=42)
    ss = b.node("KSamplerSelect", col=6, sampler_name="ddim")
    sch = b.node("BasicScheduler", col=6, scheduler="ddim_uniform", steps=50, denoise=1.0)
    b.link(tr, 0, sch, "model")
    lat = b.node("EmptyLatentImage", col=6, width=512, height=512, batch_size=1)
    sa = b.node("SamplerCustomAdvanced", col=7)
    b.link(noise, 0, sa, "noise")
    b.link(gd, 0, sa, "guider")
    b.link(ss, 0, sa, "sampler")
    b.link(sch, 0, sa, "sigmas")
    b.link(lat, 0, sa, "latent_image")
    dec = b.node("VAEDecode", col=7)
    b.link(sa, 0, dec, "samples")
    b.link(ck, 2, dec, "vae")
    save = b.node("SaveImage", col=8, filename_prefix="svdiff/multi_subject")
    b.link(dec, 0, save, "images")
    return b.build()


def wf_combine(defs):
    """05: combine and interpolate two shifts, an interpolation strip over alpha (Fig. 8, 11)."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: combining and interpolating two spectral shifts (paper Eq. 4/5, Fig. 8 and 11).\n\n"
        "Combine/Scale Shifts in 'interpolate' mode makes delta' = alpha*delta_A + (1-alpha)*delta_B, "
        "so sigma' = ReLU(sigma + delta'); each branch applies one alpha (1, 0.5, 0) and samples with "
        "the same seed and DDIM (eta 0), and Image Stitch joins the results into one strip. Mode 'add' "
        "(delta_A + delta_B, Eq. 4) puts both subjects in one model. Train the two shifts with the "
        "single-subject workflow (e.g. the robot, then the duck saved as 'my_second_subject').",
        col=0,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    la = b.node("SVDiffLoadShift", title="Load shift A", col=1, shift_name=SHIFT_FILE, strength_model=1.0, strength_clip=1.0)
    lb = b.node("SVDiffLoadShift", title="Load shift B", col=1, shift_name=SECOND_SHIFT, strength_model=1.0, strength_clip=1.0)
    for ld in (la, lb):
        b.link(ck, 0, ld, "model")
        b.link(ck, 1, ld, "clip")
    lat = b.node("EmptyLatentImage", col=1, width=512, height=512, batch_size=1)
    strip = None
    for i, alpha in enumerate((1.0, 0.5, 0.0)):  # one branch per alpha, one below the other
        cm = b.node("SVDiffCombineShifts", title=f"alpha = {alpha}", col=2, band=i, mode="interpolate", alpha=alpha)
        b.link(la, 2, cm, "shift_a")
        b.link(lb, 2, cm, "shift_b")
        ap = b.node("SVDiffApplyShift", col=2, band=i, strength_model=1.0, strength_clip=1.0)
        b.link(ck, 0, ap, "model")
        b.link(ck, 1, ap, "clip")
        b.link(cm, 0, ap, "shift")
        ks, dec, save = sampler_chain(b, (ap, 0), (ap, 1), (ck, 2), col=3, prompt="a photo of a sks thing in a garden",
                                      prefix=f"svdiff/interpolate_{i}", latent=(lat, 0), band=i)
        if strip is None:
            strip = (dec, 0)
        else:
            st = b.node("ImageStitch", col=6, band=i, direction="right", match_image_size=True, spacing_width=0,
                        spacing_color="white")
            b.link(strip[0], strip[1], st, "image1")
            b.link(dec, 0, st, "image2")
            strip = (st, 0)
    out = b.node("SaveImage", title="Interpolation strip", col=7, band=2, filename_prefix="svdiff/interpolation_strip")
    b.link(strip[0], strip[1], out, "images")
    return b.build()


def wf_style_mixing(defs):
    """06: style mixing by layer range and scaling (Fig. 10, appendix E.3)."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: style mixing by layer range (paper Sec. 5, Fig. 10; appendix E.3).\n\n"
        "Combine/Scale Shifts in 'select layers' mode takes the layers of a preset from shift A and all "
        "others from shift B. The preset 'style: geometry (16,down,1)-(8,mid,0)' is the XTI layer range "
        "the paper uses for geometry (shift A), while the remaining layers give the appearance (shift B); "
        "the paper trains both on the UNet-2D subset. The second node scales the mixed shift "
        "(delta' = s*delta, appendix E.3): s above 1 strengthens it, 0 switches it off.",
        col=0,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    la = b.node("SVDiffLoadShift", title="Geometry shift (A)", col=1, shift_name=SHIFT_FILE)
    lb = b.node("SVDiffLoadShift", title="Appearance shift (B)", col=1, shift_name=SECOND_SHIFT)
    for ld in (la, lb):
        b.link(ck, 0, ld, "model")
        b.link(ck, 1, ld, "clip")
    mix = b.node("SVDiffCombineShifts", title="Mix by layers", col=2, mode="select layers",
                 preset="style: geometry (16,down,1)-(8,mid,0)")
    b.link(la, 2, mix, "shift_a")
    b.link(lb, 2, mix, "shift_b")
    sc = b.node("SVDiffCombineShifts", title="Scale", col=2, mode="scale", scale=1.0)
    b.link(mix, 0, sc, "shift_a")
    ap = b.node("SVDiffApplyShift", col=3, strength_model=1.0, strength_clip=1.0)
    b.link(ck, 0, ap, "model")
    b.link(ck, 1, ap, "clip")
    b.link(sc, 0, ap, "shift")
    sampler_chain(b, (ap, 0), (ap, 1), (ck, 2), col=4, prompt="a photo of a sks thing", prefix="svdiff/style_mix")
    return b.build()


def wf_inspect(defs):
    """07: inspecting shifts: norms and the similarity heat map (Fig. 10a / 9a)."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: inspecting spectral shifts (paper Fig. 9a, appendix Fig. 15).\n\n"
        "Inspect Spectral Shift draws the norm of each shift per block and, with two or more shifts, the "
        "heat map of their cosine similarities averaged over layers, which the paper uses to show that "
        "shifts of similar subjects are correlated. Its text output summarises sizes and norms. No model "
        "is changed: the loaders only read the files.",
        col=0,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    la = b.node("SVDiffLoadShift", title="Shift A", col=1, shift_name=SHIFT_FILE)
    lb = b.node("SVDiffLoadShift", title="Shift B", col=1, shift_name=SECOND_SHIFT)
    for ld in (la, lb):
        b.link(ck, 0, ld, "model")
        b.link(ck, 1, ld, "clip")
    ins = b.node("SVDiffInspectShift", col=2)
    b.link(la, 2, ins, "shift_a")
    b.link(lb, 2, ins, "shift_b")
    pv = b.node("PreviewImage", col=3)
    b.link(ins, 0, pv, "images")
    return b.build()


def wf_editing(defs):
    """04: single-image editing (Fig. 4, 7; appendix B)."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff: single-image editing (paper Sec. 3.4, Fig. 4 and 7; appendix B).\n\n"
        "SVDiff Train fine-tunes the spectral shift on ONE image-prompt pair without prior preservation "
        "(prior_weight 0; the prompt describes the picture, no rare token). Edits come from changing the "
        "prompt. DDIM Invert turns the picture into its noise map with the EDITED prompt and guidance 1 "
        "(Eq. 6); Slerp Noise mixes in fresh noise (Eq. 7, alpha 0 = none); the DDIM sampler samples "
        "back with eta 0.5 (appendix: eta 0.5 / alpha 0, or eta 0.9 / alpha 0.9 for large changes).",
        col=0,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)
    li = b.node("LoadImage", col=1, image="scene_cup.png")
    sc = b.node("ImageScale", col=1, upscale_method="bilinear", width=512, height=512, crop="center")
    b.link(li, 0, sc, "image")
    tr = b.node("SVDiffTrain", col=2, prompt="photo of a white cup of coffee on a wooden table",
                class_prompt="photo of a cup", prior_weight=0.0, steps=500, learning_rate=1e-3,
                learning_rate_1d=1e-6, subset="UNet", batch_size=1, resolution=512, seed=0)
    b.link(ck, 0, tr, "model")
    b.link(ck, 1, tr, "clip")
    b.link(ck, 2, tr, "vae")
    b.link(sc, 0, tr, "images")
    enc = b.node("VAEEncode", col=2)
    b.link(sc, 0, enc, "pixels")
    b.link(ck, 2, enc, "vae")
    edit = b.node("CLIPTextEncode", title="Edited prompt", col=3, text="photo of a red cup of tea on a wooden table")
    neg = b.node("CLIPTextEncode", title="Negative prompt", col=3, text="")
    b.link(tr, 1, edit, "clip")
    b.link(tr, 1, neg, "clip")
    inv = b.node("SVDiffDDIMInvert", col=4, steps=50, cfg=1.0, scheduler="ddim_uniform")
    b.link(tr, 0, inv, "model")
    b.link(edit, 0, inv, "positive")
    b.link(enc, 0, inv, "latent")
    sl = b.node("SVDiffSlerpNoise", col=4, alpha=0.0, seed=0)
    b.link(inv, 0, sl, "latent")
    b.link(tr, 0, sl, "model")
    b.link(inv, 1, sl, "sigmas")
    ds = b.node("SVDiffDDIMSampler", col=4, eta=0.5, seed=0)
    sm = b.node("SamplerCustom", col=5, add_noise=False, noise_seed=0, cfg=7.5)
    b.link(tr, 0, sm, "model")
    b.link(edit, 0, sm, "positive")
    b.link(neg, 0, sm, "negative")
    b.link(ds, 0, sm, "sampler")
    b.link(inv, 1, sm, "sigmas")
    b.link(sl, 0, sm, "latent_image")
    dec = b.node("VAEDecode", col=5)
    b.link(sm, 0, dec, "samples")
    b.link(ck, 2, dec, "vae")
    save = b.node("SaveImage", col=6, filename_prefix="svdiff/edit")
    b.link(dec, 0, save, "images")
    return b.build()


WORKFLOWS = [
    ("01_single_subject.json", ["SVDiffTrain", "SVDiffSaveShift"], wf_single_subject),
    ("02_load_shift.json", ["SVDiffLoadShift"], wf_load_shift),
    ("03_multi_subject.json", ["SVDiffCutMixBuilder", "SVDiffTrain", "SVDiffNegativeGuider"], wf_multi_subject),
    ("04_single_image_editing.json", ["SVDiffTrain", "SVDiffDDIMInvert", "SVDiffSlerpNoise", "SVDiffDDIMSampler"],
     wf_editing),
    ("05_combine_interpolate.json", ["SVDiffCombineShifts", "SVDiffApplyShift"], wf_combine),
    ("06_style_mixing.json", ["SVDiffCombineShifts", "SVDiffApplyShift"], wf_style_mixing),
    ("07_inspect_shifts.json", ["SVDiffInspectShift"], wf_inspect),
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
