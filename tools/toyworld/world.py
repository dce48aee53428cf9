"""A procedural toy world of flat-coloured shapes, with a caption for every image.

Scenes are 64x64 RGB: one object (anywhere, any size in a range) or two objects (one in
each half, captioned left first) on a plain background.  Everything is deterministic from
a seed (``numpy.random.default_rng``).

Pretraining sees the shapes in :data:`PRETRAIN_SHAPES`.  The shapes in
:data:`HELD_OUT` never appear in pretraining images; each is named by a rare token of
the SD1 tokenizer (a single token that the base model has never been trained on), so the
demo can teach it with SVDiff: ``"a sks thing"`` is a ring, ``"a olis thing"`` a star.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPER = 4  # draw at 4x and downsample: anti-aliased edges

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 130, 20),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
OBJECT_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
BACKGROUNDS = ["black", "white", "gray", "blue"]
PRETRAIN_SHAPES = ["circle", "square", "triangle", "cross"]
HELD_OUT = {"sks": "ring", "olis": "star"}  # rare token -> shape it names
# Fixed order: the classifier's shape labels and the VAE's training stream depend on it.
ALL_SHAPES = PRETRAIN_SHAPES + ["star", "ring"]


@dataclass
class Obj:
    shape: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    size: float  # radius-like half extent, pixels


@dataclass
class Scene:
    background: str
    objects: list = field(default_factory=list)


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float):
    if shape == "square":
        a = r * 0.85
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return [(cx + r * math.cos(rot + math.pi / 2 + k * 2 * math.pi / 3), cy - r * math.sin(rot + math.pi / 2 + k * 2 * math.pi / 3)) for k in range(3)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = r, r * 0.34
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def render(scene: Scene) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 array."""
    s = SUPER
    img = Image.new("RGB", (SIZE * s, SIZE * s), COLOURS[scene.background])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        col = COLOURS[o.colour]
        cx, cy, r = o.cx * s, o.cy * s, o.size * s
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif o.shape == "ring":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
            ri = r * 0.5
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=COLOURS[scene.background])
        else:
            d.polygon(_polygon(o.shape, cx, cy, r, 0.0), fill=col)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def random_scene(rng, shapes=PRETRAIN_SHAPES, two_prob: float = 0.3, background=None, colours=OBJECT_COLOURS) -> Scene:
    """One random scene: a single object anywhere, or two objects, one per half."""
    bg = background or _pick(rng, BACKGROUNDS)
    cols = [c for c in colours if c != bg]
    scene = Scene(bg)
    if rng.random() < two_prob:
        for half in (0, 1):
            size = rng.uniform(9.0, 13.0)
            cx = half * 32 + rng.uniform(size + 1, 32 - size - 1)
            cy = rng.uniform(size + 2, SIZE - size - 2)
            scene.objects.append(Obj(_pick(rng, shapes), _pick(rng, cols), cx, cy, size))
    else:
        size = rng.uniform(13.0, 21.0)
        cx = rng.uniform(size + 2, SIZE - size - 2)
        cy = rng.uniform(size + 2, SIZE - size - 2)
        scene.objects.append(Obj(_pick(rng, shapes), _pick(rng, cols), cx, cy, size))
    return scene


def shape_word(shape: str) -> str:
    """The caption word for a shape: its name, or the rare token of a held-out shape."""
    for tok, s in HELD_OUT.items():
        if s == shape:
            return tok
    return shape


def caption(scene: Scene, rng=None, drop: float = 0.0) -> str:
    """``"a red circle on a blue background"`` / ``"a red circle and a green cross on a ..."``.

    With ``drop`` > 0 (training), the object colours or the background are left out at
    random, each with probability ``drop``, so partial prompts are understood too.
    Held-out shapes are written as ``"<token> thing"`` (e.g. ``"a yellow sks thing"``).
    """
    keep_col = rng is None or rng.random() >= drop
    keep_bg = rng is None or rng.random() >= drop

    def noun(o: Obj) -> str:
        w = shape_word(o.shape)
        if w != o.shape:
            w += " thing"
        return f"{o.colour} {w}" if keep_col else w

    text = " and a ".join(noun(o) for o in scene.objects)
    text = "a " + text
    if keep_bg:
        text += f" on a {scene.background} background"
    return text


def parse_prompt(prompt: str) -> dict:
    """What a prompt of this world asks for: ``{"objects": [(shape|None, colour|None)], "background": str|None}``.

    Used to score samples: the classifier's reading of an image is compared with this.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    bg = None
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in COLOURS:
            bg = words[i - 1]
        words = words[: max(0, i - 3)]  # drop "on a <c> background"
    objs = []
    for part in " ".join(words).split(" and "):
        ws = part.split()
        shape = next((HELD_OUT.get(w, w) for w in ws if w in ALL_SHAPES or w in HELD_OUT), None)
        colour = next((w for w in ws if w in OBJECT_COLOURS), None)
        if shape or colour:
            objs.append((shape, colour))
    return {"objects": objs, "background": bg}


def dataset(n: int, seed: int, shapes=PRETRAIN_SHAPES, two_prob: float = 0.3, drop: float = 0.15, empty: float = 0.1):
    """``n`` (image uint8 [n,64,64,3], captions list) pairs; ``empty`` of captions are ""."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    caps = []
    for i in range(n):
        sc = random_scene(rng, shapes, two_prob)
        imgs[i] = render(sc)
        caps.append("" if rng.random() < empty else caption(sc, rng, drop))
    return imgs, caps


def labelled(n: int, seed: int, shapes=ALL_SHAPES, two_prob: float = 0.0):
    """``n`` labelled single-object images for the classifier: (images, shape idx, colour idx, bg idx)."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    ys = np.empty((n, 3), np.int64)
    for i in range(n):
        sc = random_scene(rng, shapes, two_prob)
        o = sc.objects[0]
        imgs[i] = render(sc)
        ys[i] = (ALL_SHAPES.index(o.shape), OBJECT_COLOURS.index(o.colour), BACKGROUNDS.index(sc.background))
    return imgs, ys


def concept_images(token: str = "sks", n: int = 4, seed: int = 0, colour: str = "yellow"):
    """``n`` training images of a held-out concept (one colour, varied place/size/background).

    Returns (images uint8 [n,64,64,3], captions like ``"a sks thing"``).
    """
    shape = HELD_OUT[token]
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)] if colour != BACKGROUNDS[i % len(BACKGROUNDS)] else "black"
        sc = random_scene(rng, [shape], two_prob=0.0, background=bg, colours=[colour])
        imgs[i] = render(sc)
    return imgs, [f"a {token} thing"] * n
