"""Inspect Spectral Shift: per-block norms, cosine similarity heat map, text summary."""

import math
import os

import numpy as np
import torch

import svdiff.arithmetic as A
import svdiff.inspect as I
import svdiff.shiftfile as shiftfile
from svdiff.shift import SpectralShift

K_IN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
K_IN2 = "diffusion_model.input_blocks.1.1.proj_in.weight"
K_MID = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
K_OUT = "diffusion_model.output_blocks.3.1.norm.weight"
K_TE = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
SHAPES = {K_IN: (4, 3), K_IN2: (4, 4), K_MID: (5, 3), K_OUT: (6,), K_TE: (3, 3)}


def make(values: dict, meta=None):
    deltas = {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
    return SpectralShift(deltas, {k: SHAPES[k] for k in deltas}, dict(meta or {"architecture": "SD15", "subset": "UNet"}))


def test_block_norms_group_by_block():
    s = make({K_IN: [3.0, 0, 0], K_IN2: [0, 4.0, 0, 0], K_MID: [1.0, 0, 0], K_OUT: [0.0] * 5 + [2.0], K_TE: [0, 0, 1.0]})
    n = I.block_norms(s)
    assert list(n) == ["in1", "mid", "out3", "tel.0"]
    assert n["in1"] == 5.0 and n["mid"] == 1.0 and n["out3"] == 2.0 and n["tel.0"] == 1.0


def _palette_pixels(img, color):
    a = np.asarray(img)
    return (a == np.array(color, dtype=a.dtype)).all(axis=-1)


def test_bar_chart_heights_follow_norms():
    img = I.draw_bar_chart([{"a": 1.0, "b": 2.0, "c": 0.0}], ["A"], width=420, height=300)
    mask = _palette_pixels(img, I.PALETTE[0])
    mask[:20] = False  # the legend swatch at the top
    left, right = 60, img.width - 20
    gw = (right - left) / 3
    cols = [mask[:, int(left + i * gw): int(left + (i + 1) * gw)].sum() for i in range(3)]
    assert cols[2] == 0 and cols[0] > 0
    assert abs(cols[1] / cols[0] - 2.0) < 0.1


def test_cosine_similarity_matrix_and_heatmap_colours():
    a = make({K_IN: [1.0, 2.0, 0.0], K_MID: [0.0, 1.0, 1.0]})
    neg = A.scale(a, -1.0)
    orth = make({K_IN: [2.0, -1.0, 0.0], K_MID: [0.0, 1.0, -1.0]})
    other = make({K_OUT: [1.0] * 6})
    m = A.cosine_similarity_matrix([a, neg, orth, other])
    assert torch.allclose(m[:3, :3], torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1]]), atol=1e-6)
    assert math.isnan(float(m[0, 3])) and float(m[3, 3]) == 1.0  # no shared layer: undefined
    # mean over layers, not over concatenated values
    half = make({K_IN: [1.0, 2.0, 0.0], K_MID: [0.0, 1.0, -1.0]})
    assert abs(float(A.cosine_similarity_matrix([a, half])[0, 1]) - 0.5) < 1e-6
    img = I.draw_heatmap(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), ["A", "B"], cell=40)
    red, blue = _palette_pixels(img, (255, 0, 0)).sum(), _palette_pixels(img, (0, 0, 255)).sum()
    assert red > 2 * 30 * 30 and blue > 2 * 30 * 30


def test_render_single_and_multiple():
    a = make({K_IN: [1.0, 2.0, 0.0], K_MID: [0.0, 1.0, 1.0]})
    b = make({K_IN: [0.5, 0.0, 0.0], K_OUT: [0.1] * 6})
    one = I.render([a])
    two = I.render([a, b], ["A", "B"])
    assert two.height > one.height  # the heat map is added below the bars
    assert _palette_pixels(two, I.PALETTE[1]).sum() > 0  # B's bars


def test_inspect_node_image_and_summary(comfy, shift_dir):
    from svdiff_testkit.comfy_env import pack_module

    node = pack_module("nodes.arithmetic").SVDiffInspectShift
    a = make({K_IN: [1.0, 2.0, 0.0], K_MID: [0.0, 1.0, 1.0], K_OUT: [0.2] * 6}, {"architecture": "SD15", "subset": "UNet"})
    path = os.path.join(shift_dir, "inspect_a.safetensors")
    if os.path.exists(path):
        os.remove(path)
    shiftfile.save_shift(a, path)
    loaded = shiftfile.load_shift(path)
    b = A.scale(loaded, -0.5)
    out = node.execute(shift_a=loaded, shift_b=b)
    image, text = out.args
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert "architecture: SD15" in text and "subset: UNet" in text
    assert "weights: 3 (2 matrices, 1 1-D)" in text and "values: 12" in text
    assert f"file size: {os.path.getsize(path) / 1024:.1f} KiB" in text and "dtype: float16" in text
    assert '"op": "scale"' in text  # how B was made
    assert "B: -1.000" in text  # cosine similarity of a shift and its negative scale
