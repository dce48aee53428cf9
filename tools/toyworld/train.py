"""Reproducible CPU pretraining of the toy world model: TAESD VAE, then UNet + CLIP.

    .venv/bin/python tools/toyworld/train.py [--out PATH] [--scale F]

Environment: ``TOYWORLD_THREADS`` (torch threads, default 1; the committed weights used 2 on a quiet CPU; on a busy CPU two threads ran 10x slower than one), ``TOYWORLD_SCALE`` (multiplies
every step count; 0.02 gives a one-minute smoke run).  Seeds are fixed; with the same thread
count and torch build the run is repeatable.  Prints timings per stage.

1. VAE: ComfyUI's TAESD trained as a plain auto-encoder (MSE, a little latent noise so the
   decoder tolerates imperfect latents) on images of ALL shapes (a generic image codec;
   the held-out shapes are held out of the text-to-image pretraining only).
2. ``vae_scale``/``vae_shift`` calibrated so SD1-scaled latents (x0.18215) have zero mean
   and unit spread.
3. UNet + CLIP trained jointly from scratch with the epsilon objective on SD1's schedule,
   offset noise, min-SNR weighting, 10% empty captions (for CFG), on pretraining shapes
   only; EMA weights are saved.
4. (last) the TAESD decoder refined alone on full images, encoder frozen.

Stage 2 (``--init-from CHECKPOINT``): start from a stage-1 checkpoint, keep its VAE, encode a
fresh set of latents and train UNet + CLIP further with a cosine-decaying learning rate.
``make toyworld`` runs both stages (see tools/toyworld/README.md for the settings and timings).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))  # tools/


def boot_comfy():
    """Import ComfyUI's modules (CPU) without starting a server."""
    from svdiff_testkit.comfy_env import comfy_path

    cp = comfy_path()
    if cp not in sys.path:
        sys.path.insert(0, cp)
    if "comfy.options" not in sys.modules:
        argv = sys.argv
        sys.argv = ["main.py", "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)

        sys.argv = argv


VAE_STEPS = 2500  # on 32x32 crops (4x cheaper than full images)
VAE_BATCH = 16
CROP = 32
VAE_FULL_STEPS = 600  # then on full 64x64 images (no crop-border artefacts)
VAE_FULL_BATCH = 8
N_LATENTS = 8000
UNET_STEPS = 4000
UNET_BATCH = 32
SNAPSHOT_EVERY = 250
DEC_STEPS = 300
DEC_BATCH = 8
OFFSET_NOISE = 0.15
SNR_GAMMA = 5.0
EMA = 0.998


def log(msg):
    print(f"[toyworld {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255.0)


def train_vae(vae, steps, full_steps, seed):
    """TAESD as a plain auto-encoder: ``steps`` on 32x32 crops, then ``full_steps`` on full images."""
    from toyworld import world

    t0 = time.time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    total = steps + full_steps
    opt = torch.optim.Adam(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / max(1, total)))))
    for step in range(total):
        crop = CROP if step < steps else 0
        batch = VAE_BATCH if crop else VAE_FULL_BATCH
        imgs = np.stack([world.render(world.random_scene(rng, world.ALL_SHAPES, two_prob=0.35)) for _ in range(batch)])
        x = to_tensor(imgs)
        if crop:  # the codec is convolutional: crops on the 8-pixel grid
            oy, ox = (int(v) * 8 for v in rng.integers(0, (world.SIZE - crop) // 8 + 1, 2))
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        z = vae.taesd_encoder(x)
        zn = z + 0.05 * z.detach().std() * torch.randn_like(z)
        y = vae.taesd_decoder(zn)
        rec = (y - x).pow(2).mean()
        loss = rec + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total} ({'crop' if crop else 'full'}) rec {rec.item():.5f} psnr {-10 * math.log10(max(rec.item(), 1e-10)):.1f} dB ({time.time() - t0:.0f}s)")
    for p in params:
        p.requires_grad_(False)
    return time.time() - t0


def refine_decoder(vae, steps, seed):
    """Train the TAESD decoder alone on full 64x64 images, the encoder frozen.

    The UNet only sees the encoder's latents, so this stage is independent of stages 2-3
    (it runs last).  The codec is first rounded to its fp16 storage precision, so the stage
    can also be re-run from a written checkpoint (``--refine-decoder-of``) with the same result.
    """
    from toyworld import world

    t0 = time.time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim > 0:
                p.copy_(p.half().float())
    params = list(vae.taesd_decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    for step in range(steps):
        imgs = np.stack([world.render(world.random_scene(rng, world.ALL_SHAPES, two_prob=0.35)) for _ in range(DEC_BATCH)])
        x = to_tensor(imgs)
        with torch.no_grad():
            z = vae.taesd_encoder(x)
            z = z + 0.05 * z.std() * torch.randn_like(z)
        rec = (vae.taesd_decoder(z) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} rec {rec.item():.5f} psnr {-10 * math.log10(max(rec.item(), 1e-10)):.1f} dB ({time.time() - t0:.0f}s)")
    for p in params:
        p.requires_grad_(False)
    return time.time() - t0


@torch.no_grad()
def calibrate_vae(vae, seed):
    """Set vae_scale/vae_shift so that SD1-scaled latents are ~N(0, 1) overall."""
    from toyworld import world

    imgs, _ = world.dataset(512, seed)
    enc = torch.cat([vae.taesd_encoder(to_tensor(imgs[i:i + 64])) for i in range(0, 512, 64)])
    mu, sd = enc.mean().item(), enc.std().item()
    scale = 0.18215 * sd
    vae.vae_scale.fill_(scale)
    vae.vae_shift.fill_(-mu / scale)
    log(f"vae calibration: encoder mean {mu:.3f} std {sd:.3f} -> vae_scale {scale:.4f} vae_shift {-mu / scale:.3f}")
    return mu, sd


@torch.no_grad()
def encode_dataset(vae, n, seed, mu, sd):
    """Pretraining scenes (held-out shapes excluded) and their SD1-space latents."""
    from toyworld import world

    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, world.PRETRAIN_SHAPES, two_prob=0.3) for _ in range(n)]
    lat = []
    for i in range(0, n, 100):
        imgs = np.stack([world.render(s) for s in scenes[i:i + 100]])
        lat.append((vae.taesd_encoder(to_tensor(imgs)) - mu) / sd)
    return scenes, torch.cat(lat)


class Tok:
    """SD1 tokenizer with a cache: caption -> 77 token ids."""

    def __init__(self, tokenizer):
        self.t = tokenizer
        self.cache = {}

    def __call__(self, text):
        if text not in self.cache:
            self.cache[text] = [x[0] for x in self.t.tokenize_with_weights(text)["l"][0]]
        return self.cache[text]


def alphas_cumprod(model):
    s = model.model_sampling.sigmas.float()
    return 1.0 / (1.0 + s**2)


def _layer_forward(self, x, mask=None, optimized_attention=None):
    """CLIPLayer.forward without in-place adds (ComfyUI's version is inference-only)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def make_trainable(text):
    """Let autograd run through ComfyUI's CLIP encoder layers of this instance."""
    import types

    for layer in text.transformer.text_model.encoder.layers:
        layer.forward = types.MethodType(_layer_forward, layer)


def restore_forward(text):
    for layer in text.transformer.text_model.encoder.layers:
        layer.__dict__.pop("forward", None)


def train_unet(model, clip, scenes, latents, steps, seed, snapshot=None, cosine=False):
    from toyworld import model as toy
    from toyworld import world

    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet = model.diffusion_model
    text = toy.clip_text_model(clip)
    tok = Tok(clip.tokenizer)
    make_trainable(text)
    params = [p for p in unet.parameters()] + [p for p in text.parameters() if p.ndim > 0]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    warm = 100
    if cosine:  # continuation stage: the learning rate decays to zero over the run
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    else:  # constant after warm-up: a snapshot after k steps equals a run with --unet-steps k
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    ac = alphas_cumprod(model)
    snr = ac / (1 - ac)
    n = latents.shape[0]
    unet.train()
    text.train()
    avg = None
    for step in range(steps):
        idx = rng.integers(0, n, UNET_BATCH)
        x0 = latents[idx]
        caps = ["" if rng.random() < 0.1 else world.caption(scenes[i], rng, drop=0.15) for i in idx]
        ctx = text([tok(c) for c in caps])[0]
        t = torch.from_numpy(rng.integers(0, len(ac), UNET_BATCH))
        a = ac[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(x0) + OFFSET_NOISE * torch.randn(x0.shape[0], x0.shape[1], 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, timesteps=t.float(), context=ctx)
        w = torch.clamp(snr[t], max=SNR_GAMMA) / snr[t]
        loss = (w.view(-1, 1, 1, 1) * (pred - eps).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(EMA, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if snapshot is not None and (step + 1) % SNAPSHOT_EVERY == 0 and step + 1 < steps:
            with torch.no_grad():
                live = [p.detach().clone() for p in params]
                for e, p in zip(ema, params):
                    p.copy_(e)
                restore_forward(text)
                snapshot(step + 1)
                make_trainable(text)
                for l, p in zip(live, params):
                    p.copy_(l)
        if step % 100 == 0 or step == steps - 1 or step < 3:
            el = time.time() - t0
            log(f"unet step {step}/{steps} loss {avg:.4f} ({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
            p.requires_grad_(False)
    unet.eval()
    text.eval()
    restore_forward(text)
    return time.time() - t0


def checkpoint_steps(path: str) -> int:
    """UNet steps recorded in a toy checkpoint's metadata."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return int((f.metadata() or {}).get("unet_steps", 0))


def load_checkpoint_into(path: str, model, clip, vae) -> None:
    """Load a toy checkpoint written by :func:`toyworld.model.state_dict_for_checkpoint` into fresh modules (float32)."""
    from safetensors.torch import load_file

    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    parts = {"model.diffusion_model.": model.diffusion_model, "first_stage_model.": vae}
    for prefix, mod in parts.items():
        missing, unexpected = mod.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
        if missing or unexpected:
            raise SystemExit(f"{path}: {prefix} keys do not match the toy model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    text = {"clip_l." + k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    missing, unexpected = clip.cond_stage_model.load_state_dict(text, strict=False)
    missing = [k for k in missing if "text_projection" not in k and "logit_scale" not in k]
    if missing or unexpected:
        raise SystemExit(f"{path}: text encoder keys do not match the toy model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "weights", "toyworld.safetensors"))
    ap.add_argument("--scale", type=float, default=float(os.environ.get("TOYWORLD_SCALE", "1")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--vae-full-steps", type=int, default=None)
    ap.add_argument("--vae-checkpoint", default=None,
                    help="reuse the VAE stage: load the codec from this file if it exists, else train it and write it there")
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--n-latents", type=int, default=None)
    ap.add_argument("--decoder-steps", type=int, default=None)
    ap.add_argument("--init-from", default=None,
                    help="continuation stage: start from this toy checkpoint (VAE kept as is, no VAE stage), encode a fresh "
                         "set of pretraining latents (seed + 20) and train UNet + CLIP with a cosine-decaying learning rate")
    ap.add_argument("--snapshots", default=None, help="path prefix: also write the EMA weights every %d steps" % SNAPSHOT_EVERY)
    args = ap.parse_args()
    threads = int(os.environ.get("TOYWORLD_THREADS", "1"))
    torch.set_num_threads(threads)
    boot_comfy()
    from safetensors.torch import save_file

    from toyworld import model as toy

    T = time.time()
    log(f"threads {threads}, scale {args.scale}, torch {torch.__version__}")
    model, clip, vae = toy.build(seed=args.seed)
    log(f"params: unet {sum(p.numel() for p in model.diffusion_model.parameters()):,} "
        f"clip {sum(p.numel() for p in clip.cond_stage_model.parameters()):,} vae {sum(p.numel() for p in vae.parameters()):,}")
    with torch.inference_mode(False):
        if args.init_from:
            load_checkpoint_into(args.init_from, model, clip, vae)
            t_vae = 0.0
            scale, shift = float(vae.vae_scale), float(vae.vae_shift)
            sd = scale / 0.18215
            mu = -shift * scale
            log(f"continuing from {args.init_from} (unet steps before: {checkpoint_steps(args.init_from)})")
        else:
            if args.vae_checkpoint and os.path.isfile(args.vae_checkpoint):
                from safetensors.torch import load_file

                vae.load_state_dict({k: v.float() for k, v in load_file(args.vae_checkpoint).items()})
                t_vae = 0.0
                log(f"VAE loaded from {args.vae_checkpoint}")
            else:
                t_vae = train_vae(vae, args.vae_steps if args.vae_steps is not None else max(2, int(VAE_STEPS * args.scale)),
                                  args.vae_full_steps if args.vae_full_steps is not None else max(1, int(VAE_FULL_STEPS * args.scale)),
                                  args.seed + 10)
                if args.vae_checkpoint:
                    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, args.vae_checkpoint)
            mu, sd = calibrate_vae(vae, args.seed + 11)
        t = time.time()
        scenes, lat = encode_dataset(vae, args.n_latents or max(200, int(N_LATENTS * args.scale)), args.seed + (20 if args.init_from else 12), mu, sd)
        t_enc = time.time() - t
        log(f"encoded {len(scenes)} latents {tuple(lat.shape)} std {lat.std():.3f} in {t_enc:.0f}s")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

        def save(path, unet_steps):
            sd_out = toy.state_dict_for_checkpoint(model, clip, vae)
            tmp = path + ".tmp"
            total_steps = unet_steps + (checkpoint_steps(args.init_from) if args.init_from else 0)
            save_file(sd_out, tmp, metadata={"toyworld": "1", "threads": str(threads), "unet_steps": str(total_steps),
                                              "seed": str(args.seed)})
            os.replace(tmp, path)
            log(f"wrote {path} after {unet_steps} unet steps ({os.path.getsize(path) / 1e6:.1f} MB, {len(sd_out)} tensors)")

        snap = None
        if args.snapshots:
            snap = lambda k: save(f"{args.snapshots}.{k:05d}.safetensors", k)  # noqa: E731
        steps = args.unet_steps or max(2, int(UNET_STEPS * args.scale))
        t_unet = train_unet(model, clip, scenes, lat, steps, args.seed + (21 if args.init_from else 13), snapshot=snap,
                            cosine=bool(args.init_from))
        t_dec = refine_decoder(vae, args.decoder_steps if args.decoder_steps is not None else (0 if args.init_from else max(2, int(DEC_STEPS * args.scale))), args.seed + 14)
    save(args.out, steps)
    log(f"timings: vae {t_vae:.0f}s, encode {t_enc:.0f}s, unet+clip {t_unet:.0f}s, decoder {t_dec:.0f}s, total {time.time() - T:.0f}s")


if __name__ == "__main__":
    main()
