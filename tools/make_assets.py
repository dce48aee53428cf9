"""Draw the pack's sample pictures (``assets/*.png``) procedurally with Pillow.

Every picture is made by this script alone (no photograph, no third-party content), so the
project owns them outright; they are released with the project (see assets/SOURCE.md).
They are stand-ins for a user's own photos: a toy robot (the "subject" of the single-subject
workflow, 3 views), a rubber duck (the second subject of the multi-subject workflow,
2 views) and a scene with a cup (the single image of the editing workflow).

It also draws the pack's icon (``assets/icon.png``, 256x256, what ``[tool.comfy] Icon`` in
pyproject.toml points to for the Comfy Registry): a model's singular values as descending
bars, each with its learned spectral shift (SVDiff's ``sigma + delta``) drawn as a coloured
cap that moves the bar's top up or down.

And the pictures of the node help pages (``web/docs/*.png``, served with the pages at
``/extensions/<pack>/docs/``): the same spectral-shift drawing, a Cut-Mix sample made of two
of the sample pictures (Sec. 3.3, Fig. 3) and a small copy of ``docs/toyworld_fig9b.png``.

Run: ``.venv/bin/python tools/make_assets.py`` (deterministic; rewrites assets/*.png and web/docs/*.png).
The icon is not a sample picture: the harness does not copy it into ComfyUI's input folder.
"""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw

SIZE = 256
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "assets")
HELP_OUT = os.path.join(REPO, "web", "docs")


def background(d: ImageDraw.ImageDraw, rnd: random.Random, kind: str) -> None:
    if kind == "table":
        d.rectangle([0, 0, SIZE, SIZE * 0.6], fill=(222, 214, 196))
        d.rectangle([0, SIZE * 0.6, SIZE, SIZE], fill=(150, 102, 60))
        for i in range(6):
            y = int(SIZE * 0.62 + i * 16 + rnd.randint(-3, 3))
            d.line([0, y, SIZE, y + rnd.randint(-4, 4)], fill=(132, 88, 50), width=2)
    elif kind == "grass":
        d.rectangle([0, 0, SIZE, SIZE * 0.55], fill=(150, 196, 236))
        d.ellipse([180, 20, 230, 70], fill=(252, 226, 120))
        d.rectangle([0, SIZE * 0.55, SIZE, SIZE], fill=(96, 160, 72))
        for _ in range(80):
            x, y = rnd.randint(0, SIZE), rnd.randint(int(SIZE * 0.56), SIZE)
            d.line([x, y, x + rnd.randint(-3, 3), y - rnd.randint(4, 9)], fill=(70, 128, 52), width=1)
    elif kind == "bathroom":
        d.rectangle([0, 0, SIZE, SIZE], fill=(200, 226, 232))
        for x in range(0, SIZE, 32):
            d.line([x, 0, x, SIZE], fill=(176, 204, 212), width=2)
        for y in range(0, SIZE, 32):
            d.line([0, y, SIZE, y], fill=(176, 204, 212), width=2)
        d.rectangle([0, SIZE * 0.7, SIZE, SIZE], fill=(112, 168, 204))
    else:  # plain studio
        for y in range(SIZE):
            c = 236 - y // 6
            d.line([0, y, SIZE, y], fill=(c, c, c - 8))


def robot(d: ImageDraw.ImageDraw, cx: int, cy: int, s: float) -> None:
    def box(x0, y0, x1, y1, fill):
        d.rounded_rectangle([cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s], radius=6 * s, fill=fill, outline=(40, 40, 48), width=max(1, int(2 * s)))

    box(-30, -10, 30, 50, (200, 60, 52))          # body
    box(-24, -58, 24, -14, (214, 214, 222))       # head
    d.line([cx, cy - 58 * s, cx, cy - 74 * s], fill=(40, 40, 48), width=max(1, int(3 * s)))
    d.ellipse([cx - 5 * s, cy - 80 * s, cx + 5 * s, cy - 70 * s], fill=(250, 200, 40))
    for ex in (-10, 10):
        d.ellipse([cx + (ex - 6) * s, cy - 44 * s, cx + (ex + 6) * s, cy - 32 * s], fill=(40, 140, 220))
    box(-44, -4, -32, 34, (170, 50, 44))          # arms
    box(32, -4, 44, 34, (170, 50, 44))
    box(-24, 50, -6, 70, (60, 60, 70))            # legs
    box(6, 50, 24, 70, (60, 60, 70))
    d.rectangle([cx - 12 * s, cy + 6 * s, cx + 12 * s, cy + 18 * s], fill=(250, 200, 40))


def duck(d: ImageDraw.ImageDraw, cx: int, cy: int, s: float, flip: bool = False) -> None:
    k = -1 if flip else 1
    d.ellipse([cx - 46 * s, cy - 10 * s, cx + 46 * s, cy + 44 * s], fill=(250, 214, 40), outline=(120, 96, 20), width=2)
    hx = cx + k * 22 * s
    d.ellipse([hx - 24 * s, cy - 52 * s, hx + 24 * s, cy - 4 * s], fill=(250, 214, 40), outline=(120, 96, 20), width=2)
    bx = hx + k * 22 * s
    d.polygon([(bx, cy - 32 * s), (bx + k * 22 * s, cy - 26 * s), (bx, cy - 20 * s)], fill=(240, 120, 30))
    d.ellipse([hx + k * 6 * s - 4 * s, cy - 40 * s, hx + k * 6 * s + 4 * s, cy - 32 * s], fill=(20, 20, 20))


def cup(d: ImageDraw.ImageDraw, cx: int, cy: int, s: float) -> None:
    d.rectangle([cx - 26 * s, cy - 30 * s, cx + 26 * s, cy + 30 * s], fill=(240, 240, 236), outline=(90, 90, 96), width=2)
    d.ellipse([cx - 26 * s, cy - 38 * s, cx + 26 * s, cy - 22 * s], fill=(110, 70, 40), outline=(90, 90, 96), width=2)
    d.arc([cx + 16 * s, cy - 14 * s, cx + 46 * s, cy + 16 * s], 270, 90, fill=(90, 90, 96), width=max(2, int(5 * s)))


PICTURES = [
    ("robot_01.png", "studio", lambda d: robot(d, 128, 140, 1.3)),
    ("robot_02.png", "table", lambda d: robot(d, 100, 150, 1.0)),
    ("robot_03.png", "grass", lambda d: robot(d, 150, 150, 1.15)),
    ("duck_01.png", "bathroom", lambda d: duck(d, 128, 160, 1.3)),
    ("duck_02.png", "studio", lambda d: duck(d, 120, 150, 1.1, flip=True)),
    ("scene_cup.png", "table", lambda d: cup(d, 128, 150, 1.4)),
]


ICON = "icon.png"
ICON_SIZE = 256  # the Comfy Registry wants a square icon of at most 400x400


def icon(size: int = ICON_SIZE) -> Image.Image:
    """The pack's icon: singular values (grey bars, descending) and their shifts (caps).

    Drawn at 4x and reduced (smooth edges with plain ImageDraw); no randomness.
    """
    k = 4
    n = size * k
    img = Image.new("RGBA", (n, n), (0, 0, 0, 0))  # transparent outside the rounded square
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, n - 1, n - 1], radius=int(n * 0.18), fill=(28, 32, 48))
    sigmas = [0.86, 0.68, 0.54, 0.43, 0.34, 0.27, 0.21]         # a descending spectrum
    deltas = [0.07, -0.09, 0.10, -0.06, 0.09, -0.05, 0.08]      # the learned shifts
    left, right, base = int(n * 0.14), int(n * 0.86), int(n * 0.84)
    slot = (right - left) / len(sigmas)
    bar = slot * 0.62
    height = n * 0.66
    for i, (s, dl) in enumerate(zip(sigmas, deltas)):
        x0 = left + i * slot + (slot - bar) / 2
        x1 = x0 + bar
        top, shifted = base - s * height, base - (s + dl) * height
        d.rectangle([x0, min(top, shifted), x1, base], fill=(120, 128, 150))  # sigma
        if dl > 0:   # the shift raises the value: a warm cap above the old top
            d.rectangle([x0, shifted, x1, top], fill=(255, 170, 60))
        else:        # the shift lowers it: the removed part as a cool outline
            d.rectangle([x0, top, x1, shifted], fill=(28, 32, 48), outline=(90, 200, 240), width=2 * k)
        d.line([x0 - 3 * k, shifted, x1 + 3 * k, shifted], fill=(255, 255, 255), width=3 * k)  # sigma + delta
    d.line([left - 4 * k, base + 2 * k, right + 4 * k, base + 2 * k], fill=(200, 204, 216), width=3 * k)
    return img.resize((size, size), Image.LANCZOS)


def write_icon() -> str:
    path = os.path.join(OUT, ICON)
    icon().save(path, optimize=True)
    return path


def cutmix_sample(left: str = "robot_01.png", right: str = "duck_01.png", size: int = SIZE) -> Image.Image:
    """A left-right Cut-Mix sample as the Cut-Mix Builder makes it: each half is its subject's
    picture resized to cover the half and centre-cropped (svdiff.cutmix.resize_cover)."""
    from PIL import ImageOps

    out = Image.new("RGB", (size, size))
    for i, name in enumerate((left, right)):
        with Image.open(os.path.join(OUT, name)) as src:
            half = ImageOps.fit(src.convert("RGB"), (size // 2, size), Image.LANCZOS, centering=(0.5, 0.5))
        out.paste(half, (i * (size // 2), 0))
    ImageDraw.Draw(out).line([size // 2, 0, size // 2, size], fill=(255, 255, 255), width=1)
    return out


def small_copy(src: str, width: int = 640) -> Image.Image:
    with Image.open(src) as img:
        img = img.convert("RGB")
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    return img.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE)


def write_help_pictures() -> list[str]:
    """The pictures the node help pages (web/docs/*.md) show."""
    os.makedirs(HELP_OUT, exist_ok=True)
    pictures = {
        "spectral_shift.png": icon(),
        "cutmix_left_right.png": cutmix_sample(),
        "toyworld_fig9b.png": small_copy(os.path.join(REPO, "docs", "toyworld_fig9b.png")),
    }
    paths = []
    for name, img in pictures.items():
        path = os.path.join(HELP_OUT, name)
        img.save(path, optimize=True)
        paths.append(path)
    return paths


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    path = write_icon()
    print(f"{path} ({os.path.getsize(path)} bytes)")
    for i, (name, bg, draw) in enumerate(PICTURES):
        rnd = random.Random(1000 + i)
        img = Image.new("RGB", (SIZE, SIZE))
        d = ImageDraw.Draw(img)
        background(d, rnd, bg)
        draw(d)
        path = os.path.join(OUT, name)
        img.save(path, optimize=True)
        print(f"{path} ({os.path.getsize(path)} bytes)")
    for path in write_help_pictures():
        print(f"{path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
