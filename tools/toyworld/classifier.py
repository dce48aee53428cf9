"""A small attribute classifier of the toy world: shape (all shapes, held-out ones included),
object colour and background colour of a one-object image.

Two-object scenes are read half by half (:func:`pad_half` puts each half on a 64x64 canvas of
the background colour), so :func:`read_scene` scores any image of the world against a prompt
(:func:`score`).  Training is a couple of minutes on one CPU thread::

    .venv/bin/python tools/toyworld/classifier.py      # writes weights/classifier.safetensors
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from toyworld import world  # noqa: E402

WEIGHTS = os.path.join(HERE, "weights", "classifier.safetensors")
HEADS = {"shape": world.ALL_SHAPES, "colour": world.OBJECT_COLOURS, "background": world.BACKGROUNDS}


class AttributeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),  # 32
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 16
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 2, len(v)) for k, v in HEADS.items()})

    def forward(self, x):
        """x: [B, 3, 64, 64] in [0, 1] -> {head: logits}."""
        h = self.body(x * 2 - 1)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: m(h) for k, m in self.heads.items()}


def background_of(img: torch.Tensor) -> torch.Tensor:
    """The background colour [3] of an image [3, H, W]: median of its border pixels."""
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], 1)
    return border.median(1).values


def pad_half(img: torch.Tensor, half: int) -> torch.Tensor:
    """Half ``half`` (0 left, 1 right) of a [3, 64, 64] image, centred on a 64x64 background canvas."""
    s = world.SIZE
    canvas = background_of(img).view(3, 1, 1).expand(3, s, s).clone()
    canvas[:, :, s // 4: s // 4 + s // 2] = img[:, :, half * s // 2: (half + 1) * s // 2]
    return canvas


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter, so decoded (imperfect) samples are read like clean ones."""
    b = x.shape[0]
    sig = torch.rand(b, generator=g) * 1.2
    k = torch.arange(-2, 3).float()
    out = []
    for i in range(b):
        if sig[i] > 0.2:
            w = torch.exp(-k**2 / (2 * sig[i] ** 2))
            w = w / w.sum()
            xi = F.conv2d(F.pad(x[i:i + 1], (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
            xi = F.conv2d(F.pad(xi, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
            out.append(xi)
        else:
            out.append(x[i:i + 1])
    x = torch.cat(out)
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)) + 0.06 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.06
    return x.clamp(0, 1)


def make_batch(rng, n: int):
    """``n`` labelled examples: single-object scenes and padded halves of two-object scenes."""
    xs, ys = [], []
    for _ in range(n):
        two = rng.random() < 0.35
        sc = world.random_scene(rng, world.ALL_SHAPES, two_prob=1.0 if two else 0.0)
        img = torch.from_numpy(world.render(sc).copy()).permute(2, 0, 1).float() / 255
        if two:
            h = int(rng.integers(2))
            img, o = pad_half(img, h), sc.objects[h]
        else:
            o = sc.objects[0]
        xs.append(img)
        ys.append((world.ALL_SHAPES.index(o.shape), world.OBJECT_COLOURS.index(o.colour), world.BACKGROUNDS.index(sc.background)))
    return torch.stack(xs), torch.tensor(ys)


def train(steps: int = 1500, batch: int = 64, seed: int = 0, log=print) -> AttributeNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        x, y = make_batch(rng, batch)
        out = net(_augment(x, g))
        loss = sum(F.cross_entropy(out[k], y[:, i]) for i, k in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return net.eval()


def save(net: AttributeNet, path: str = WEIGHTS) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, path)


_LOADED: dict = {}


def load(path: str = WEIGHTS) -> AttributeNet:
    """The committed classifier (cached)."""
    if path not in _LOADED:
        from safetensors.torch import load_file

        net = AttributeNet()
        net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        _LOADED[path] = net.eval()
    return _LOADED[path]


@torch.no_grad()
def predict(images: torch.Tensor, net: AttributeNet | None = None) -> dict:
    """images [B, 3, 64, 64] (or ComfyUI IMAGE [B, 64, 64, 3]) in [0, 1] -> {head: [B] names}."""
    net = net or load()
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    out = net(images.float().clamp(0, 1))
    return {k: [HEADS[k][i] for i in out[k].argmax(1).tolist()] for k in HEADS}


def read_scene(image: torch.Tensor, n_objects: int, net: AttributeNet | None = None) -> dict:
    """What the classifier sees in one image [3, 64, 64]: ``{"objects": [(shape, colour)], "background"}``."""
    if image.shape[-1] == 3 and image.shape[0] != 3:
        image = image.permute(2, 0, 1)
    if n_objects <= 1:
        p = predict(image[None], net)
        return {"objects": [(p["shape"][0], p["colour"][0])], "background": p["background"][0]}
    p = predict(torch.stack([pad_half(image, 0), pad_half(image, 1)]), net)
    return {"objects": list(zip(p["shape"], p["colour"])), "background": p["background"][0]}


def score(image: torch.Tensor, prompt: str, net: AttributeNet | None = None) -> bool:
    """True when every attribute the prompt names is what the classifier reads in the image."""
    want = world.parse_prompt(prompt)
    got = read_scene(image, len(want["objects"]), net)
    if want["background"] and got["background"] != want["background"]:
        return False
    for (ws, wc), (gs, gc) in zip(want["objects"], got["objects"]):
        if (ws and ws != gs) or (wc and wc != gc):
            return False
    return True


@torch.no_grad()
def accuracy(n: int = 500, seed: int = 12345, net: AttributeNet | None = None) -> dict:
    """Per-head accuracy on ``n`` fresh clean examples (a seed unseen in training)."""
    net = net or load()
    x, y = make_batch(np.random.default_rng(seed), n)
    out = net(x)
    return {k: (out[k].argmax(1) == y[:, i]).float().mean().item() for i, k in enumerate(HEADS)}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Train the toy world's attribute classifier.")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default=WEIGHTS)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TOYWORLD_THREADS", "1")))
    t = time.time()
    net = train(steps=a.steps)
    save(net, a.out)
    print(f"trained in {time.time() - t:.0f}s; accuracy on 1,000 fresh images: {accuracy(n=1000, net=net)}")
