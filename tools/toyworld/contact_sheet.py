"""The toy-world contact sheet of ``make demo`` (issue 9): SVDiff seen working, with numbers.

Runs inside an already booted ComfyUI (``tools/demo.py`` boots it; so does the test harness)
and uses the pack's real nodes on the toy checkpoint (loaded by CheckpointLoaderSimple):

1. base model, ``"a sks thing"`` (4 seeds)
2. the same seeds after SVDiff Train on 4 images of the held-out ring (``world.concept_images``)
3. the trained concept recontextualised (``"a sks thing on a blue background"``, ``"a red sks thing"``, ...)
4. two concepts, ``"photo of a sks thing and a olis thing"``: one shift trained on both with the
   Cut-Mix Builder (probability 0.6) and unmix_weight > 0, against one shift trained on the
   same two subjects by the same builder with probability 0 and no unmix (``--set
   two_baseline=add``: the two single-subject shifts added with Combine Shifts instead)
5. single-image editing: one world image, SVDiff Train on it with its caption (no prior),
   DDIM Invert with the caption, Slerp Noise, KSamplerAdvanced (ddim, add_noise disable)
   with edited prompts: source / reconstruction / edits
6. Combine Shifts mode interpolate between two shifts of the same token (ring and star,
   both trained on ``"a sks thing"``) over alpha 0, .25, .5, .75, 1 with one fixed seed

The classifier's reading of every row is printed (and drawn under each row).  Every recipe
number is a field of :class:`Recipe`; ``--set name=value`` changes any of them.

    .venv/bin/python tools/toyworld/contact_sheet.py [--out DIR] [--checkpoint PATH] [--quick] [--set steps=120 ...]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.dirname(HERE)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)  # the harness folder only; never the pack root

from toyworld import world  # noqa: E402

SHEET_NAME = "toyworld_contact_sheet.png"
CELL = 128  # each 64x64 image is shown at 2x, nearest neighbour
GAP = 6
MARGIN = 10
LINE = 13  # height of one line of PIL's default font


@dataclass
class Recipe:
    """Every number of the sheet (re-tune here or with ``--set name=value``)."""

    # sampling (rows 1-4, 6): KSampler euler/normal, the same seeds for base and fine-tuned
    samples: int = 4  # shown per row
    score_samples: int = 16  # read by the classifier per row (rows 1, 2, 4): the first `samples` are shown
    sample_steps: int = 15
    cfg: float = 5.0
    seed: int = 5
    # concept shifts (SVDiff Train, UNet subset, no prior: the toy base has no class "thing")
    train_steps: int = 300
    train_lr: float = 3e-2
    train_lr_1d: float = 1e-4
    train_batch: int = 4
    train_seed: int = 0
    concept_images: int = 4
    concept_colour: str = "yellow"
    # row 3: the concept in new contexts (one sample per prompt, seed `seed`)
    recontext: tuple = ("a sks thing on a blue background", "a red sks thing", "a green sks thing on a white background",
                        "a purple sks thing on a gray background", "a blue sks thing on a black background")
    # row 4: two concepts
    # the Cut-Mix Builder writes its training prompts as "photo of a sks thing and a olis thing" (svdiff/cutmix.py)
    two_prompt: str = "photo of a sks thing and a olis thing"
    two_second_colour: str = "purple"
    cutmix_steps: int = 400
    cutmix_probability: float = 0.6
    cutmix_layout: str = "left-right"
    unmix_weight: float = 1.0
    # "joint": one shift trained on both subjects' images by the same Cut-Mix Builder with probability 0 and no unmix
    # (same prompts and steps: only Cut-Mix-Unmix differs); "add": Combine Shifts (add) of two single-subject shifts
    two_baseline: str = "joint"
    # row 5: single-image editing
    edit_seed: int = 11  # which world scene is edited
    edit_steps: int = 100
    edit_lr: float = 5e-2
    invert_steps: int = 20
    invert_refine: int = 0  # DDIM Invert's refine_iterations (0 = plain DDIM inversion, as in the paper)
    slerp_alpha: float = 0.3
    edit_cfg: float = 3.0
    edits: tuple = ("background", "colour")  # which attributes the edited prompts change
    # row 6: interpolation between the sks shift and a shift of the other held-out shape trained on the same prompt
    alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    interp_seed: int = 5  # = `seed`: the strip continues the first column of rows 1-2


def quick_recipe() -> Recipe:
    """A few steps of everything: exercises every node on the sheet in seconds (for the test)."""
    return dataclasses.replace(Recipe(), samples=2, score_samples=2, sample_steps=3, train_steps=3, train_batch=2, concept_images=2,
                               recontext=("a sks thing on a blue background", "a red sks thing"), cutmix_steps=3,
                               edit_steps=2, invert_steps=3, alphas=(0.0, 0.5, 1.0))


def set_field(recipe: Recipe, assignment: str) -> Recipe:
    """``"train_steps=120"`` -> a copy with that field changed (typed like the default)."""
    name, _, value = assignment.partition("=")
    name = name.strip()
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    if name not in fields or not _:
        raise SystemExit(f"--set: {assignment!r}: expected name=value with name one of {', '.join(fields)}")
    cur = getattr(recipe, name)
    if isinstance(cur, tuple):
        parts = [p.strip() for p in value.split(";" if isinstance(cur[0], str) else ",") if p.strip()]
        new = tuple(float(p) for p in parts) if cur and isinstance(cur[0], float) else tuple(parts)
    else:
        new = type(cur)(value)
    return dataclasses.replace(recipe, **{name: new})


# ---------------------------------------------------------------------------------------
# The nodes (ComfyUI's and the pack's), called as the executor calls them
# ---------------------------------------------------------------------------------------
def _res(out):
    return out.args if hasattr(out, "args") else out


class Nodes:
    def __init__(self):
        import nodes
        from svdiff_testkit.comfy_env import pack_module

        self.c = nodes
        self.train_mod = pack_module("nodes.train")
        self.Train = self.train_mod.SVDiffTrain
        self.CutMix = pack_module("nodes.cutmix").SVDiffCutMixBuilder
        self.Combine = pack_module("nodes.arithmetic").SVDiffCombineShifts
        self.Apply = pack_module("nodes.shifts").SVDiffApplyShift
        ed = pack_module("nodes.editing")
        self.Invert, self.Slerp = ed.SVDiffDDIMInvert, ed.SVDiffSlerpNoise

    def encode(self, clip, text):
        return self.c.CLIPTextEncode().encode(clip, text)[0]

    def sample(self, model, clip, vae, prompt: str, n: int, seed: int, r: Recipe) -> torch.Tensor:
        from toyworld import evaluate  # CLIPTextEncode / EmptyLatentImage / KSampler (euler, normal) / VAEDecode

        return evaluate.sample(model, clip, vae, prompt, n=n, seed=seed, steps=r.sample_steps, cfg=r.cfg)

    def train(self, model, clip, vae, r: Recipe, steps: int, lr: float, prefix: str, images=None, prompt="",
              training_set=None, unmix_weight=0.0, batch=None):
        out = self.Train.execute(
            model=model, clip=clip, vae=vae, images=images, prompt=prompt, class_prompt="a thing", prior_weight=0.0,
            num_prior_images=1, prior_steps=1, subset="UNet", rank=0, steps=steps, batch_size=batch or r.train_batch,
            learning_rate=lr, learning_rate_1d=r.train_lr_1d, optimizer="AdamW", seed=r.train_seed,
            resolution=world.SIZE, gradient_checkpointing=False, training_dtype="auto", side_path="auto", save_every=0,
            filename_prefix=f"svdiff/contact_sheet_{prefix}", resume_from="[None]", training_set=training_set,
            unmix_weight=unmix_weight)
        m, _c, shift = _res(out)[:3]
        return m, shift

    def combine(self, mode: str, a, b, alpha=0.5):
        out = self.Combine.execute(mode=mode, weight_a=1.0, weight_b=1.0, weight_c=1.0, weight_d=1.0, alpha=alpha,
                                   scale=1.0, rank=4, preset="(pattern only)", pattern="", shift_a=a, shift_b=b)
        return _res(out)[0]

    def apply(self, model, shift):
        return _res(self.Apply.execute(model=model, shift=shift, strength_model=1.0, strength_clip=1.0))[0]


def _images(token: str, n: int, colour: str) -> torch.Tensor:
    imgs, _ = world.concept_images(token, n, seed=0, colour=colour)
    return torch.from_numpy(imgs.copy()).float() / 255


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------
@dataclass
class Row:
    title: str
    reading: str
    images: list  # [64,64,3] tensors in [0, 1]
    captions: list = field(default_factory=list)


def _to_pil(img: torch.Tensor):
    from PIL import Image

    a = (img.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(a).resize((CELL, CELL), Image.NEAREST)


ROW_H = 2 * LINE + 4 + CELL + LINE + 2 * GAP  # title, reading, images, captions


def sheet_size(n_rows: int, cols: int) -> tuple:
    """(width, height) of a sheet of ``n_rows`` rows, the widest with ``cols`` images."""
    return 2 * MARGIN + cols * CELL + (cols - 1) * GAP, 2 * MARGIN + LINE + GAP + n_rows * ROW_H


def sheet_layout(r: Recipe) -> tuple:
    """(rows, widest row) of the sheet ``make_contact_sheet`` draws for recipe ``r``."""
    return 7, max(r.samples, len(r.recontext), 2 + len(r.edits), len(r.alphas))


def draw_sheet(rows: list, title: str):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width, height = sheet_size(len(rows), max(len(r.images) for r in rows))
    row_h = ROW_H
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    d.text((MARGIN, MARGIN), title, fill=(0, 0, 0), font=font)
    y = MARGIN + LINE + GAP
    for r in rows:
        d.text((MARGIN, y), r.title, fill=(0, 0, 0), font=font)
        d.text((MARGIN, y + LINE), r.reading, fill=(30, 70, 160), font=font)
        yi = y + 2 * LINE + 4
        for i, img in enumerate(r.images):
            x = MARGIN + i * (CELL + GAP)
            sheet.paste(_to_pil(img), (x, yi))
            if i < len(r.captions) and r.captions[i]:
                d.text((x, yi + CELL + 1), str(r.captions[i])[:21], fill=(60, 60, 60), font=font)
        y += row_h
    return sheet


# ---------------------------------------------------------------------------------------
# The sheet
# ---------------------------------------------------------------------------------------
def load_toy(checkpoint: str | None):
    """(MODEL, CLIP, VAE): the installed toy checkpoint by CheckpointLoaderSimple, or ``checkpoint``."""
    import folder_paths

    from toyworld import model as toy

    toy.register()
    if checkpoint:
        from toyworld import evaluate

        return evaluate.load_checkpoint(os.path.abspath(checkpoint))
    names = folder_paths.get_filename_list("checkpoints")
    if toy.CHECKPOINT_NAME not in names:
        toy.install_checkpoint(folder_paths.get_folder_paths("checkpoints")[0])
        getattr(folder_paths, "filename_list_cache", {}).pop("checkpoints", None)
    return tuple(Nodes().c.CheckpointLoaderSimple().load_checkpoint(toy.CHECKPOINT_NAME)[:3])


def _shape_count(images, shape: str) -> int:
    from toyworld import classifier

    return sum(s == shape for s in classifier.predict(images)["shape"])


def _shapes(images) -> list:
    from toyworld import classifier

    return classifier.predict(images)["shape"]


def _edit_prompts(scene, r: Recipe) -> list:
    """(label, edited caption) of ``scene`` for each edit in ``r.edits``: another background or object colour."""
    colour = scene.objects[0].colour
    out = []
    for what in r.edits:
        if what == "background":
            bg = next(b for b in ("white", "blue", "gray", "black") if b not in (scene.background, colour))
            edited = dataclasses.replace(scene, background=bg)
            out.append((f"bg -> {bg}", world.caption(edited)))
        elif what == "colour":
            c = next(c for c in ("green", "red", "blue", "purple") if c not in (colour, scene.background))
            edited = dataclasses.replace(scene, objects=[dataclasses.replace(o, colour=c) for o in scene.objects])
            out.append((f"colour -> {c}", world.caption(edited)))
        else:
            raise SystemExit(f"Recipe.edits: unknown edit {what!r} (background, colour)")
    return out


def make_contact_sheet(out_dir: str, checkpoint: str | None = None, quick: bool = False, log=print,
                       recipe: Recipe | None = None) -> str:
    """Train, sample, edit and interpolate on the toy model; write the sheet PNG into ``out_dir``.

    Runs inside a booted ComfyUI.  Returns the PNG's path.  Writes nothing else anywhere
    (SVDiff Train runs with save_every 0).
    """
    from svdiff import fileio
    from toyworld import classifier

    r = recipe or (quick_recipe() if quick else Recipe())
    N = Nodes()
    t_all = time.perf_counter()
    timings = {}
    rows: list = []

    def timed(name):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t

        return _T()

    def say(row: Row):
        rows.append(row)
        log(f"  {row.title}: {row.reading}")

    n = r.samples
    with torch.inference_mode():
        with timed("load"):
            model, clip, vae = load_toy(checkpoint)
        shape1, shape2 = world.HELD_OUT["sks"], world.HELD_OUT["olis"]
        prompt = "a sks thing"

        # 1-2: base vs fine-tuned, same seeds
        k = max(n, r.score_samples)
        shown = f" ({n} of {k} shown)" if k > n else ""
        with timed("sample"):
            base = N.sample(model, clip, vae, prompt, k, r.seed, r)
        say(Row(f"1. base model, '{prompt}', seed {r.seed}", f"{_shape_count(base, shape1)}/{k} read as {shape1}{shown}",
                list(base[:n]), _shapes(base[:n])))
        with timed("train sks"):
            sks_imgs = _images("sks", r.concept_images, r.concept_colour)
            sks_model, sks_shift = N.train(model, clip, vae, r, r.train_steps, r.train_lr, "sks", images=sks_imgs,
                                           prompt=prompt)
        with timed("sample"):
            tuned = N.sample(sks_model, clip, vae, prompt, k, r.seed, r)
        say(Row(f"2. after SVDiff Train on {r.concept_images} {r.concept_colour} {shape1} images ({r.train_steps} steps, "
                f"lr {r.train_lr:g}), same seed", f"{_shape_count(tuned, shape1)}/{k} read as {shape1}{shown}",
                list(tuned[:n]), _shapes(tuned[:n])))

        # 3: recontextualisation
        with timed("sample"):
            rec = [N.sample(sks_model, clip, vae, p, 1, r.seed, r)[0] for p in r.recontext]
        ok = [classifier.score(im, p) for im, p in zip(rec, r.recontext)]
        caps = [" ".join(w for w in p.replace(" background", " bg").split() if w not in ("a", "sks", "thing"))
                for p in r.recontext]
        say(Row("3. the concept in new contexts (fine-tuned; one sample per prompt)",
                f"{sum(ok)}/{len(ok)} read exactly as prompted; {_shape_count(torch.stack(rec), shape1)}/{len(rec)} read as {shape1}",
                rec, [f"{c} {'ok' if o else 'x'}" for c, o in zip(caps, ok)]))

        # 4: two concepts
        olis_imgs = _images("olis", r.concept_images, r.two_second_colour)
        with timed("train cut-mix"):
            ts = _res(N.CutMix.execute(images_1=sks_imgs, token_1="sks", class_word_1="thing", images_2=olis_imgs,
                                       token_2="olis", class_word_2="thing", probability=r.cutmix_probability,
                                       layout=r.cutmix_layout, and_prompt_probability=0.5, seed=r.train_seed,
                                       resolution=world.SIZE, preview_count=1))[0]
            cm_model, _ = N.train(model, clip, vae, r, r.cutmix_steps, r.train_lr, "cutmix", training_set=ts,
                                  unmix_weight=r.unmix_weight)
        with timed("train baseline"):
            if r.two_baseline == "add":
                _, olis_shift = N.train(model, clip, vae, r, r.train_steps, r.train_lr, "olis", images=olis_imgs,
                                        prompt="a olis thing")
                base_model = N.apply(model, N.combine("add", sks_shift, olis_shift))
                baseline = "Combine Shifts (add) of the two single-subject shifts"
            elif r.two_baseline == "joint":
                ts0 = _res(N.CutMix.execute(images_1=sks_imgs, token_1="sks", class_word_1="thing", images_2=olis_imgs,
                                            token_2="olis", class_word_2="thing", probability=0.0, layout=r.cutmix_layout,
                                            and_prompt_probability=0.5, seed=r.train_seed, resolution=world.SIZE,
                                            preview_count=1))[0]
                base_model, _ = N.train(model, clip, vae, r, r.cutmix_steps, r.train_lr, "joint", training_set=ts0)
                baseline = "one shift trained on both subjects' images, no cut-mix"
            else:
                raise SystemExit(f"Recipe.two_baseline: {r.two_baseline!r} is not 'add' or 'joint'")
        with timed("sample"):
            with_cm = N.sample(cm_model, clip, vae, r.two_prompt, k, r.seed, r)
            without = N.sample(base_model, clip, vae, r.two_prompt, k, r.seed, r)

        def two_caps(imgs):
            return [" | ".join(s for s, _ in classifier.read_scene(im, 2)["objects"]) for im in imgs]

        for label, imgs in ((f"4a. '{r.two_prompt}': Cut-Mix-Unmix (p {r.cutmix_probability}, unmix {r.unmix_weight}, "
                             f"{r.cutmix_steps} steps)", with_cm),
                            (f"4b. the same prompt and seeds without Cut-Mix-Unmix: {baseline}", without)):
            hits = sum(classifier.score(im, r.two_prompt) for im in imgs)
            either = sum({shape1, shape2} <= {sh for sh, _ in classifier.read_scene(im, 2)["objects"]} for im in imgs)
            say(Row(label, f"{hits}/{k} read as {shape1} (left) and {shape2} (right), {either}/{k} show both in either order{shown}",
                    list(imgs[:n]), two_caps(imgs[:n])))

        # 5: single-image editing
        rng = np.random.default_rng(r.edit_seed)
        scene = world.random_scene(rng, world.PRETRAIN_SHAPES, two_prob=0.0)
        src = torch.from_numpy(world.render(scene).copy()).float()[None] / 255
        cap = world.caption(scene)
        with timed("edit"):
            ed_model, _ = N.train(model, clip, vae, r, r.edit_steps, r.edit_lr, "edit", images=src, prompt=cap, batch=1)
            latent = N.c.VAEEncode().encode(vae, src)[0]
            pos_src = N.encode(clip, cap)
            inv, sig = _res(N.Invert.execute(ed_model, pos_src, latent, r.invert_steps, 1.0, "ddim_uniform", 0, 10000,
                                                 r.invert_refine))[:2]

            def back(lat, text):
                pos = N.encode(clip, text)
                neg = N.encode(clip, "")
                out = N.c.KSamplerAdvanced().sample(ed_model, "disable", 0, r.invert_steps, r.edit_cfg if text != cap else 1.0,
                                                    "ddim", "ddim_uniform", pos, neg, lat, 0, 10000, "disable")[0]
                return N.c.VAEDecode().decode(vae, out)[0][0]

            recon = back(inv, cap)
            mixed = _res(N.Slerp.execute(inv, ed_model, r.slerp_alpha, r.seed, sigmas=sig))[0]
            edits = [(label, text, back(mixed, text)) for label, text in _edit_prompts(scene, r)]
        ok_rec = classifier.score(recon, cap)
        ok_ed = [classifier.score(im, text) for _, text, im in edits]
        say(Row(f"5. edit one image: '{cap}' (Train {r.edit_steps} steps, DDIM Invert {r.invert_steps}, "
                f"Slerp {r.slerp_alpha})",
                f"reconstruction read as the caption: {'yes' if ok_rec else 'no'}; edits read as their prompts: "
                f"{sum(ok_ed)}/{len(ok_ed)}",
                [src[0], recon] + [im for _, _, im in edits],
                ["source", "reconstruction"] + [f"{lab} {'ok' if o else 'x'}" for (lab, _, _), o in zip(edits, ok_ed)]))
        for lab, text, _ in edits:
            log(f"      edit {lab}: '{text}'")

        # 6: interpolation between the sks shift and a shift of the other held-out shape on the same prompt
        with timed("train second shape"):
            _, other_shift = N.train(model, clip, vae, r, r.train_steps, r.train_lr, "second",
                                    images=_images("olis", r.concept_images, r.concept_colour), prompt=prompt)
        strip = []
        with timed("sample"):
            for a in r.alphas:
                m = N.apply(model, N.combine("interpolate", sks_shift, other_shift, alpha=float(a)))
                strip.append(N.sample(m, clip, vae, prompt, 1, r.interp_seed, r)[0])
        shapes = _shapes(torch.stack(strip))
        say(Row(f"6. Combine Shifts interpolate: alpha*{shape1} + (1-alpha)*{shape2} shift, both on '{prompt}', seed {r.interp_seed}",
                "read as: " + ", ".join(f"{a:g}: {s}" for a, s in zip(r.alphas, shapes)),
                strip, [f"alpha {a:g}: {s}" for a, s in zip(r.alphas, shapes)]))

    total = time.perf_counter() - t_all
    title = (f"SVDiff on the toy world ({os.path.basename(checkpoint) if checkpoint else 'toyworld.safetensors'}; "
             f"{torch.get_num_threads()} thread(s), {total:.0f} s)")
    sheet = draw_sheet(rows, title)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), SHEET_NAME)
    fileio.atomic_write_via(path, lambda tmp: sheet.save(tmp, format="PNG"), overwrite=True)
    log("  timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s")
    return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Write the toy-world SVDiff contact sheet (boots ComfyUI on the CPU).")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(TOOLS), "build", "contact_sheet"))
    ap.add_argument("--base", default=None, help="ComfyUI base directory (default: <out>/comfy)")
    ap.add_argument("--checkpoint", default=None, help="a toy checkpoint file instead of the committed weights")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (seconds; for tests)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="change a Recipe field")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TOYWORLD_THREADS", "1")))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = quick_recipe() if a.quick else Recipe()
    for s in a.set:
        r = set_field(r, s)
    from svdiff_testkit import comfy_env

    import logging

    state = comfy_env.boot(a.base or os.path.join(a.out, "comfy"))
    if state["import_failed"]:
        raise SystemExit(f"the pack failed to import: {state['import_failed']}")
    logging.getLogger().setLevel(logging.WARNING)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    path = make_contact_sheet(a.out, checkpoint=a.checkpoint, recipe=r)
    print(f"contact sheet: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
