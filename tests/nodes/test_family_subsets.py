"""Family-aware subsets and style presets on the real architectures of every family.

The models are ComfyUI's own classes built on the meta device (``svdiff_testkit.meta_families``):
the key sets are exactly those of SD1.5, SD2.1, SDXL, SD3.5 medium/large and Flux-dev as
ComfyUI loads them.  Every subset of a family is non-empty there , has
the exact count below, and the subsets split the model as documented in the README.
"""

import re
import types

import pytest
import torch

import svdiff.arithmetic as A
import svdiff.subsets as S
from svdiff.shift import SpectralShift, delta_length
from svdiff_testkit import meta_families as M

UNET_COUNTS = {
    # UNet, CA, CA-KV, 1D, 2D, 4D, Up, Down, Mid, Up-CA, Down-CA, Mid-CA
    "SD1.5": (391, 64, 32, 109, 184, 98, 219, 141, 26, 36, 24, 4),
    "SD2.1": (391, 64, 32, 109, 216, 66, 219, 141, 26, 36, 24, 4),
    "SDXL": (1050, 280, 140, 256, 743, 51, 542, 358, 143, 144, 96, 40),
}
_FLUX = {"DiT": 466, "DiT-Attn": 304, "DiT-Text-QKV": 19, "DiT-MLP": 152, "DiT-1D": 152, "DiT-Early-Blocks": 266,
             "DiT-Middle-Blocks": 95, "DiT-Late-Blocks": 95, "Flux-Double-Blocks": 266, "Flux-Single-Blocks": 190}
DIT_COUNTS = {
    "SD3.5 medium": {"DiT": 393, "DiT-Attn": 243, "DiT-Text-QKV": 24, "DiT-MLP": 94, "DiT-1D": 122,
                     "DiT-Early-Blocks": 144, "DiT-Middle-Blocks": 132, "DiT-Late-Blocks": 109},
    "SD3.5 large": {"DiT": 537, "DiT-Attn": 303, "DiT-Text-QKV": 38, "DiT-MLP": 150, "DiT-1D": 152,
                    "DiT-Early-Blocks": 182, "DiT-Middle-Blocks": 168, "DiT-Late-Blocks": 179},
    "Flux-dev": _FLUX,  # its q/k norm scales are `….scale` keys on ComfyUI 0.3.75, `….weight` on 0.33
}


class _P:
    def __init__(self, m):
        self.model = m


@pytest.fixture(scope="module")
def shapes_of(comfy, pack):
    ad = pack("nodes.adapter")
    return {ck: ad.shiftable_shapes(_P(M.diffusion_model(ck)), "diffusion_model.") for ck in M.CHECKPOINTS}


def sel(shapes, name) -> set:
    return set(S.select(shapes, name))


def test_families_and_layouts_are_read_from_the_keys(shapes_of):
    fam = {ck: S.family_of(sh) for ck, sh in shapes_of.items()}
    assert fam == {"SD1.5": S.FAMILY_UNET, "SD2.1": S.FAMILY_UNET, "SDXL": S.FAMILY_UNET, "SD3.5 medium": S.FAMILY_MMDIT,
                   "SD3.5 large": S.FAMILY_MMDIT, "Flux-dev": S.FAMILY_FLUX}
    assert [S.unet_layout(shapes_of[ck]) for ck in UNET_COUNTS] == [S.LAYOUT_SD1, S.LAYOUT_SD1, S.LAYOUT_SDXL]
    assert S.family_of(["clip_l.transformer.text_model.final_layer_norm.weight"]) is None


@pytest.mark.parametrize("ck", list(UNET_COUNTS))
def test_table1_subsets_on_every_unet(ck, shapes_of):
    shapes = shapes_of[ck]
    n = {name: len(S.select(shapes, name)) for name in S.subsets_for(S.FAMILY_UNET)}
    assert tuple(n.values()) == UNET_COUNTS[ck] and all(n.values())
    unet, ca, kv = sel(shapes, "UNet"), sel(shapes, "UNet-CA"), sel(shapes, "UNet-CA-KV")
    assert unet == set(shapes)
    assert sel(shapes, "UNet-1D") | sel(shapes, "UNet-2D") | sel(shapes, "UNet-4D") == unet
    assert sel(shapes, "UNet-1D").isdisjoint(sel(shapes, "UNet-2D") | sel(shapes, "UNet-4D"))
    up, down, mid = sel(shapes, "Up-Blocks"), sel(shapes, "Down-Blocks"), sel(shapes, "Mid-Block")
    assert not (up & down or up & mid or down & mid)
    # the rest is conv_in, the time (and SDXL's ADM) embedding and the output head
    rest = {".".join(k.split(".")[1:3]) for k in unet - up - down - mid}
    assert rest == {"input_blocks.0", "time_embed.0", "time_embed.2", "out.0", "out.2"} | (
        {"label_emb.0"} if ck == "SDXL" else set())
    assert sel(shapes, "Up-CA") | sel(shapes, "Down-CA") | sel(shapes, "Mid-CA") == ca
    assert sel(shapes, "Up-CA") <= up and sel(shapes, "Down-CA") <= down and sel(shapes, "Mid-CA") <= mid
    # every transformer block has one cross-attention: q, k, v, out; k and v in CA-KV
    blocks = {k.split(".attn2.")[0] for k in ca}
    assert len(ca) == 4 * len(blocks) and kv <= ca and len(kv) == 2 * len(blocks)
    assert all(shapes[k][1] == {"SD1.5": 768, "SD2.1": 1024, "SDXL": 2048}[ck] for k in kv)  # they read the text


def test_sdxl_cross_attention_sits_where_sdxl_has_it(shapes_of):
    shapes = shapes_of["SDXL"]

    def hosts(name):
        return sorted({tuple(k.split(".")[1:3]) for k in S.select(shapes, name)}, key=lambda t: (t[0], int(t[1])))

    assert hosts("Down-CA") == [("input_blocks", "4"), ("input_blocks", "5"), ("input_blocks", "7"), ("input_blocks", "8")]
    assert hosts("Up-CA") == [("output_blocks", str(i)) for i in range(6)]
    assert not any(re.match(r"diffusion_model\.input_blocks\.(9|1\d)\.", k) for k in shapes)  # no level 3
    assert len({k.split(".attn2.")[0] for k in S.select(shapes, "UNet-CA")}) == 70  # 2+2+10+10, 10, 3*2+3*10


@pytest.mark.parametrize("ck", list(DIT_COUNTS))
def test_dit_subsets_exact_counts(ck, shapes_of):
    shapes = shapes_of[ck]
    fam = S.family_of(shapes)
    n = {name: len(S.select(shapes, name)) for name in S.subsets_for(fam)}
    assert n == DIT_COUNTS[ck] and all(n.values())
    assert sel(shapes, "DiT") == set(shapes)
    assert sel(shapes, "DiT-1D") == {k for k, s in shapes.items() if len(s) == 1}


def _block_keys(shapes):
    return {k for k in shapes if re.match(r"diffusion_model\.(joint|double|single)_blocks\.\d+\.", k)}


@pytest.mark.parametrize("ck", ["SD3.5 medium", "SD3.5 large"])
def test_mmdit_subsets_split_the_blocks(ck, shapes_of):
    shapes = shapes_of[ck]
    attn, mlp, qkv = sel(shapes, "DiT-Attn"), sel(shapes, "DiT-MLP"), sel(shapes, "DiT-Text-QKV")
    blocks = _block_keys(shapes)
    mod = {k for k in blocks if ".adaLN_modulation." in k}
    assert attn.isdisjoint(mlp) and (attn | mlp | mod) == blocks and not (attn | mlp) & mod
    assert qkv <= attn and all(k.endswith("context_block.attn.qkv.weight") for k in qkv)
    assert all(shapes[k] == (3 * shapes[k][1], shapes[k][1]) for k in qkv)  # fused Q, K, V of the text stream
    assert sel(shapes, "DiT-1D") <= attn  # the q/k RMSNorm scales
    thirds = [sel(shapes, f"DiT-{p}-Blocks") for p in ("Early", "Middle", "Late")]
    assert set().union(*thirds) == blocks and sum(map(len, thirds)) == len(blocks)
    depth = M.SD35_MEDIUM["depth"] if "medium" in ck else M.SD35_LARGE["depth"]
    assert S.block_sequence(shapes) == [f"diffusion_model.joint_blocks.{i}." for i in range(depth)]
    assert sel(shapes, "DiT-Blocks[-8:]") == {k for k in blocks if int(k.split(".")[2]) >= depth - 8}
    a = round(depth / 3)
    assert sel(shapes, f"DiT-Blocks[0:{a}]") == thirds[0]
    assert (set(shapes) - blocks) == {k for k in shapes if not k.startswith("diffusion_model.joint_blocks.")}


def test_flux_subsets_split_the_blocks(shapes_of):
    shapes = shapes_of["Flux-dev"]
    attn, mlp, qkv = sel(shapes, "DiT-Attn"), sel(shapes, "DiT-MLP"), sel(shapes, "DiT-Text-QKV")
    blocks = _block_keys(shapes)
    double, single = sel(shapes, "Flux-Double-Blocks"), sel(shapes, "Flux-Single-Blocks")
    assert double | single == blocks and not double & single
    # the fused single-block projections are attention and MLP at once: exactly those are in both
    assert attn & mlp == {f"diffusion_model.single_blocks.{i}.linear{j}.weight" for i in range(38) for j in (1, 2)}
    mod = {k for k in blocks if re.search(r"\.(img_mod|txt_mod|modulation)\.lin\.", k)}
    assert attn | mlp | mod == blocks and not (attn | mlp) & mod
    assert qkv == {f"diffusion_model.double_blocks.{i}.txt_attn.qkv.weight" for i in range(19)}
    assert sel(shapes, "DiT-Early-Blocks") == double == sel(shapes, "DiT-Blocks[:19]")
    assert sel(shapes, "DiT-Middle-Blocks") | sel(shapes, "DiT-Late-Blocks") == single == sel(shapes, "DiT-Blocks[19:]")
    assert S.block_sequence(shapes)[19] == "diffusion_model.single_blocks.0."


@pytest.mark.parametrize("ck", list(M.CHECKPOINTS))
def test_a_subset_of_another_family_is_refused_with_the_familys_subsets(ck, shapes_of):
    shapes = shapes_of[ck]
    fam = S.family_of(shapes)
    mine = S.subsets_for(fam)
    for name in S.SUBSET_NAMES:
        if name in mine:
            continue
        with pytest.raises(S.SubsetError) as e:
            S.select(shapes, name)
        msg = str(e.value)
        assert repr(name) in msg and S.FAMILY_TITLES[fam] in msg and ", ".join(mine) in msg
    with pytest.raises(S.SubsetError, match="unknown subset 'UNet-XA'"):
        S.select(shapes, "UNet-XA")
    if fam == S.FAMILY_UNET:
        with pytest.raises(S.SubsetError, match="for a DiT"):
            S.select(shapes, "DiT-Blocks[0:4]")


def _zero_shift(shapes, keys):
    return SpectralShift({k: torch.zeros(delta_length(shapes[k])) for k in keys}, {k: shapes[k] for k in keys},
                         {"architecture": "x"})


@pytest.mark.parametrize("ck", list(M.CHECKPOINTS))
def test_style_presets_only_on_their_unet_layout(ck, shapes_of):
    shapes = shapes_of[ck]
    fam = S.family_of(shapes)
    layout = S.unet_layout(shapes) if fam == S.FAMILY_UNET else None
    keys = list(shapes)[:400] + [k for k in shapes if ".attn2." in k or "blocks.1." in k]
    a = b = _zero_shift(shapes, dict.fromkeys(keys))
    for name, (_, prefixes) in S.STYLE_PRESETS.items():
        if S.STYLE_LAYOUT[name] == layout:
            pred, _ = S.preset_predicate(name, shapes)
            chosen = {k for k in shapes if pred(k, shapes[k])}
            assert chosen and all(any(k.startswith(p) for k in chosen) for p in prefixes), name
            A.select_layers(a, b, preset=name)
            continue
        expect = "has no style presets" if fam != S.FAMILY_UNET else f"names layers of the {S.STYLE_LAYOUT[name]} UNet"
        with pytest.raises(S.SubsetError, match=expect):
            S.preset_predicate(name, shapes)
        with pytest.raises(A.ShiftArithmeticError, match=expect):
            A.select_layers(a, b, preset=name)
    assert S.style_presets_for(fam, layout) == [n for n, lay in S.STYLE_LAYOUT.items() if lay == layout]


def test_sdxl_style_presets_split_its_cross_attention(shapes_of):
    geo = set(S.STYLE_PRESETS["style SDXL: geometry all 32x32"][1])
    app = set(S.STYLE_PRESETS["style SDXL: appearance 64x64"][1])
    assert not geo & app and geo | app == set(S.SDXL_XTI_LAYERS.values())
    hosts = {k.split(".attn2.")[0].rsplit(".transformer_blocks.", 1)[0] + "." for k in S.select(shapes_of["SDXL"], "UNet-CA")}
    assert hosts == geo | app
    assert set(S.STYLE_PRESETS["style SDXL: geometry (32,down,1)-(32,mid,0)"][1]) <= geo


def test_combine_node_refuses_a_unet_preset_on_a_dit_shift(shapes_of, pack):
    node = pack("nodes.arithmetic").SVDiffCombineShifts
    common = pack("nodes.common")
    shapes = shapes_of["Flux-dev"]
    keys = S.select(shapes, "DiT-Text-QKV") + S.select(shapes, "Flux-Single-Blocks")[:8]
    a, b = _zero_shift(shapes, keys), _zero_shift(shapes, keys)
    kw = dict(mode="select layers", weight_a=1.0, weight_b=1.0, weight_c=1.0, weight_d=1.0, alpha=0.5, scale=1.0, rank=2,
              pattern="", shift_a=a, shift_b=b)
    with pytest.raises(common.SVDiffNodeError, match=r"\[Combine/Scale Shifts\] preset: 'UNet-CA-KV' is a subset for a UNet.*"
                                                     r"a Flux DiT; subsets for a Flux DiT: DiT, DiT-Attn"):
        node.execute(preset="UNet-CA-KV", **kw)
    with pytest.raises(common.SVDiffNodeError, match="preset: .*has no style presets"):
        node.execute(preset="style: geometry (16,down,1)-(8,mid,0)", **kw)
    out = node.execute(preset="DiT-Text-QKV", **kw)
    assert '"selected_keys": 19' in out.args[1]


def test_train_node_refuses_a_unet_subset_on_a_dit(shapes_of, pack, comfy):
    """Both places SVDiff Train selects its subset refuse it: the memory plan (first) and the training clone."""
    import dataclasses

    run, plan = pack("nodes.train.run"), pack("nodes.train.plan")
    common, settings = pack("nodes.common"), pack("nodes.train.settings")
    for ck, subset, fam in [("Flux-dev", "UNet-CA", "a Flux DiT"), ("SD3.5 medium", "Flux-Single-Blocks", "an MMDiT"),
                            ("SDXL", "DiT-Attn", "a UNet")]:
        model = _P(M.diffusion_model(ck))
        match = rf"\[SVDiff Train\] subset: '{subset}' is a subset for .*this model is {re.escape(fam)}.*; subsets for"
        with pytest.raises(common.SVDiffNodeError, match=match):
            plan.plan_inputs(model, None, dataclasses.replace(settings.DEFAULTS, subset=subset))
        with pytest.raises(common.SVDiffNodeError, match=match):
            run._unet_clone(model, types.SimpleNamespace(subset=subset), [], None)
