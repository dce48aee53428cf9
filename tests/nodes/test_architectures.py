"""Keys and value counts on the real checkpoints of every family, built on the meta device.

No weights are allocated: ComfyUI's own model and text-encoder classes are instantiated under
``torch.device("meta")`` with the configurations ComfyUI detects for each checkpoint
(``svdiff_testkit.meta_families``).  The counts below are facts of those classes on both
supported ComfyUI versions (the one difference is named where it is asserted); the README's
family table must show the same numbers (``test_readme_family_table_matches``).
"""

import os

import pytest
import torch

from svdiff.decompose import num_singular_values
from svdiff.shift import SpectralShift, delta_length
import svdiff.shiftfile as F
import svdiff.subsets as subsets
from svdiff_testkit import comfy_env
from svdiff_testkit import meta_families as M

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")
NEW_COMFY = comfy_env.comfy_version() != "0.3.75"

# (matrices, weights in matrices, singular values, 1-D weights, 1-D values, U+V values)
EXPECTED = {
    "SD1.5": (282, 859_077_120, 222_696, 109, 100_160, 1_081_298_720),
    "SD2.1": (282, 865_466_880, 225_768, 109, 100_160, 1_093_193_504),
    "SDXL": (794, 2_565_880_320, 909_800, 256, 294_080, 3_670_265_632),
    "SD3.5 medium": (271, 2_241_921_024, 412_032, 122, 7_808, 2_874_286_080),
    "SD3.5 large": (385, 8_053_850_112, 929_024, 152, 9_728, 10_311_589_888),
    # Flux's 152 q/k RMSNorm scales are `….scale` keys on ComfyUI 0.3.75, `….weight` on 0.33: shifted on both
    "Flux-dev": (314, 11_898_322_944, 950_656, 152, 19_456, 14_815_141_888),
    "CLIP-L": (75, 123_528_960, 56_909, 25, 19_200, 167_181_865),
    "CLIP-H": (147, 353_711_104, 149_581, 49, 50_176, 506_809_129),
    "CLIP-G": (195, 694_124_800, 248_397, 65, 83_200, 1_011_980_329),
    "T5-XXL": (170, 4_762_109_952, 692_256, 49, 200_704, 7_597_460_480),
}
FIELDS = ("matrices", "weights", "singular_values", "vectors", "vector_values", "uv_values")
DIT_CONFIGS = {"SD3.5 medium": M.SD35_MEDIUM, "SD3.5 large": M.SD35_LARGE}


class _P:
    def __init__(self, m):
        self.model = m


@pytest.fixture(scope="module")
def models(comfy):
    """checkpoint / text encoder -> (module, key prefix), built once on the meta device."""
    out = {ck: (M.diffusion_model(ck), "diffusion_model.") for ck in M.CHECKPOINTS}
    out.update({te: M.text_encoder(te) for te in M.TEXT_ENCODERS})
    return out


@pytest.fixture(scope="module")
def shapes_of(models, pack):
    ad = pack("nodes.adapter")
    return {name: ad.shiftable_shapes(_P(m), prefix) for name, (m, prefix) in models.items()}


@pytest.fixture(scope="module")
def size_table(shapes_of):
    return {name: M.sizes(sh, M.CHECKPOINTS[name][0] if name in M.CHECKPOINTS else name) for name, sh in shapes_of.items()}


def test_sd15_unet_value_counts_match_the_paper_space(models, shapes_of):
    shapes = shapes_of["SD1.5"]
    mats = {k: s for k, s in shapes.items() if len(s) >= 2}
    assert len(shapes) == 391 and len(mats) == 282
    assert sum(num_singular_values(s) for s in mats.values() if len(s) == 2) == 140_416
    assert sum(num_singular_values(s) for s in mats.values() if len(s) == 4) == 82_280
    kv = subsets.select(shapes, "UNet-CA-KV")
    assert sum(num_singular_values(shapes[k]) for k in kv) == 18_816
    ca = subsets.select(shapes, "UNet-CA")
    assert sum(num_singular_values(shapes[k]) for k in ca if len(shapes[k]) >= 2) == 43_776


def test_sd15_table1_subsets_partition_sensibly(shapes_of):
    shapes = shapes_of["SD1.5"]
    n = {name: len(subsets.select(shapes, name)) for name in subsets.UNET_SUBSET_NAMES}
    assert n["UNet"] == 391
    assert n["UNet-1D"] + n["UNet-2D"] + n["UNet-4D"] == 391
    assert n["Up-CA"] + n["Down-CA"] + n["Mid-CA"] == n["UNet-CA"] == 16 * 4
    assert n["UNet-CA-KV"] == 32
    assert n["Up-Blocks"] + n["Down-Blocks"] + n["Mid-Block"] < 391  # conv_in, time embedding and out are in none


def test_sd15_clip_l_keys(shapes_of):
    shapes = shapes_of["CLIP-L"]
    layers = [k for k in shapes if ".encoder.layers." in k]
    assert len(layers) == 12 * 8  # q, k, v, out, fc1, fc2 + two layer norms per layer
    assert num_singular_values(shapes["clip_l.transformer.text_model.embeddings.token_embedding.weight"]) == 768
    assert all(k.startswith("clip_l.transformer.") for k in shapes)


def test_sd15_full_shift_round_trips_through_a_file(shapes_of, tmp_path):
    shapes = {**shapes_of["SD1.5"], **shapes_of["CLIP-L"]}
    sh = SpectralShift({k: torch.zeros(delta_length(s)) for k, s in shapes.items()}, shapes, {"architecture": "SD15"})
    p16 = F.save_shift(sh, str(tmp_path / "full16.safetensors"))
    p32 = F.save_shift(sh, str(tmp_path / "full32.safetensors"), dtype="float32")
    back = F.load_shift(p16)
    assert F.check_compatible(back, shapes, p16) and len(back) == len(shapes) == 491
    size16, size32 = os.path.getsize(p16), os.path.getsize(p32)
    values = sh.num_values()
    assert size16 == F.predicted_file_size(sh) and size16 > 2 * values and size32 > 4 * values
    print(f"SD1.5 UNet+CLIP-L shift: {len(sh)} tensors, {values} values, {size16/1e6:.2f} MB fp16, {size32/1e6:.2f} MB fp32")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_and_sizes_of_real_checkpoints(name, size_table):
    got = size_table[name]
    assert tuple(got[f] for f in FIELDS) == EXPECTED[name]
    assert got["uv_fp16_bytes"] == 2 * got["uv_values"]
    # the file holds one fp16 value per singular value / 1-D value, plus its header
    values = got["singular_values"] + got["vector_values"]
    tensors = got["matrices"] + got["vectors"]
    assert 2 * values < got["shift_fp16_bytes"] < 2 * values + 300 * tensors


@pytest.mark.parametrize("ck", list(M.CHECKPOINTS))
def test_every_weight_of_the_diffusion_model_gets_a_key(ck, models, shapes_of):
    model = models[ck][0]
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    shapes = shapes_of[ck]
    # every `….weight`, and on ComfyUI 0.3.75 Flux's q/k RMSNorm scales, which it names `….scale`
    scales = {k for k in sd if k.endswith(".scale")}
    assert len(scales) == (152 if ck == "Flux-dev" and not NEW_COMFY else 0)
    assert sorted(k for k in sd if k.endswith(".weight")) + sorted(scales) == sorted(shapes, key=lambda k: (k.endswith(".scale"), k))
    # everything else is a bias or SD3's positional embedding
    rest = {k.rsplit(".", 1)[-1] for k in sd if k not in shapes}
    assert rest == {"bias"} | ({"pos_embed"} if ck.startswith("SD3") else set())
    # ... and the parameters add up
    n1d = sum(s[0] for s in shapes.values() if len(s) == 1)
    n2d = sum(torch.Size(s).numel() for s in shapes.values() if len(s) >= 2)
    assert n1d + n2d + sum(v.numel() for k, v in sd.items() if k not in shapes) == sum(v.numel() for v in sd.values())


@pytest.mark.parametrize("ck", [c for c in M.CHECKPOINTS if M.CHECKPOINTS[c][0] in ("SD3", "Flux")])
def test_dit_configs_are_what_comfyui_detects_from_their_keys(ck, models):
    found, detected = M.detected_config(models[ck][0])
    assert found == M.CHECKPOINTS[ck][0]
    cfg = DIT_CONFIGS.get(ck) or M.flux_dev_config()
    assert {k: detected.get(k) for k in cfg} == cfg


@pytest.mark.parametrize("ck", list(M.CHECKPOINTS))
def test_each_text_encoder_is_the_one_the_checkpoint_loads(ck, comfy, shapes_of):
    whole = M.family_text_encoder(ck)
    for te in M.CHECKPOINTS[ck][2]:
        prefix = M.TEXT_ENCODERS[te][0]
        assert M.weight_shapes(whole, prefix) == shapes_of[te], (ck, te)


def test_the_issue_numbers(size_table):
    """Issue 15 states SDXL's and Flux-dev's sizes rounded; the computed ones agree."""
    xl, fx = size_table["SDXL"], size_table["Flux-dev"]
    assert round(xl["weights"] / 1e9, 3) == 2.566 and xl["matrices"] == 794
    assert xl["singular_values"] == 909_800 and xl["vector_values"] == 294_080
    assert round(xl["uv_values"] / 1e9, 2) == 3.67 and round(xl["uv_values"] / xl["weights"], 2) == 1.43
    assert round(xl["uv_fp16_bytes"] / 2**30, 1) == 6.8
    assert round(fx["weights"] / 1e9, 3) == 11.898 and fx["matrices"] == 314 and fx["singular_values"] == 950_656
    assert round(fx["uv_values"] / 1e9, 2) == 14.82 and round(fx["uv_fp16_bytes"] / 2**30, 1) == 27.6
    assert round(fx["shift_fp16_bytes"] / 1e6, 1) in (1.9, 2.0)  # "a shift of ≈1.9 MB"


# ------------------------------------------------------------------ the README's table
PART = {"SD1.5": "SD1.5 UNet", "SD2.1": "SD2.1 UNet", "SDXL": "SDXL UNet", "SD3.5 medium": "SD3.5 medium MMDiT",
        "SD3.5 large": "SD3.5 large MMDiT", "Flux-dev": "Flux-dev DiT"}


def table_row(name: str, s: dict) -> list:
    users = ", ".join(ck for ck, (_, _, tes) in M.CHECKPOINTS.items() if name in tes)
    return [PART.get(name, name), users or "—", f"{s['matrices']}", f"{s['weights'] / 1e9:.3f} G",
            f"{s['singular_values']:,}", f"{s['vectors']} ({s['vector_values']:,})", f"{s['shift_fp16_bytes'] / 1e6:.2f} MB",
            f"{s['uv_values'] / 1e9:.2f} G ({s['uv_values'] / s['weights']:.2f}×)", f"{s['uv_fp16_bytes'] / 2**30:.1f} GiB"]


def readme_rows() -> dict:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("<!-- family-sizes:start -->")
    end = text.index("<!-- family-sizes:end -->")
    rows = {}
    for line in text[start:end].splitlines():
        if line.startswith("| ") and not line.startswith("| model part") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_readme_family_table_matches(size_table):
    """The README's table is what this test prints (``-s``), on either ComfyUI version."""
    table = {name: table_row(name, size_table[name]) for name in EXPECTED}
    print("\n".join("| " + " | ".join(row) + " |" for row in table.values()))
    rows = readme_rows()
    for name, row in table.items():
        assert rows.get(row[0]) == row, (name, rows.get(row[0]), row)
    assert len(rows) == len(EXPECTED)
