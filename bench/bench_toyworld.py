"""The paper's single-subject comparison (Sec. 4, Fig. 9(b), Table 1) at toy scale.

On the toy world (tools/toyworld: a 1.08 M-parameter SD1-style UNet that has never seen a
ring or star), every method learns the held-out ring "sks" from the same 4 images
(``world.concept_images("sks", 4, seed=0)``, yellow rings on 4 backgrounds), the same prompt
"a sks thing", the same VAE latents, steps, batch size (all 4 images every step) and seed:

* ``svdiff:<subset>``  SVDiff Train (this pack's node, ``SVDiffTrain.execute``) with a UNet
                       subset of Table 1 (``svdiff/subsets.py``), all singular values (rank 0),
                       1-D weights at ``SVDIFF_LR_1D``;
* ``lora:<rank>``      ComfyUI's own ``TrainLoraNode`` (comfy_extras/nodes_train.py), called as
                       is: LoRA on every >= 2-D UNet weight plus full diffs of 1-D weights and
                       biases, fp32, AdamW.  Its objective is ComfyUI's (MSE on the x0
                       prediction, timesteps uniform in percent), not ours;
* ``full``             full fine-tuning of every UNet weight: a plain-torch loop on a deep COPY
                       of the loaded UNet (the bench copies; the pack never does), AdamW, the
                       same eps loss and the very same per-step batches, noise and timesteps
                       as SVDiff Train (its seeded streams, ``svdiff.training``).

No prior preservation for any method (prior_weight 0): TrainLoraNode has none, and the
paper's own like-for-like comparison of SVDiff, LoRA and DreamBooth at a fixed short step
budget (appendix D.2, Fig. 26) is also without it, with a learning rate tuned per method.
The text encoder is frozen everywhere (TrainLoraNode trains the UNet only).

Metrics, on images sampled through ComfyUI's own CLIPTextEncode / EmptyLatentImage /
KSampler / VAEDecode (same sampler, steps, cfg and fixed seeds for every model) and read by
the toy world's attribute classifier (tools/toyworld/classifier.py):

* image alignment  = concept accuracy: share of "a sks thing" samples read as a ring;
* text alignment   = share of samples of recontextualised prompts ("a red sks thing",
                     "a sks thing on a blue background", ...) whose every attribute is read
                     back (``classifier.score``: ring AND colour AND background);
  context          = the same samples scored on colour/background only (the shape ignored),
                     which separates "forgot the context" from "did not learn the ring";
* fit loss         = the Eq. 1 eps loss on the 4 training latents with fixed noise and
                     timesteps (``FIT_TIMESTEPS``): how closely the training images are fitted;
* prior drift      = on untouched world prompts ("a red circle on a black background", ...):
                     prompt accuracy (the base model's on the first row), "world = base", the
                     share of samples the classifier reads exactly as the base model's sample
                     of the same seed, and the mean absolute pixel difference (0-255) to it;
* trainable parameters and the size of what each method saves, all in float16: the shift
  file (the pack's writer, ``svdiff.shiftfile.save_shift``), the LoRA state dict TrainLoraNode
  returns (safetensors), the whole UNet state dict (safetensors).

Output: a markdown table on stdout (ratios against full fine-tuning), ``--json`` with the raw
numbers, ``<out>/fig9b.png`` (x = text alignment, y = image alignment, one labelled marker per
run as in Fig. 9(b), a method's learning-rate sweep joined by a thin line), ``<out>/samples.png``
(the first concept and recontext samples of every model) and the saved files in ``<out>/files``.

    .venv/bin/python bench/bench_toyworld.py                    # default recipe (about 6 min on 2 shared cores)
    .venv/bin/python bench/bench_toyworld.py --quick            # few steps/samples, for development
    .venv/bin/python bench/bench_toyworld.py --checkpoint /tmp/tw/toyworld.safetensors \\
        --runs "svdiff:UNet@1e-2/3e-2,lora:4@1e-3,full@1e-4" --steps 120

A run spec is ``KIND[:ARG]@LR[/LR...]``: several learning rates give several points of a
method's trade-off curve.  Every recipe number is a named constant below or an option.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402  (puts tools/ on sys.path, never the repository root)

DEFAULT_OUT = os.path.join(REPO, "build", "bench_toyworld")

# --- data -------------------------------------------------------------------------------
TOKEN = "sks"                      # held-out concept: the ring (world.HELD_OUT)
INSTANCE_PROMPT = "a sks thing"
N_IMAGES = 4
DATA_SEED = 0

# --- training (identical for every method) ----------------------------------------------
STEPS = 300                        # quick: QUICK_STEPS
QUICK_STEPS = 20
BATCH_SIZE = 4                     # = all 4 images each step
TRAIN_SEED = 0
PRIOR_WEIGHT = 0.0                 # no prior preservation for any method (see the docstring)
SVDIFF_LR_1D = 1e-4                # SVDiff Train's learning_rate_1d (norm scales)
LORA_DTYPE = "fp32"                # TrainLoraNode training_dtype and lora_dtype
FULL_WEIGHT_DECAY = 0.01           # torch AdamW's default, as TrainLoraNode's AdamW uses

# runs: KIND[:ARG]@LR[/LR...]; learning rates per method (the paper's are for SD1.5, 500-1000 steps)
# (chosen on the retrained weights at 300 steps: SVDiff UNet was best at 3e-2 in a short sweep; each sweep brackets it)
DEFAULT_RUNS = ("svdiff:UNet@1e-2/3e-2/6e-2,svdiff:UNet-CA-KV@1e-1/3e-1,svdiff:UNet-2D@3e-2,"
                "lora:4@3e-4/1e-3/3e-3,full@3e-5/1e-4/3e-4")
QUICK_RUNS = "svdiff:UNet@3e-2,svdiff:UNet-CA-KV@1e-1,lora:4@1e-3,full@1e-4"

# --- sampling and scoring (identical for every model) -----------------------------------
SAMPLER, SCHEDULER = "euler", "normal"
SAMPLE_STEPS = 20                  # quick: QUICK_SAMPLE_STEPS
QUICK_SAMPLE_STEPS = 10
CFG = 5.0
CONCEPT_SAMPLES, QUICK_CONCEPT_SAMPLES = 32, 6
CONCEPT_SEED = 1000
RECONTEXT_PROMPTS = [
    "a red sks thing",
    "a blue sks thing",
    "a green sks thing on a white background",
    "a purple sks thing on a gray background",
    "a sks thing on a blue background",
    "a orange sks thing on a black background",
    "a red sks thing on a white background",
    "a sks thing on a gray background",
]
RECONTEXT_PER_PROMPT, QUICK_RECONTEXT_PER_PROMPT = 4, 1
RECONTEXT_SEED = 2000
WORLD_PROMPTS = [
    "a red circle on a black background",
    "a yellow square on a blue background",
    "a green triangle on a white background",
    "a purple cross on a gray background",
    "a blue circle on a white background",
    "a orange square on a gray background",
    "a red cross and a green circle on a black background",
    "a yellow triangle on a gray background",
]
WORLD_PER_PROMPT, QUICK_WORLD_PER_PROMPT = 3, 1
WORLD_SEED = 3000
# fit loss: Eq. 1 eps loss on the 4 training latents with fixed noise (FIT_SEED) at these timesteps
FIT_TIMESTEPS = [50, 200, 400, 600, 800, 950]
FIT_SEED = 777

KINDS = ("svdiff", "lora", "full")
COLOURS = {"base": (120, 120, 120), "svdiff": (31, 119, 180), "lora": (230, 120, 20), "full": (200, 30, 40)}


# ---------------------------------------------------------------------------------------
# run specs
# ---------------------------------------------------------------------------------------
def parse_runs(text: str) -> list:
    """``"svdiff:UNet@2e-2/5e-2,lora:4@1e-3,full@1e-4"`` -> [{kind, arg, lr, name}]."""
    runs = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "@" not in part:
            raise ValueError(f"run {part!r}: give a learning rate, e.g. {part}@1e-3")
        head, lrs = part.split("@", 1)
        kind, _, arg = head.partition(":")
        if kind not in KINDS:
            raise ValueError(f"run {part!r}: kind must be one of {KINDS}")
        if kind == "svdiff":
            arg = arg or "UNet"
        elif kind == "lora":
            arg = str(int(arg or 4))
        elif arg:
            raise ValueError(f"run {part!r}: 'full' takes no argument")
        for lr in lrs.split("/"):
            lr = float(lr)
            label = {"svdiff": f"SVDiff {arg}", "lora": f"LoRA r{arg}", "full": "Full FT"}[kind]
            runs.append({"kind": kind, "arg": arg, "lr": lr, "name": f"{label} lr {lr:g}"})
    return runs


# ---------------------------------------------------------------------------------------
# training, one function per method; each returns (MODEL patcher, info dict)
# ---------------------------------------------------------------------------------------
def train_svdiff(ctx, run, args):
    import svdiff.shiftfile as shiftfile
    from svdiff_testkit.comfy_env import pack_module

    T = pack_module("nodes.train")
    out = T.SVDiffTrain.execute(
        model=[ctx["model"]], latents=[{"samples": ctx["raw_latents"]}], positive=[ctx["cond"]],
        prompt=[INSTANCE_PROMPT], class_prompt=["a thing"], prior_weight=[PRIOR_WEIGHT], num_prior_images=[1],
        prior_steps=[1], subset=[run["arg"]], rank=[0], steps=[args.steps], batch_size=[BATCH_SIZE],
        learning_rate=[run["lr"]], learning_rate_1d=[SVDIFF_LR_1D], optimizer=["AdamW"], seed=[TRAIN_SEED],
        resolution=[64], gradient_checkpointing=[False], training_dtype=["fp32"], side_path=["auto"], save_every=[0],
        filename_prefix=["bench/toyworld"], resume_from=["[None]"], train_text_encoder=[False])
    tuned, shift, loss_map = out.result[0], out.result[2], out.result[3]
    path = os.path.join(args.files_dir, f"{slug(run['name'])}.safetensors")
    shiftfile.save_shift(shift, path, "float16", overwrite=True)
    return tuned, {"trainable": int(shift.num_values()), "file_bytes": os.path.getsize(path), "file": path,
                   "loss": loss_map["loss"], "lr_1d": SVDIFF_LR_1D, "tensors": len(shift.deltas)}


def train_lora(ctx, run, args):
    import torch
    import comfy_extras.nodes_train as NT
    from safetensors.torch import save_file

    torch.manual_seed(TRAIN_SEED)  # TrainLoraNode draws its batches and sigmas from torch's global generator
    raw = ctx["raw_latents"]
    # one LATENT per image: with a single LATENT input, ComfyUI 0.3.75's TrainLoraNode fails (multi_res unset)
    out = NT.TrainLoraNode.execute(
        model=[ctx["model"]], latents=[{"samples": raw[i:i + 1]} for i in range(raw.shape[0])], positive=[ctx["cond"]],
        batch_size=[BATCH_SIZE], grad_accumulation_steps=[1], steps=[args.steps], learning_rate=[run["lr"]],
        rank=[int(run["arg"])], optimizer=["AdamW"], loss_function=["MSE"], seed=[TRAIN_SEED],
        training_dtype=[LORA_DTYPE], lora_dtype=[LORA_DTYPE], algorithm=["LoRA"], gradient_checkpointing=[False],
        existing_lora=["[None]"])
    tuned, lora_sd, loss_map = out.result[0], out.result[1], out.result[2]
    with torch.inference_mode(False):
        sd = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in lora_sd.items()}
    path = os.path.join(args.files_dir, f"{slug(run['name'])}.safetensors")
    save_file(sd, path)
    trainable = sum(v.numel() for k, v in lora_sd.items() if not k.endswith(".alpha"))
    return tuned, {"trainable": int(trainable), "file_bytes": os.path.getsize(path), "file": path,
                   "loss": [float(x) for x in loss_map["loss"]], "tensors": len(sd)}


def train_full(ctx, run, args):
    """AdamW on every UNet weight of a deep copy; Eq. 1 eps loss, SVDiff Train's batches/noise/timesteps."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import svdiff.losses as losses
    import svdiff.training as training
    from safetensors.torch import save_file
    from svdiff_testkit.comfy_env import pack_module

    T = pack_module("nodes.train")
    base = ctx["model"]
    with torch.inference_mode(False):
        mm.unload_all_models()
        net = copy.deepcopy(base.model)
        for p in net.parameters():
            p.data = p.data.clone().float()
        ft = comfy.model_patcher.ModelPatcher(net, base.load_device, base.offload_device)
        params = list(net.diffusion_model.parameters())
        for p in net.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=run["lr"], weight_decay=FULL_WEIGHT_DECAY)
        inst = ctx["latents"].clone()
        entry = [ctx["cond"][0][0].clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in ctx["cond"][0][1].items()}]
        mm.load_models_gpu([ft], force_full_load=True)
        ms = ft.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().clone()
        kw = T.model_kwargs(ft, entry, inst[:1])
        kw = {k: torch.cat([v] * BATCH_SIZE, 0) if torch.is_tensor(v) else v for k, v in kw.items()}
        losses_ = []
        with torch.enable_grad():
            for step in range(args.steps):
                idx = training.data_indices(TRAIN_SEED, step, BATCH_SIZE, inst.shape[0])
                x0 = inst[idx]
                g = training.generator(TRAIN_SEED, step, training.STREAM_NOISE)
                noise = torch.randn(x0.shape, generator=g)
                t = training.timestep_draw(g, x0.shape[0], len(sigmas))
                sigma = sigmas[t].float()
                x0p = T.denoise_x0(ft, x0, noise, sigma, kw, {})
                loss = losses.target_error(x0p.float(), x0, sigma, "eps").pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses_.append(float(loss.detach()))
        for p in params:
            p.requires_grad_(False)
        sd = {"model.diffusion_model." + k: v.detach().to(torch.float16).contiguous()
              for k, v in net.diffusion_model.state_dict().items()}
    path = os.path.join(args.files_dir, f"{slug(run['name'])}.safetensors")
    save_file(sd, path)
    return ft, {"trainable": int(sum(p.numel() for p in params)), "file_bytes": os.path.getsize(path), "file": path,
                "loss": losses_, "weight_decay": FULL_WEIGHT_DECAY, "tensors": len(sd)}


TRAINERS = {"svdiff": train_svdiff, "lora": train_lora, "full": train_full}


def T_module():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.train")


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
def sample(ctx, model, prompt, n, seed, args):
    from toyworld import evaluate

    return evaluate.sample(model, ctx["clip"], ctx["vae"], prompt, n=n, seed=seed, steps=args.sample_steps, cfg=CFG,
                           sampler=SAMPLER, scheduler=SCHEDULER).float().cpu()


def evaluate_model(ctx, model, args, base=None) -> dict:
    """Concept, text alignment, context and world metrics of one model (base: the base model's result)."""
    import torch
    from toyworld import classifier, world

    net = ctx["classifier"]
    t0 = time.perf_counter()
    concept = sample(ctx, model, INSTANCE_PROMPT, args.concept_samples, CONCEPT_SEED, args)
    shapes = classifier.predict(concept, net)["shape"]
    ring = [s == world.HELD_OUT[TOKEN] for s in shapes]
    rc_imgs, rc_hits, rc_ctx = [], [], []
    for i, p in enumerate(RECONTEXT_PROMPTS):
        imgs = sample(ctx, model, p, args.recontext_per_prompt, RECONTEXT_SEED + i, args)
        rc_imgs.append(imgs)
        rc_hits += [classifier.score(im, p, net) for im in imgs]
        ctx_prompt = p.replace(f"{TOKEN} thing", "thing")  # colour/background only
        rc_ctx += [classifier.score(im, ctx_prompt, net) for im in imgs]
    w_imgs, w_hits, w_reads = [], [], []
    for i, p in enumerate(WORLD_PROMPTS):
        imgs = sample(ctx, model, p, args.world_per_prompt, WORLD_SEED + i, args)
        w_imgs.append(imgs)
        w_hits += [classifier.score(im, p, net) for im in imgs]
        n_obj = len(world.parse_prompt(p)["objects"])
        w_reads += [classifier.read_scene(im, n_obj, net) for im in imgs]
    w_all = torch.cat(w_imgs, 0)
    fit = T_module().evaluate_denoising_loss(model, ctx["latents"], ctx["cond"][0], seed=FIT_SEED, draws=len(FIT_TIMESTEPS),
                                             timesteps=FIT_TIMESTEPS)
    res = {
        "concept": sum(ring) / len(ring), "concept_n": len(ring),
        "text": sum(rc_hits) / len(rc_hits), "context": sum(rc_ctx) / len(rc_ctx), "text_n": len(rc_hits),
        "world": sum(w_hits) / len(w_hits), "world_n": len(w_hits),
        "fit_loss": fit,
        "world_agree": (sum(a == b for a, b in zip(w_reads, base["_world_reads"])) / len(w_reads)) if base is not None else 1.0,
        "pixel_drift": float((w_all - base["_world_images"]).abs().mean() * 255) if base is not None else 0.0,
        "_world_reads": w_reads,
        "eval_s": time.perf_counter() - t0,
        "_world_images": w_all, "_concept_images": concept, "_recontext_images": torch.cat(rc_imgs, 0),
    }
    return res


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in s)


def fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 2**20:.2f} MB"


def fmt_ratio(x, ref) -> str:
    if not ref:
        return "n/a"
    r = x / ref
    return f"{r:.3f}x" if r < 10 else f"{r:.0f}x"


def table(results: list, base: dict) -> str:
    full = next((r for r in results if r["kind"] == "full"), None)
    hdr = ["method", "lr", "trainable params", "vs full", "file (fp16)", "vs full", "image align", "text align",
           "context", "fit loss", "world acc", "world = base", "pixel drift", "train s"]
    rows = [hdr, ["---"] * len(hdr)]
    rows.append(["base model (no training)", "-", "0", "-", "-", "-", f"{base['concept']:.2f}", f"{base['text']:.2f}",
                 f"{base['context']:.2f}", f"{base['fit_loss']:.4f}", f"{base['world']:.2f}", "1.00", "0.0", "-"])
    for r in results:
        rows.append([r["name"].rsplit(" lr ", 1)[0], f"{r['lr']:g}", f"{r['trainable']:,}",
                     fmt_ratio(r["trainable"], full["trainable"] if full else 0), fmt_bytes(r["file_bytes"]),
                     fmt_ratio(r["file_bytes"], full["file_bytes"] if full else 0), f"{r['concept']:.2f}",
                     f"{r['text']:.2f}", f"{r['context']:.2f}", f"{r['fit_loss']:.4f}", f"{r['world']:.2f}",
                     f"{r['world_agree']:.2f}", f"{r['pixel_drift']:.1f}", f"{r['train_s']:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(hdr))]
    out = []
    for j, row in enumerate(rows):
        cells = [("-" * widths[i]) if j == 1 else row[i].ljust(widths[i]) for i in range(len(hdr))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _marker(d, kind: str, x: float, y: float, r: float = 6) -> None:
    c = COLOURS[kind]
    if kind == "base":
        d.rectangle([x - r, y - r, x + r, y + r], outline=c, width=3)
    elif kind == "full":
        d.polygon([(x, y - r - 2), (x + r + 2, y + r), (x - r - 2, y + r)], fill=c)
    elif kind == "lora":
        d.polygon([(x, y - r - 2), (x + r + 2, y), (x, y + r + 2), (x - r - 2, y)], fill=c)
    else:
        d.ellipse([x - r, y - r, x + r, y + r], fill=c)


def _axis_max(values) -> float:
    """Zoom like the paper's Fig. 9(b): the next tenth above the largest value (+0.05), at least 0.2, at most 1."""
    import math

    return min(1.0, max(0.2, math.ceil((max(values) + 0.05) * 10) / 10))


def plot(results: list, base: dict, path: str, subtitle: str) -> None:
    """Fig. 9(b) at toy scale with PIL: x = text alignment, y = image alignment, numbered markers, a key."""
    from PIL import Image, ImageDraw

    W, H, L, R, TOP, B = 1000, 720, 80, 330, 70, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs, ft = _font(14), _font(12), _font(18)
    pw, ph = W - L - R, H - TOP - B
    pts = [("base model", "base", base["text"], base["concept"])]
    pts += [(r["name"], r["kind"], r["text"], r["concept"]) for r in results]
    xmax, ymax = _axis_max([p[2] for p in pts]), _axis_max([p[3] for p in pts])

    def xy(x, y):
        return L + x / xmax * pw, TOP + (1 - y / ymax) * ph

    for axis, vmax in (("x", xmax), ("y", ymax)):
        step = 0.05 if vmax <= 0.3 else 0.1
        for k in range(int(round(vmax / step)) + 1):
            v = k * step
            if axis == "x":
                gx, _ = xy(v, 0)
                d.line([(gx, TOP), (gx, TOP + ph)], fill=(232, 232, 232))
                d.text((gx, TOP + ph + 6), f"{v:.2f}", fill="black", font=fs, anchor="ma")
            else:
                _, gy = xy(0, v)
                d.line([(L, gy), (L + pw, gy)], fill=(232, 232, 232))
                d.text((L - 8, gy), f"{v:.2f}", fill="black", font=fs, anchor="rm")
    d.rectangle([L, TOP, L + pw, TOP + ph], outline="black")
    d.text((L + pw / 2, H - 30), "text alignment (recontextualised prompts: ring, colour and background read back)",
           fill="black", font=f, anchor="ma")
    lab = Image.new("RGB", (ph, 24), "white")  # the y label, rotated: drawn on its own canvas
    ImageDraw.Draw(lab).text((ph / 2, 12), "image alignment (\"a sks thing\" read as a ring)", fill="black", font=f, anchor="mm")
    img.paste(lab.rotate(90, expand=True), (6, TOP))
    d.text((L, 20), "Fig. 9(b) at toy scale: learning the held-out ring from 4 images", fill="black", font=ft)
    d.text((L, 46), subtitle, fill=(80, 80, 80), font=fs)

    groups: dict = {}  # one method/setting swept over learning rates: a thin line in lr order
    for r in results:
        groups.setdefault((r["kind"], r["arg"]), []).append(r)
    for (kind, _), rs in groups.items():
        if len(rs) > 1:
            d.line([xy(r["text"], r["concept"]) for r in sorted(rs, key=lambda r: r["lr"])], fill=COLOURS[kind], width=1)
    placed = []
    for i, (name, kind, x, y) in enumerate(pts):
        px, py = xy(x, y)
        _marker(d, kind, px, py)
        placed.append((px - 8, py - 8, px + 8, py + 8))
    for i, (name, kind, x, y) in enumerate(pts):  # the run's number beside its marker, where it overlaps nothing
        px, py = xy(x, y)
        tag = str(i) if i else "B"
        tw = d.textlength(tag, font=fs)
        spots = [(px + 9, py - 16), (px + 9, py + 2), (px - 9 - tw, py - 16), (px - 9 - tw, py + 2)]
        spots += [(px + 9 + 14 * k, py - 7) for k in range(1, 12)] + [(px - 9 - tw - 14 * k, py - 7) for k in range(1, 12)]
        for lx, ly in spots:
            box = (lx - 1, ly, lx + tw + 1, ly + 14)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        else:
            lx, ly = spots[0]
        placed.append((lx - 1, ly, lx + tw + 1, ly + 14))
        d.text((lx, ly), tag, fill=COLOURS[kind], font=fs)
    # key: number -> run
    kx, ky = L + pw + 24, TOP
    for i, (name, kind, x, y) in enumerate(pts):
        _marker(d, kind, kx + 6, ky + 7, r=5)
        d.text((kx + 18, ky), f"{i if i else 'B'}  {name}  ({x:.2f}, {y:.2f})", fill="black", font=fs)
        ky += 19
    ky += 10
    for kind, text in (("svdiff", "SVDiff Train (Table 1 subset)"), ("lora", "ComfyUI TrainLoraNode (LoRA)"),
                       ("full", "full fine-tuning (all UNet weights)"), ("base", "base model, no training")):
        _marker(d, kind, kx + 6, ky + 7, r=5)
        d.text((kx + 18, ky), text, fill=COLOURS[kind], font=fs)
        ky += 19
    d.text((kx, ky + 6), "thin lines: one setting at rising lr", fill=(80, 80, 80), font=fs)
    img.save(path)


def sample_sheet(results: list, base: dict, path: str) -> None:
    """One row per model: the first 8 concept samples, then the first 8 recontext samples."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows = [("base model", base)] + [(r["name"], r) for r in results]
    n = 8
    lw, s, gap = 190, 64, 4
    W = lw + 2 * n * (s + gap) + 20
    H = 30 + len(rows) * (s + gap)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    fs = _font(12)
    d.text((lw, 8), '"a sks thing"', fill="black", font=fs)
    d.text((lw + n * (s + gap) + 20, 8), "recontextualised prompts (in order)", fill="black", font=fs)
    for j, (name, r) in enumerate(rows):
        y = 30 + j * (s + gap)
        d.text((6, y + s / 2), name, fill="black", font=fs, anchor="lm")
        for k, im in enumerate(r["_concept_images"][:n]):
            img.paste(Image.fromarray((im.clamp(0, 1).numpy() * 255).astype(np.uint8)), (lw + k * (s + gap), y))
        for k, im in enumerate(r["_recontext_images"][:: max(1, r["_recontext_images"].shape[0] // n)][:n]):
            img.paste(Image.fromarray((im.clamp(0, 1).numpy() * 255).astype(np.uint8)), (lw + n * (s + gap) + 20 + k * (s + gap), y))
    img.save(path)


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--checkpoint", default="", help="toy-world checkpoint (default: tools/toyworld/weights/toyworld.safetensors)")
    ap.add_argument("--classifier", default="", help="attribute classifier weights (default: the committed ones)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, fewer samples and runs (development)")
    ap.add_argument("--runs", default="", help=f"run specs KIND[:ARG]@LR[/LR...] (default {DEFAULT_RUNS!r})")
    ap.add_argument("--steps", type=int, default=0, help=f"training steps for every method (default {STEPS}, quick {QUICK_STEPS})")
    ap.add_argument("--sample-steps", type=int, default=0, help=f"KSampler steps (default {SAMPLE_STEPS})")
    ap.add_argument("--concept-samples", type=int, default=0, help=f'samples of "{INSTANCE_PROMPT}" (default {CONCEPT_SAMPLES})')
    ap.add_argument("--recontext-per-prompt", type=int, default=0,
                    help=f"samples per recontextualised prompt, {len(RECONTEXT_PROMPTS)} prompts (default {RECONTEXT_PER_PROMPT})")
    ap.add_argument("--world-per-prompt", type=int, default=0,
                    help=f"samples per untouched world prompt, {len(WORLD_PROMPTS)} prompts (default {WORLD_PER_PROMPT})")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for fig9b.png, samples.png and the saved files")
    ap.add_argument("--json", default="", help="also write the raw results to this file")
    ap.add_argument("--verbose", action="store_true", help="keep ComfyUI's log and progress bars")
    args = ap.parse_args()
    q = args.quick
    args.steps = args.steps or (QUICK_STEPS if q else STEPS)
    args.sample_steps = args.sample_steps or (QUICK_SAMPLE_STEPS if q else SAMPLE_STEPS)
    args.concept_samples = args.concept_samples or (QUICK_CONCEPT_SAMPLES if q else CONCEPT_SAMPLES)
    args.recontext_per_prompt = args.recontext_per_prompt or (QUICK_RECONTEXT_PER_PROMPT if q else RECONTEXT_PER_PROMPT)
    args.world_per_prompt = args.world_per_prompt or (QUICK_WORLD_PER_PROMPT if q else WORLD_PER_PROMPT)
    try:
        runs = parse_runs(args.runs or (QUICK_RUNS if q else DEFAULT_RUNS))
    except ValueError as e:
        ap.error(str(e))
    for opt in ("checkpoint", "classifier"):
        if getattr(args, opt) and not os.path.isfile(getattr(args, opt)):
            ap.error(f"--{opt}: no file {getattr(args, opt)}")
    args.out = os.path.abspath(args.out)
    args.files_dir = os.path.join(args.out, "files")
    os.makedirs(args.files_dir, exist_ok=True)

    import torch

    torch.set_num_threads(int(os.environ.get("TOYWORLD_THREADS", "1")))
    t_start = time.perf_counter()
    os.environ.setdefault("SVDIFF_BENCH_BASE", tempfile.mkdtemp(prefix="svdiff-bench-toyworld-"))
    _common.boot()
    if not args.verbose:
        import logging

        import comfy.utils

        import warnings

        comfy.utils.PROGRESS_BAR_ENABLED = False
        # TrainLoraNode's fp32 autocast on the CPU warns once that it falls back to plain fp32 (what is wanted here)
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        logging.getLogger().setLevel(logging.WARNING)
    from toyworld import classifier, evaluate, world
    from toyworld import model as toy
    from svdiff_testkit.comfy_env import pack_module

    T = pack_module("nodes.train")
    ckpt = os.path.abspath(args.checkpoint or toy.WEIGHTS)
    model, clip, vae = evaluate.load_checkpoint(ckpt)
    net = classifier.load(os.path.abspath(args.classifier)) if args.classifier else classifier.load()
    imgs, caps = world.concept_images(TOKEN, N_IMAGES, seed=DATA_SEED)
    assert caps[0] == INSTANCE_PROMPT
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        pixels = torch.from_numpy(imgs.copy()).float() / 255
        raw = torch.cat([vae.encode(pixels[i:i + 1]) for i in range(N_IMAGES)], 0).float()
        cond = [T.encode_prompt(clip, INSTANCE_PROMPT)]  # a CONDITIONING: [[tensor, dict]]
        ctx = {"model": model, "clip": clip, "vae": vae, "raw_latents": raw, "cond": cond, "classifier": net,
               "latents": model.model.process_latent_in(raw)}
        print(f"checkpoint {ckpt}; {N_IMAGES} images of the held-out ring, prompt {INSTANCE_PROMPT!r}; every method: "
              f"{args.steps} steps, batch {BATCH_SIZE}, seed {TRAIN_SEED}, prior preservation off, UNet only, fp32; "
              f"sampling {SAMPLER}/{SCHEDULER} {args.sample_steps} steps cfg {CFG}; torch threads {torch.get_num_threads()}",
              flush=True)
        base = evaluate_model(ctx, model, args)
        print(f"base model: concept {base['concept']:.2f}, text alignment {base['text']:.2f}, context {base['context']:.2f}, "
              f"fit {base['fit_loss']:.4f}, world prompt accuracy {base['world']:.2f} ({base['eval_s']:.0f} s per evaluation)",
              flush=True)
        results = []
        for run in runs:
            t0 = time.perf_counter()
            tuned, info = TRAINERS[run["kind"]](ctx, run, args)
            train_s = time.perf_counter() - t0
            r = {**run, **info, "train_s": train_s, "steps": args.steps}
            r.update(evaluate_model(ctx, tuned, args, base))
            loss = r["loss"]
            k = max(1, len(loss) // 10)
            r["loss_first"], r["loss_last"] = sum(loss[:k]) / k, sum(loss[-k:]) / k
            results.append(r)
            print(f"  {r['name']:28s} trained {train_s:4.0f} s, concept {r['concept']:.2f}, text {r['text']:.2f}, "
                  f"context {r['context']:.2f}, fit {r['fit_loss']:.4f}, world {r['world']:.2f} (= base {r['world_agree']:.2f}, "
                  f"drift {r['pixel_drift']:.1f}/255), {r['trainable']:,} params, {fmt_bytes(r['file_bytes'])}", flush=True)
            del tuned
        again = sample(ctx, model, WORLD_PROMPTS[0], args.world_per_prompt, WORLD_SEED, args)
        base_intact = bool(torch.equal(again, base["_world_images"][:args.world_per_prompt]))

    total = time.perf_counter() - t_start
    print()
    print(f"Toy-scale Fig. 9(b) comparison ({args.steps} steps, batch {BATCH_SIZE}, {base['concept_n']} concept samples, "
          f"{base['text_n']} recontext samples over {len(RECONTEXT_PROMPTS)} prompts, {base['world_n']} world samples over "
          f"{len(WORLD_PROMPTS)} prompts; base world prompt accuracy {base['world']:.2f}):")
    print()
    print(table(results, base))
    print()
    print("image align = share of 'a sks thing' samples read as a ring; text align = share of recontextualised samples "
          "with ring + colour + background read back; context = colour/background only; fit loss = eps loss on the 4 "
          "training latents (fixed noise, t in %s); world acc = prompt accuracy on untouched world prompts; world = base = "
          "share of those samples the classifier reads exactly as the base model's; pixel drift = mean |image - base image| "
          "on them (0-255, same seeds)." % FIT_TIMESTEPS)
    se = lambda n: 0.5 / n ** 0.5
    print(f"sampling error: one binomial standard error is up to {se(base['concept_n']):.2f} on image align, "
          f"{se(base['text_n']):.2f} on text align/context, {se(base['world_n']):.2f} on world acc; one training seed per run.")
    print(f"base model untouched after all runs (same images for the same seed): {'yes' if base_intact else 'NO'}")
    subtitle = (f"{args.steps} steps, batch {BATCH_SIZE}, no prior preservation; {base['concept_n']} concept / "
                f"{base['text_n']} recontext samples; {os.path.basename(ckpt)}")
    fig = os.path.join(args.out, "fig9b.png")
    plot(results, base, fig, subtitle)
    sheet = os.path.join(args.out, "samples.png")
    sample_sheet(results, base, sheet)
    print(f"wrote {fig}, {sheet}; files in {args.files_dir}; total {total:.0f} s")
    if args.json:
        cfg = {k: v for k, v in vars(args).items()}
        cfg.update(checkpoint=ckpt, batch_size=BATCH_SIZE, train_seed=TRAIN_SEED, prior_weight=PRIOR_WEIGHT,
                   svdiff_lr_1d=SVDIFF_LR_1D, lora_dtype=LORA_DTYPE, full_weight_decay=FULL_WEIGHT_DECAY,
                   sampler=SAMPLER, scheduler=SCHEDULER, cfg=CFG, recontext_prompts=RECONTEXT_PROMPTS,
                   world_prompts=WORLD_PROMPTS, runs=runs)
        with open(args.json, "w") as fh:
            json.dump({"config": cfg, "base": public(base), "results": [public(r) for r in results],
                       "base_intact": base_intact, "total_s": total}, fh, indent=1)


if __name__ == "__main__":
    main()
