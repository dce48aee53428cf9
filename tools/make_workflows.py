"""Write the bundled workflows (``example_workflows/*.json``, the editor's UI format).

Each graph is built from the node definitions of a real ComfyUI booted in-process with
the pack loaded (so widget order, seed control values and slot types are what the editor
expects) by :class:`svdiff_testkit.workflow.WorkflowBuilder`.  A workflow is written only
when every node it uses exists in this checkout.

Run: ``.venv/bin/python tools/make_workflows.py`` (rewrites the workflows it can build).
Settings are those of the paper (Han et al., ICCV 2023) for Stable Diffusion 1.5 (01-07); 08 and 09
run the single-subject workflow on SDXL and Flux-dev with their stock loaders and usual sampling.
The demo (tools/demo.py) and the tests shrink steps and sizes for their tiny models.
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

OUT = os.path.join(REPO, "example_workflows")
SHIFT_FILE = "my_subject_00001_.safetensors"  # what 01_single_subject saves first
SECOND_SHIFT = "my_second_subject_00001_.safetensors"
NEG = "blurry, low quality, deformed"


def wire(b, dst, **sources):
    """Link each named input of ``dst`` to a ``(node, output slot)``, in the order given; returns ``dst``.

    Node and link ids follow the order of the calls: keep it when editing a workflow function,
    or the regenerated JSON differs from the committed one even where the graph is the same."""
    for name, (src, slot) in sources.items():
        b.link(src, slot, dst, name)
    return dst


def start(defs, text, **note):
    """A builder with the workflow's Note and the checkpoint loader (column 0)."""
    b = WorkflowBuilder(defs)
    b.note(text, col=0, **note)
    return b, b.node("CheckpointLoaderSimple", col=0, ckpt_name=WORKFLOW_CKPT)


def from_checkpoint(ck, *outputs):
    """The named outputs of the checkpoint loader (model, clip, vae) as :func:`wire` sources."""
    return {name: (ck, ("model", "clip", "vae").index(name)) for name in outputs}


def text_encoder(b, clip, text, title, col, band=0):
    """CLIPTextEncode of ``text`` with ``clip``."""
    return wire(b, b.node("CLIPTextEncode", title=title, col=col, band=band, text=text), clip=clip)


def decode_and_save(b, samples, vae, col, prefix, band=0):
    """VAEDecode (column ``col``) -> SaveImage (the next column)."""
    dec = wire(b, b.node("VAEDecode", col=col, band=band), samples=samples, vae=vae)
    save = wire(b, b.node("SaveImage", col=col + 1, band=band, filename_prefix=prefix), images=(dec, 0))
    return dec, save


def shift_loader(b, ck, shift_name, title=None, **widgets):
    """Load Spectral Shift (column 1) on the checkpoint's model and clip."""
    ld = b.node("SVDiffLoadShift", title=title, col=1, shift_name=shift_name, **widgets)
    return wire(b, ld, **from_checkpoint(ck, "model", "clip"))


def shift_pair(b, ck, title_a, title_b, **widgets):
    """Shift A (what 01 saves first) and shift B (the second subject's), each loaded on the checkpoint."""
    return (shift_loader(b, ck, SHIFT_FILE, title_a, **widgets),
            shift_loader(b, ck, SECOND_SHIFT, title_b, **widgets))


def apply_shift(b, ck, shift, col, band=0):
    """Apply Spectral Shift of ``shift`` to the checkpoint's model and clip at full strength."""
    ap = b.node("SVDiffApplyShift", col=col, band=band, strength_model=1.0, strength_clip=1.0)
    return wire(b, ap, **from_checkpoint(ck, "model", "clip"), shift=shift)


def sampler_chain(b, model, clip, vae, col, prompt, seed=42, steps=50, cfg=7.5, width=512, height=512,
                  prefix="svdiff/sample", negative=NEG, latent=None, batch=1, band=0, sampler_name="ddim",
                  scheduler="ddim_uniform"):
    """CLIPTextEncode x2 -> (EmptyLatentImage) -> KSampler (default: DDIM, eta 0) -> VAEDecode -> SaveImage."""
    pos = text_encoder(b, clip, prompt, "Prompt", col, band)
    neg = text_encoder(b, clip, negative, "Negative prompt", col, band)
    if latent is None:
        lat = b.node("EmptyLatentImage", col=col, band=band, width=width, height=height, batch_size=batch)
        latent = (lat, 0)
    ks = b.node("KSampler", col=col + 1, band=band, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                scheduler=scheduler, denoise=1.0)
    wire(b, ks, model=model, positive=(pos, 0), negative=(neg, 0), latent_image=latent)
    dec, save = decode_and_save(b, (ks, 0), vae, col + 1, prefix, band)
    return ks, dec, save


def wf_load_shift(defs):
    """02: the everyday use: Load Spectral Shift -> KSampler."""
    b, ck = start(
        defs,
        "SVDiff: generate with a shared spectral-shift file.\n\n"
        "Load Spectral Shift patches the model (and the text encoder if the file shifts it) with "
        "a spectral shift: each weight's singular values become ReLU(sigma + s*delta) (paper Eq. 2). "
        "Put the .safetensors file in models/svdiff; 'strength' is s (1 = as trained, 0 = off). "
        "Write the subject's rare token (here 'sks') in the prompt. Paper sampling: DDIM, eta = 0, "
        "50 steps, guidance 7.5, 512x512 on Stable Diffusion 1.5.",
    )
    ls = shift_loader(b, ck, SHIFT_FILE, strength_model=1.0, strength_clip=1.0)
    sampler_chain(b, (ls, 0), (ls, 1), (ck, 2), col=2, prompt="a photo of sks robot on the beach, sunset",
                  prefix="svdiff/load_shift")
    return b.build()


def load_images(b, names, col=0):
    """LoadImage per picture, joined into one batch with ImageBatch."""
    loads = [b.node("LoadImage", col=col, image=n) for n in names]
    out = (loads[0], 0)
    for ld in loads[1:]:
        out = (wire(b, b.node("ImageBatch", col=col + 1), image1=out, image2=(ld, 0)), 0)
    return out


def wf_single_subject(defs):
    """01: DreamBooth-style spectral-shift training with prior preservation (Fig. 5)."""
    b, ck = start(
        defs,
        "SVDiff: single-subject generation (paper Sec. 3.2, Fig. 5).\n\n"
        "SVDiff Train fine-tunes only the singular values of the model's weights (a spectral shift, "
        "about 1.7 MB for SD1.5) on 3-5 photos of a subject with a rare token ('sks robot'), with the "
        "prior-preservation loss on images of the class ('a robot') that the model generates itself. "
        "Paper: 500-1000 steps, batch 1, learning rate 1e-3 for the spectral shifts and 1e-6 for 1-D "
        "weights. Save Spectral Shift writes models/svdiff/my_subject_00001_.safetensors; the sampler "
        "then shows the subject in a new context (DDIM, eta 0, 50 steps). While it trains the node shows "
        "a preview of 'photo of a sks robot' with the current shift every 100 steps (and the base model's "
        "before the first step), with loss, s/step and ETA; the previews (samples over time) and the "
        "loss curve (Plot Loss Graph) are shown after the run. Replace the pictures with your own (copy "
        "them into ComfyUI's input folder).",
    )
    imgs = load_images(b, ["robot_01.png", "robot_02.png", "robot_03.png"], col=1)
    tr = b.node("SVDiffTrain", col=3, prompt="photo of a sks robot", class_prompt="photo of a robot",
                prior_weight=1.0, steps=500, learning_rate=1e-3, learning_rate_1d=1e-6, subset="UNet",
                batch_size=1, resolution=512, seed=0)
    wire(b, tr, **from_checkpoint(ck, "model", "clip", "vae"), images=imgs)
    sv = b.node("SVDiffSaveShift", col=4, filename_prefix="my_subject",
                description="toy robot, token 'sks robot' (SVDiff single-subject workflow)")
    wire(b, sv, shift=(tr, 2))
    wire(b, b.node("PreviewImage", title="Previews during training", col=4), images=(tr, 5))
    wire(b, b.node("LossGraphNode", col=4, filename_prefix="svdiff/loss_graph"), loss=(tr, 3))
    sampler_chain(b, (tr, 0), (tr, 1), (ck, 2), col=4, prompt="a photo of sks robot on the beach, sunset",
                  prefix="svdiff/single_subject")
    return b.build()


def wf_multi_subject(defs):
    """03: multi-subject generation with Cut-Mix-Unmix and negative-prompt guidance (Fig. 6, appendix C.3)."""
    b, ck = start(
        defs,
        "SVDiff: multi-subject generation with Cut-Mix-Unmix (paper Sec. 3.3, Fig. 6; appendix C.3).\n\n"
        "The Cut-Mix Builder pairs two subjects ('sks robot', 'hta duck'): with probability 0.6 (paper) a "
        "training sample puts both side by side with a prompt naming each ('photo of a sks robot on the left "
        "and a hta duck on the right'), otherwise it shows one; prior samples are mixed the same way. SVDiff "
        "Train learns ONE spectral shift for both, with prior preservation and the 'unmix' loss on the "
        "cross-attention maps (unmix_weight; the paper gives no value, 10 is a starting point). Paper: "
        "500-1000 steps, learning rates 1e-3 / 1e-6. To sample, use a prompt unlike the training ones; the "
        "Negative Guider (Eq. 9) uses the prior prompt 'photo of a robot and a duck' as negative with "
        "beta 0.5 against stitching seams.",
        height=300,
    )
    robots = load_images(b, ["robot_01.png", "robot_02.png", "robot_03.png"], col=1)
    ducks = load_images(b, ["duck_01.png", "duck_02.png"], col=1)
    cm = b.node("SVDiffCutMixBuilder", col=3, token_1="sks", class_word_1="robot", token_2="hta",
                class_word_2="duck", probability=0.6, layout="left-right", and_prompt_probability=0.5, seed=0,
                resolution=512, preview_count=8)
    wire(b, cm, images_1=robots, images_2=ducks)
    wire(b, b.node("PreviewImage", title="First training samples", col=3), images=(cm, 1))
    tr = b.node("SVDiffTrain", col=4, prompt="(written per sample by the Cut-Mix Builder)",
                class_prompt="(written per sample by the Cut-Mix Builder)", prior_weight=1.0, steps=800,
                learning_rate=1e-3, learning_rate_1d=1e-6, subset="UNet", batch_size=1, resolution=512, seed=0,
                unmix_weight=10.0)
    wire(b, tr, **from_checkpoint(ck, "model", "clip", "vae"), training_set=(cm, 0))
    sv = b.node("SVDiffSaveShift", col=5, filename_prefix="my_two_subjects",
                description="toy robot 'sks robot' and rubber duck 'hta duck' (SVDiff multi-subject workflow)")
    wire(b, sv, shift=(tr, 2))
    pos = text_encoder(b, (tr, 1), "a sks robot sitting beside a hta duck on a sofa", "Prompt", col=5)
    neg = text_encoder(b, (tr, 1), "photo of a robot and a duck", "Negative: the prior prompt", col=5)
    emp = text_encoder(b, (tr, 1), "", "Empty prompt", col=5)
    gd = b.node("SVDiffNegativeGuider", col=6, cfg=7.5, beta=0.5)
    wire(b, gd, model=(tr, 0), positive=(pos, 0), negative=(neg, 0), empty=(emp, 0))
    noise = b.node("RandomNoise", col=6, noise_seed=42)
    ss = b.node("KSamplerSelect", col=6, sampler_name="ddim")
    sch = wire(b, b.node("BasicScheduler", col=6, scheduler="ddim_uniform", steps=50, denoise=1.0), model=(tr, 0))
    lat = b.node("EmptyLatentImage", col=6, width=512, height=512, batch_size=1)
    sa = b.node("SamplerCustomAdvanced", col=7)
    wire(b, sa, noise=(noise, 0), guider=(gd, 0), sampler=(ss, 0), sigmas=(sch, 0), latent_image=(lat, 0))
    decode_and_save(b, (sa, 0), (ck, 2), 7, "svdiff/multi_subject")
    return b.build()


def wf_combine(defs):
    """05: combine and interpolate two shifts, an interpolation strip over alpha (Fig. 8, 11)."""
    b, ck = start(
        defs,
        "SVDiff: combining and interpolating two spectral shifts (paper Eq. 4/5, Fig. 8 and 11).\n\n"
        "Combine/Scale Shifts in 'interpolate' mode makes delta' = alpha*delta_A + (1-alpha)*delta_B, "
        "so sigma' = ReLU(sigma + delta'); each branch applies one alpha (1, 0.5, 0) and samples with "
        "the same seed and DDIM (eta 0), and Image Stitch joins the results into one strip. Mode 'add' "
        "(delta_A + delta_B, Eq. 4) puts both subjects in one model. Train the two shifts with the "
        "single-subject workflow (e.g. the robot, then the duck saved as 'my_second_subject').",
    )
    la, lb = shift_pair(b, ck, "Load shift A", "Load shift B", strength_model=1.0, strength_clip=1.0)
    lat = b.node("EmptyLatentImage", col=1, width=512, height=512, batch_size=1)
    strip = None
    for i, alpha in enumerate((1.0, 0.5, 0.0)):  # one branch per alpha, one below the other
        cm = b.node("SVDiffCombineShifts", title=f"alpha = {alpha}", col=2, band=i, mode="interpolate", alpha=alpha)
        wire(b, cm, shift_a=(la, 2), shift_b=(lb, 2))
        ap = apply_shift(b, ck, (cm, 0), col=2, band=i)
        ks, dec, save = sampler_chain(b, (ap, 0), (ap, 1), (ck, 2), col=3, prompt="a photo of a sks thing in a garden",
                                      prefix=f"svdiff/interpolate_{i}", latent=(lat, 0), band=i)
        if strip is None:
            strip = (dec, 0)
        else:
            st = b.node("ImageStitch", col=6, band=i, direction="right", match_image_size=True, spacing_width=0,
                        spacing_color="white")
            strip = (wire(b, st, image1=strip, image2=(dec, 0)), 0)
    out = b.node("SaveImage", title="Interpolation strip", col=7, band=2, filename_prefix="svdiff/interpolation_strip")
    wire(b, out, images=strip)
    return b.build()


def wf_style_mixing(defs):
    """06: style mixing by layer range and scaling (Fig. 10, appendix E.3)."""
    b, ck = start(
        defs,
        "SVDiff: style mixing by layer range (paper Sec. 5, Fig. 10; appendix E.3).\n\n"
        "Combine/Scale Shifts in 'select layers' mode takes the layers of a preset from shift A and all "
        "others from shift B. The preset 'style: geometry (16,down,1)-(8,mid,0)' is the XTI layer range "
        "the paper uses for geometry (shift A), while the remaining layers give the appearance (shift B); "
        "the paper trains both on the UNet-2D subset. The second node scales the mixed shift "
        "(delta' = s*delta, appendix E.3): s above 1 strengthens it, 0 switches it off.",
    )
    la, lb = shift_pair(b, ck, "Geometry shift (A)", "Appearance shift (B)")
    mix = b.node("SVDiffCombineShifts", title="Mix by layers", col=2, mode="select layers",
                 preset="style: geometry (16,down,1)-(8,mid,0)")
    wire(b, mix, shift_a=(la, 2), shift_b=(lb, 2))
    sc = wire(b, b.node("SVDiffCombineShifts", title="Scale", col=2, mode="scale", scale=1.0), shift_a=(mix, 0))
    ap = apply_shift(b, ck, (sc, 0), col=3)
    sampler_chain(b, (ap, 0), (ap, 1), (ck, 2), col=4, prompt="a photo of a sks thing", prefix="svdiff/style_mix")
    return b.build()


def wf_inspect(defs):
    """07: inspecting shifts: norms and the similarity heat map (Fig. 9(a), appendix Fig. 15)."""
    b, ck = start(
        defs,
        "SVDiff: inspecting spectral shifts (paper Fig. 9a, appendix Fig. 15).\n\n"
        "Inspect Spectral Shift draws the norm of each shift per block and, with two or more shifts, the "
        "heat map of their cosine similarities averaged over layers, which the paper uses to show that "
        "shifts of similar subjects are correlated. Its text output summarises sizes and norms. No model "
        "is changed: the loaders only read the files.",
    )
    la, lb = shift_pair(b, ck, "Shift A", "Shift B")
    ins = wire(b, b.node("SVDiffInspectShift", col=2), shift_a=(la, 2), shift_b=(lb, 2))
    wire(b, b.node("PreviewImage", col=3), images=(ins, 0))
    return b.build()


def wf_editing(defs):
    """04: single-image editing (Fig. 4, 7; appendix B)."""
    b, ck = start(
        defs,
        "SVDiff: single-image editing (paper Sec. 3.4, Fig. 4 and 7; appendix B).\n\n"
        "SVDiff Train fine-tunes the spectral shift on ONE image-prompt pair without prior preservation "
        "(prior_weight 0; the prompt describes the picture, no rare token). Edits come from changing the "
        "prompt. DDIM Invert turns the picture into its noise map with the EDITED prompt and guidance 1 "
        "(Eq. 6); Slerp Noise mixes in fresh noise (Eq. 7, alpha 0 = none); the DDIM sampler samples "
        "back with eta 0.5 (appendix: eta 0.5 / alpha 0, or eta 0.9 / alpha 0.9 for large changes).",
    )
    li = b.node("LoadImage", col=1, image="scene_cup.png")
    sc = b.node("ImageScale", col=1, upscale_method="bilinear", width=512, height=512, crop="center")
    wire(b, sc, image=(li, 0))
    tr = b.node("SVDiffTrain", col=2, prompt="photo of a white cup of coffee on a wooden table",
                class_prompt="photo of a cup", prior_weight=0.0, steps=500, learning_rate=1e-3,
                learning_rate_1d=1e-6, subset="UNet", batch_size=1, resolution=512, seed=0)
    wire(b, tr, **from_checkpoint(ck, "model", "clip", "vae"), images=(sc, 0))
    enc = wire(b, b.node("VAEEncode", col=2), pixels=(sc, 0), vae=(ck, 2))
    edit = text_encoder(b, (tr, 1), "photo of a red cup of tea on a wooden table", "Edited prompt", col=3)
    neg = text_encoder(b, (tr, 1), "", "Negative prompt", col=3)
    inv = b.node("SVDiffDDIMInvert", col=4, steps=50, cfg=1.0, scheduler="ddim_uniform")
    wire(b, inv, model=(tr, 0), positive=(edit, 0), latent=(enc, 0))
    sl = wire(b, b.node("SVDiffSlerpNoise", col=4, alpha=0.0, seed=0), latent=(inv, 0), model=(tr, 0), sigmas=(inv, 1))
    ds = b.node("SVDiffDDIMSampler", col=4, eta=0.5, seed=0)
    sm = b.node("SamplerCustom", col=5, add_noise=False, noise_seed=0, cfg=7.5)
    wire(b, sm, model=(tr, 0), positive=(edit, 0), negative=(neg, 0), sampler=(ds, 0), sigmas=(inv, 1),
         latent_image=(sl, 0))
    decode_and_save(b, (sm, 0), (ck, 2), 5, "svdiff/edit")
    return b.build()


# the file names of the stock SDXL and Flux-dev downloads (the loaders name them as in ComfyUI's own examples)
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
FLUX_FILES = {"unet_name": "flux1-dev.safetensors", "clip_name1": "clip_l.safetensors",
              "clip_name2": "t5xxl_fp16.safetensors", "vae_name": "ae.safetensors"}
SDXL_SHIFT = "my_sdxl_subject_00001_.safetensors"  # what 08 saves first
FLUX_SHIFT = "my_flux_subject_00001_.safetensors"  # what 09 saves first
ROBOTS = ["robot_01.png", "robot_02.png", "robot_03.png"]
USE_SAVED = ("The lower row loads the saved file and samples with it. Queue once to train: until the file exists "
             "ComfyUI reports Load Spectral Shift's missing file and runs only the training row; then press R (the "
             "editor reloads its file lists) and queue again: the unchanged training row comes from ComfyUI's cache "
             "and only the sampling runs. To train another subject, change the saver's prefix and the loaded file.")


def train_and_save(b, model, clip, vae, col, prefix, description, **widgets):
    """SVDiff Train on the robot pictures (instance and class prompt of 01) -> Save Spectral Shift, training previews."""
    imgs = load_images(b, ROBOTS, col=col - 2)
    tr = b.node("SVDiffTrain", col=col, prompt="photo of a sks robot", class_prompt="photo of a robot", prior_weight=1.0,
                train_text_encoder=True, batch_size=1, seed=0, **widgets)
    wire(b, tr, model=model, clip=clip, vae=vae, images=imgs)
    wire(b, b.node("SVDiffSaveShift", col=col + 1, filename_prefix=prefix, description=description), shift=(tr, 2))
    wire(b, b.node("PreviewImage", title="Previews during training", col=col + 1), images=(tr, 5))
    return tr


def saved_shift(b, model, clip, shift_name, col=1, band=1):
    """Load Spectral Shift of the file the training row saves, on the loaders' MODEL and CLIP."""
    ld = b.node("SVDiffLoadShift", title="Load the saved shift", col=col, band=band, shift_name=shift_name,
                strength_model=1.0, strength_clip=1.0)
    return wire(b, ld, model=model, clip=clip)


def wf_sdxl_single_subject(defs):
    """08: the single-subject workflow on SDXL (1024 px, both CLIP encoders trained), then load and sample."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff on SDXL: single-subject training (paper Sec. 3.2, Fig. 5), saved, loaded and sampled.\n\n"
        "The SDXL base checkpoint (sd_xl_base_1.0.safetensors in models/checkpoints) gives the UNet, both text "
        "encoders (CLIP-L and CLIP-G) and the VAE. SVDiff Train learns a spectral shift of every UNet weight "
        "(subset UNet: 794 matrices, a shift of about 2.6 MB in fp16) and, with train_text_encoder on, of both "
        "CLIP encoders, on 3-5 photos of the subject ('sks robot') with prior preservation on images of the class "
        "('a robot') that SDXL generates itself, at SDXL's 1024 px. Settings: the paper's (500-1000 steps, "
        "learning rate 1e-3 for the spectral shifts, 1e-6 for 1-D weights); gradient checkpointing on, so the "
        "UNet's factors and 1024 px activations fit a 24 GiB card (about 15 GiB planned; README, memory table). "
        "Save Spectral Shift writes models/svdiff/my_sdxl_subject_00001_.safetensors.\n\n" + USE_SAVED + " "
        "Sampling: SDXL's usual settings (1024x1024, dpmpp_2m karras, 30 steps, cfg 7). A shift only fits the "
        "model family it was trained on (an SD1.5 shift is refused here, naming the first mismatching key).",
        col=0, height=420,
    )
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=SDXL_CKPT)
    train_and_save(b, (ck, 0), (ck, 1), (ck, 2), col=3, prefix="my_sdxl_subject",
                   description="toy robot, token 'sks robot' (SVDiff SDXL single-subject workflow)",
                   steps=500, learning_rate=1e-3, learning_rate_1d=1e-6, subset="UNet", resolution=1024,
                   gradient_checkpointing=True)
    ls = saved_shift(b, (ck, 0), (ck, 1), SDXL_SHIFT)
    sampler_chain(b, (ls, 0), (ls, 1), (ck, 2), col=2, prompt="a photo of sks robot on the beach, sunset", seed=42,
                  steps=30, cfg=7.0, width=1024, height=1024, prefix="svdiff/sdxl_single_subject", band=1,
                  sampler_name="dpmpp_2m", scheduler="karras")
    return b.build()


def wf_flux_single_subject(defs):
    """09: the single-subject workflow on Flux-dev (DiT attention, CLIP-L trained, T5 frozen), then load and sample."""
    b = WorkflowBuilder(defs)
    b.note(
        "SVDiff on Flux-dev: single-subject training (paper Sec. 3.2, Fig. 5), saved, loaded and sampled.\n\n"
        "Flux comes as separate files, loaded by ComfyUI's own loaders: the diffusion transformer "
        "(flux1-dev.safetensors in models/diffusion_models), the text encoders CLIP-L and T5-XXL "
        "(clip_l.safetensors, t5xxl_fp16.safetensors in models/text_encoders; type flux) and the 16-channel VAE "
        "(ae.safetensors in models/vae). SVDiff Train uses the DiT subsets (UNet subsets are refused on a DiT): "
        "DiT-Attn shifts the attention of the double blocks (both streams) and the fused linear layers of the "
        "single blocks, DiT would shift every weight. rank 64 shifts each matrix's 64 largest singular values "
        "(appendix E.1). Memory, planned for 512 px with gradient checkpointing (README, memory table): about "
        "25 GiB with the bf16 weights (a 32 GiB card or more); fp8 weights (weight_dtype fp8_e4m3fn) cannot be "
        "decomposed yet; rank 0 (every singular value) needs about 40 GiB. train_text_encoder trains CLIP-L, which gives Flux its pooled "
        "vector; T5-XXL, which gives the token sequence, stays frozen (train_t5 off: its U/V factors alone are "
        "about 14 GiB). Learning rate 5e-4, half the paper's SD value: no published setting for Flux yet, so a "
        "cautious start (raise it if the subject does not appear after 500 steps). Prior preservation as on SD "
        "(the class images are generated by Flux itself). Save Spectral Shift writes "
        "models/svdiff/my_flux_subject_00001_.safetensors.\n\n" + USE_SAVED + " "
        "Sampling as Flux-dev is meant to be used: guidance distilled into the model (FluxGuidance 3.5) with cfg 1 "
        "in KSampler (the negative prompt is then not used), euler, simple, 20 steps, a 16-channel latent "
        "(EmptySD3LatentImage) of 1024x1024.",
        col=0, height=560,
    )
    unet = b.node("UNETLoader", col=0, unet_name=FLUX_FILES["unet_name"], weight_dtype="default")
    te = b.node("DualCLIPLoader", col=0, clip_name1=FLUX_FILES["clip_name1"], clip_name2=FLUX_FILES["clip_name2"],
                type="flux")
    vae = b.node("VAELoader", col=0, vae_name=FLUX_FILES["vae_name"])
    train_and_save(b, (unet, 0), (te, 0), (vae, 0), col=3, prefix="my_flux_subject",
                   description="toy robot, token 'sks robot' (SVDiff Flux single-subject workflow)",
                   train_t5=False, steps=500, learning_rate=5e-4, learning_rate_1d=1e-6, subset="DiT-Attn", rank=64,
                   resolution=512, gradient_checkpointing=True)
    ls = saved_shift(b, (unet, 0), (te, 0), FLUX_SHIFT)
    pos = text_encoder(b, (ls, 1), "a photo of sks robot on the beach, sunset", "Prompt", col=2, band=1)
    neg = text_encoder(b, (ls, 1), "", "Negative prompt (not used at cfg 1)", col=2, band=1)
    fg = wire(b, b.node("FluxGuidance", col=2, band=1, guidance=3.5), conditioning=(pos, 0))
    lat = b.node("EmptySD3LatentImage", col=2, band=1, width=1024, height=1024, batch_size=1)
    ks = b.node("KSampler", col=3, band=1, seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple",
                denoise=1.0)
    wire(b, ks, model=(ls, 0), positive=(fg, 0), negative=(neg, 0), latent_image=(lat, 0))
    decode_and_save(b, (ks, 0), (vae, 0), 3, "svdiff/flux_single_subject", band=1)
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
    ("08_sdxl_single_subject.json", ["SVDiffTrain", "SVDiffSaveShift", "SVDiffLoadShift"], wf_sdxl_single_subject),
    ("09_flux_single_subject.json", ["SVDiffTrain", "SVDiffSaveShift", "SVDiffLoadShift", "FluxGuidance",
                                     "EmptySD3LatentImage"], wf_flux_single_subject),
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
        print(f"wrote example_workflows/{name} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)")


if __name__ == "__main__":
    main()
