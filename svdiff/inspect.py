"""Looking at spectral shifts: per-block norms, cross-shift similarity, a text summary.

* per-block norm: ||delta||_2 over all weights of a block (keys grouped by UNet block
  ``input_blocks.N`` / ``middle_block`` / ``output_blocks.N``, DiT block ``joint_blocks.N`` /
  ``double_blocks.N`` / ``single_blocks.N`` and text-encoder layer),
  drawn as a (grouped) bar chart;
* similarity: the cosine similarity of two shifts averaged over the layers they share,
  as in Fig. 9a / appendix Fig. 15 (:func:`svdiff.arithmetic.cosine_similarity_matrix`),
  drawn as a labelled heat map;
* a text summary: architecture, subset, rank, number of weights and values, file size,
  dtype and how the shift was made (its history).

Drawing uses PIL only (no plotting library).
"""

from __future__ import annotations

import json
import math
import re
from typing import Optional, Sequence

import torch

from .arithmetic import cosine_similarity_matrix
from .shift import SpectralShift

PALETTE = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (245, 121, 0), (117, 80, 123), (193, 125, 17)]

_UNET_BLOCK = re.compile(r"^diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.")
# DiT blocks: SD3's MMDiT joint blocks, Flux's double- and single-stream blocks
_DIT_BLOCK = re.compile(r"^diffusion_model\.(joint_blocks|double_blocks|single_blocks)\.(\d+)\.")
_DIT_LABEL = {"joint_blocks": (0, "joint"), "double_blocks": (0, "double"), "single_blocks": (2, "single")}
_TE_LAYER = re.compile(r"^(\w+)\.transformer\.(?:text_model\.)?encoder\.(?:layers|block)\.(\d+)\.")


def block_of(key: str) -> tuple:
    """(sort key, label) of the block a state-dict key belongs to."""
    m = _UNET_BLOCK.match(key)
    if m:
        part, n = m.group(1), int(m.group(2))
        return ((0, n) if part == "input_blocks" else (2, n)), ("in" if part == "input_blocks" else "out") + str(n)
    m = _DIT_BLOCK.match(key)
    if m:
        order, label = _DIT_LABEL[m.group(1)]
        return (order, int(m.group(2))), f"{label}{m.group(2)}"
    if key.startswith("diffusion_model.middle_block."):
        return (1, 0), "mid"
    if key.startswith("diffusion_model."):
        return (3, 0), "unet*"
    m = _TE_LAYER.match(key)
    if m:
        return (4, m.group(1), int(m.group(2))), f"{_te_label(m.group(1))}.{m.group(2)}"
    enc = key.split(".", 1)[0]
    return (5, enc, 0), f"{_te_label(enc)}*"


def _te_label(encoder: str) -> str:
    return encoder.replace("clip_", "te").replace("t5xxl", "t5")


def block_norms(shift: SpectralShift) -> dict:
    """label -> ||delta|| over the block's weights, in UNet / encoder order."""
    acc: dict = {}
    order: dict = {}
    for k, d in shift.deltas.items():
        sk, label = block_of(k)
        acc[label] = acc.get(label, 0.0) + float((d.double() ** 2).sum())
        order[label] = sk
    return {lab: math.sqrt(acc[lab]) for lab in sorted(acc, key=lambda x: order[x])}


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_w(draw, text, font) -> int:
    b = draw.textbbox((0, 0), text, font=font)
    return b[2] - b[0]


def draw_bar_chart(norms: Sequence[dict], labels: Sequence[str], width: int = 0, height: int = 300):
    """Grouped bar chart of per-block norms (one colour per shift), as a PIL RGB image."""
    from PIL import Image, ImageDraw

    blocks: list = []
    for n in norms:
        for b in n:
            if b not in blocks:
                blocks.append(b)
    if not blocks:
        blocks = ["(empty)"]
    nshift = max(1, len(norms))
    group_w = max(16, 8 * nshift + 6)
    left, right, top, bottom = 60, 20, 40, 60
    width = max(width, left + right + group_w * len(blocks), 360)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    vmax = max([v for n in norms for v in n.values()] + [0.0])
    scale = (height - top - bottom) / vmax if vmax > 0 else 0.0
    x0, y0 = left, height - bottom
    draw.line([(x0, top - 5), (x0, y0), (width - right, y0)], fill="black")
    draw.text((4, 4), "per-block ||delta||", fill="black", font=font)
    draw.text((4, top - 14), f"{vmax:.3g}", fill="black", font=font)
    draw.text((4, y0 - 12), "0", fill="black", font=font)
    gw = (width - right - left) / len(blocks)
    bw = max(2.0, (gw - 4) / nshift)
    for bi, b in enumerate(blocks):
        gx = left + bi * gw + 2
        for si, n in enumerate(norms):
            v = n.get(b, 0.0)
            h = v * scale
            x = gx + si * bw
            if h >= 1:  # a bar under one pixel is not drawn (PIL needs y1 >= y0)
                draw.rectangle([x, y0 - h, x + bw - 1, y0 - 1], fill=PALETTE[si % len(PALETTE)])
        # vertical-ish label: write every label, rotated by drawing on a small image
        lab = Image.new("RGB", (_text_w(draw, b, font) + 4, 14), "white")
        ImageDraw.Draw(lab).text((2, 0), b, fill="black", font=font)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (int(gx + gw / 2 - 7), y0 + 4))
    lx = left + 150
    for si, name in enumerate(labels):
        draw.rectangle([lx, 6, lx + 10, 16], fill=PALETTE[si % len(PALETTE)])
        draw.text((lx + 14, 4), name, fill="black", font=font)
        lx += 24 + _text_w(draw, name, font)
    return img


def _cmap(v: float) -> tuple:
    """-1 blue, 0 white, +1 red; NaN grey."""
    if v != v:
        return (200, 200, 200)
    v = max(-1.0, min(1.0, v))
    if v >= 0:
        return (255, int(255 * (1 - v)), int(255 * (1 - v)))
    return (int(255 * (1 + v)), int(255 * (1 + v)), 255)


def draw_heatmap(matrix: torch.Tensor, labels: Sequence[str], cell: int = 64):
    """Labelled heat map of a cosine-similarity matrix (values printed in the cells)."""
    from PIL import Image, ImageDraw

    n = matrix.shape[0]
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lw = max([_text_w(probe, s, font) for s in labels] + [20]) + 10
    top = 40
    w, h = lw + n * cell + 10, top + 20 + n * cell + 10
    title = "cosine similarity of delta, averaged over layers"
    img = Image.new("RGB", (max(w, _text_w(probe, title, font) + 12), h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black", font=font)
    for j, s in enumerate(labels):
        draw.text((lw + j * cell + 4, top), s[: max(3, cell // 7)], fill="black", font=font)
    for i in range(n):
        y = top + 20 + i * cell
        draw.text((4, y + cell // 2 - 6), labels[i], fill="black", font=font)
        for j in range(n):
            v = float(matrix[i, j])
            x = lw + j * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=_cmap(v))
            t = "n/a" if v != v else f"{v:.2f}"
            draw.text((x + cell // 2 - _text_w(draw, t, font) // 2, y + cell // 2 - 6), t, fill="black", font=font)
    return img


def render(shifts: Sequence[SpectralShift], labels: Optional[Sequence[str]] = None):
    """The inspection image: bar chart, and for two or more shifts the similarity heat map below it."""
    from PIL import Image

    labels = list(labels) if labels else [chr(65 + i) for i in range(len(shifts))]
    bars = draw_bar_chart([block_norms(s) for s in shifts], labels)
    if len(shifts) < 2:
        return bars
    heat = draw_heatmap(cosine_similarity_matrix(shifts), labels)
    w = max(bars.width, heat.width)
    out = Image.new("RGB", (w, bars.height + heat.height + 10), "white")
    out.paste(bars, (0, 0))
    out.paste(heat, (0, bars.height + 10))
    return out


def summary(shift: SpectralShift, label: str = "", file_size: Optional[int] = None) -> str:
    """A few lines describing one shift (what it is and how it was made)."""
    m = shift.metadata
    spectral = shift.spectral_keys()
    lines = [
        f"{label + ': ' if label else ''}{m.get('source_file') or 'spectral shift'}",
        f"  architecture: {m.get('architecture') or 'unknown'}   subset: {m.get('subset') or 'unspecified'}   rank: {m.get('rank') or 'full'}",
        f"  weights: {len(shift)} ({len(spectral)} matrices, {len(shift) - len(spectral)} 1-D)   values: {shift.num_values()}",
        f"  ||delta||: {math.sqrt(sum(float((d.double() ** 2).sum()) for d in shift.deltas.values())):.4g}",
    ]
    parts = []
    if file_size is not None:
        parts.append(f"file size: {file_size / 1024:.1f} KiB")
    parts.append(f"dtype: {m.get('file_dtype') or 'float32 (in memory)'}")
    lines.append("  " + "   ".join(parts))
    if m.get("trigger_words"):
        lines.append(f"  trigger words: {m['trigger_words']}")
    if m.get("description"):
        lines.append(f"  description: {m['description']}")
    hist = m.get("history") or []
    if hist:
        lines.append("  made by: " + json.dumps(hist, default=str)[:2000])
    return "\n".join(lines)
