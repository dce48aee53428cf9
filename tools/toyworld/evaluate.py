"""Score the toy model: sample prompts of the world through ComfyUI's own nodes and read the
images with the attribute classifier.

    .venv/bin/python tools/toyworld/evaluate.py [CHECKPOINT] [--prompts N] [--steps S]

Prints the prompt accuracy of the base model (share of samples whose every named attribute
the classifier reads back) and how often a held-out token (``"a sks thing"``) already
produces its shape before any fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from toyworld import world  # noqa: E402


def world_prompts(n: int, seed: int = 0, two_share: float = 0.25) -> list:
    """``n`` full prompts of the pretraining world (deterministic)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sc = world.random_scene(rng, world.PRETRAIN_SHAPES, two_prob=1.0 if i < n * two_share else 0.0)
        out.append(world.caption(sc))
    return out


def load_checkpoint(path: str):
    """(MODEL, CLIP, VAE) of a toy checkpoint through ComfyUI's checkpoint loader."""
    import comfy.sd

    from toyworld import model as toy

    toy.register()
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


@torch.no_grad()
def sample(model, clip, vae, prompt: str, n: int = 4, seed: int = 0, steps: int = 20, cfg: float = 5.0,
           sampler: str = "euler", scheduler: str = "normal", negative: str = "") -> torch.Tensor:
    """``n`` images [n, 64, 64, 3] for ``prompt`` via CLIPTextEncode/EmptyLatentImage/KSampler/VAEDecode."""
    import nodes

    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, negative)[0]
    lat = nodes.EmptyLatentImage().generate(world.SIZE, world.SIZE, n)[0]
    out = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, lat, denoise=1.0)[0]
    return nodes.VAEDecode().decode(vae, out)[0]


def prompt_accuracy(model, clip, vae, prompts, n: int = 4, seed: int = 0, steps: int = 20, cfg: float = 5.0):
    """Share of samples whose every named attribute is read back, and per-prompt hits."""
    from toyworld import classifier

    hits = {}
    for i, p in enumerate(prompts):
        imgs = sample(model, clip, vae, p, n=n, seed=seed + i, steps=steps, cfg=cfg)
        hits[p] = [classifier.score(im, p) for im in imgs]
    total = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return total, hits


def concept_rate(model, clip, vae, token: str = "sks", n: int = 8, seed: int = 0, steps: int = 20, cfg: float = 5.0,
                 prompt: str | None = None) -> float:
    """Share of samples of ``"a <token> thing"`` that the classifier reads as the token's shape."""
    from toyworld import classifier

    imgs = sample(model, clip, vae, prompt or f"a {token} thing", n=n, seed=seed, steps=steps, cfg=cfg)
    shapes = classifier.predict(imgs)["shape"]
    return sum(s == world.HELD_OUT[token] for s in shapes) / len(shapes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default=os.path.join(HERE, "weights", "toyworld.safetensors"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TOYWORLD_THREADS", "1")))
    from toyworld.train import boot_comfy

    boot_comfy()
    t = time.time()
    model, clip, vae = load_checkpoint(args.checkpoint)
    prompts = world_prompts(args.prompts, seed=1)
    acc, hits = prompt_accuracy(model, clip, vae, prompts, n=args.per_prompt, steps=args.steps, cfg=args.cfg)
    for p, h in hits.items():
        print(f"  {sum(h)}/{len(h)}  {p}")
    print(f"prompt accuracy: {acc:.3f} over {sum(len(h) for h in hits.values())} samples "
          f"({args.steps} steps, cfg {args.cfg})")
    for tok in world.HELD_OUT:
        print(f"held-out '{tok}' ({world.HELD_OUT[tok]}) produced before fine-tuning: "
              f"{concept_rate(model, clip, vae, tok, n=16, steps=args.steps, cfg=args.cfg):.3f}")
    print(f"evaluated in {time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
