"""Combine/Scale Shifts: Eq. 4/5, appendix E, select layers, bad inputs, and merged-delta patching."""

import pytest
import torch

import svdiff.arithmetic as A
import svdiff.subsets as subsets
from svdiff.shift import SpectralShift, delta_length

SHAPES = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 6),
    "diffusion_model.input_blocks.8.1.proj_in.weight": (6, 6, 1, 1),
    "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight": (5, 7),
    "diffusion_model.output_blocks.3.1.norm.weight": (6,),
    "diffusion_model.out.2.weight": (4, 6, 3, 3),
}


def rand_shift(seed, keys=None, scale=1.0, arch="SD15", rank=0):
    g = torch.Generator().manual_seed(seed)
    keys = keys or list(SHAPES)
    deltas = {k: torch.randn(delta_length(SHAPES[k], rank), generator=g) * scale for k in keys}
    return SpectralShift(deltas, {k: SHAPES[k] for k in keys}, {"architecture": arch, "source_file": f"s{seed}.safetensors"})


def test_add_matches_eq4_with_weights_and_history():
    a, b, c = rand_shift(1), rand_shift(2), rand_shift(3)
    out = A.add([a, b, c], [0.5, -2.0, 1.5])
    for k in SHAPES:
        assert torch.allclose(out.deltas[k], 0.5 * a.deltas[k] - 2.0 * b.deltas[k] + 1.5 * c.deltas[k], atol=1e-6)
    h = out.metadata["history"][-1]
    assert h["op"] == "add" and h["weights"] == [0.5, -2.0, 1.5]
    assert [i["source_file"] for i in h["inputs"]] == ["s1.safetensors", "s2.safetensors", "s3.safetensors"]
    assert out.metadata["architecture"] == "SD15"


def test_add_of_shift_and_its_negation_is_zero():
    a = rand_shift(4)
    out = A.add([a, A.scale(a, -1.0)])
    assert all(torch.count_nonzero(d) == 0 for d in out.deltas.values())


def test_interpolate_eq5_and_endpoints():
    a, b = rand_shift(5), rand_shift(6)
    for alpha in (0.0, 0.3, 1.0):
        out = A.interpolate([a, b], alpha=alpha)
        for k in SHAPES:
            assert torch.allclose(out.deltas[k], alpha * a.deltas[k] + (1 - alpha) * b.deltas[k], atol=1e-6)
    one, zero = A.interpolate([a, b], alpha=1.0), A.interpolate([a, b], alpha=0.0)
    for k in SHAPES:
        assert torch.equal(one.deltas[k], a.deltas[k])
        assert torch.equal(zero.deltas[k], b.deltas[k])


def test_interpolate_three_needs_weights_summing_to_one():
    a, b, c = rand_shift(7), rand_shift(8), rand_shift(9)
    out = A.interpolate([a, b, c], weights=[0.2, 0.3, 0.5])
    k = next(iter(SHAPES))
    assert torch.allclose(out.deltas[k], 0.2 * a.deltas[k] + 0.3 * b.deltas[k] + 0.5 * c.deltas[k], atol=1e-6)
    with pytest.raises(A.ShiftArithmeticError, match="sum to 1.5"):
        A.interpolate([a, b, c], weights=[0.5, 0.5, 0.5])
    with pytest.raises(A.ShiftArithmeticError, match="outside"):
        A.interpolate([a, b], alpha=1.5)


def test_scale_identity_zero_and_negative():
    a = rand_shift(10)
    for k, d in A.scale(a, 1.0).deltas.items():
        assert torch.equal(d, a.deltas[k])
    for k, d in A.scale(a, -0.7).deltas.items():
        assert torch.allclose(d, -0.7 * a.deltas[k])
    assert A.scale(a, 2.0).metadata["history"][-1]["scale"] == 2.0


def test_missing_keys_count_as_zero_and_ranks_pad():
    keys = list(SHAPES)
    a = rand_shift(11, keys[:3])
    b = rand_shift(12, keys[2:], rank=2)
    out = A.add([a, b], [1.0, 1.0])
    assert set(out.deltas) == set(SHAPES)
    assert torch.equal(out.deltas[keys[0]], a.deltas[keys[0]])
    assert torch.equal(out.deltas[keys[4]][:2], b.deltas[keys[4]])
    k = keys[2]  # in both: a full, b rank 2 -> b padded with zeros
    expect = a.deltas[k].clone()
    expect[:2] += b.deltas[k]
    assert torch.allclose(out.deltas[k], expect)


def test_rank_limit_keeps_first_r():
    a = rand_shift(13)
    out = A.rank_limit(a, 2)
    for k, s in SHAPES.items():
        if len(s) >= 2:
            assert torch.equal(out.deltas[k], a.deltas[k][:2])
        else:
            assert torch.equal(out.deltas[k], a.deltas[k])
    assert out.metadata["rank"] == 2
    # a matrix smaller than r is kept whole
    out5 = A.rank_limit(a, 5)
    assert torch.equal(out5.deltas["diffusion_model.input_blocks.8.1.proj_in.weight"], a.deltas["diffusion_model.input_blocks.8.1.proj_in.weight"][:5])
    assert out5.deltas["diffusion_model.out.2.weight"].shape[0] == 4


def test_select_layers_with_preset_and_pattern():
    a, b = rand_shift(14), rand_shift(15)
    out = A.select_layers(a, b, preset="style: geometry (16,down,1)-(8,mid,0)")
    geo = {"diffusion_model.input_blocks.8.1.proj_in.weight", "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"}
    for k in SHAPES:
        src = a if k in geo else b
        assert torch.equal(out.deltas[k], src.deltas[k]), k
    out2 = A.select_layers(a, b, pattern=r"attn2\.to_k")
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(out2.deltas[k], a.deltas[k])
    assert all(torch.equal(out2.deltas[x], b.deltas[x]) for x in SHAPES if x != k)
    out3 = A.select_layers(a, b, preset="UNet-1D")
    assert torch.equal(out3.deltas["diffusion_model.output_blocks.3.1.norm.weight"], a.deltas["diffusion_model.output_blocks.3.1.norm.weight"])


def test_bad_inputs():
    a = rand_shift(16)
    with pytest.raises(A.ShiftArithmeticError, match="at least two"):
        A.add([a])
    with pytest.raises(A.ShiftArithmeticError, match="at least two"):
        A.interpolate([a], alpha=0.5)
    with pytest.raises(A.ShiftArithmeticError, match="matches none"):
        A.select_layers(a, rand_shift(17), pattern="no_such_layer")
    with pytest.raises(A.ShiftArithmeticError, match="not a valid regular expression"):
        A.select_layers(a, rand_shift(17), pattern="(")
    with pytest.raises(A.ShiftArithmeticError, match="not smaller than the largest"):
        A.rank_limit(a, 8)
    with pytest.raises(A.ShiftArithmeticError, match="at least 1"):
        A.rank_limit(a, 0)
    # mismatched shapes: named first key
    k = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    other = SpectralShift({k: torch.zeros(3)}, {k: (3, 9)}, {})
    with pytest.raises(A.ShiftArithmeticError, match=r"attn1\.to_q\.weight.*\[5, 7\].*\[3, 9\]"):
        A.add([a, other])
    with pytest.raises(A.ShiftArithmeticError, match="different architectures"):
        A.add([a, rand_shift(18, arch="SDXL")])


def test_style_presets_cover_sd1_prefixes():
    # the 16 XTI layers are the 16 SpatialTransformers of SD1.x, geometry range as documented
    assert len(subsets.XTI_LAYERS) == 16
    assert subsets.STYLE_PRESETS["style: geometry (16,down,1)-(8,mid,0)"][1] == [
        "diffusion_model.input_blocks.8.1.", "diffusion_model.middle_block.1."]
    geo = set(subsets.STYLE_PRESETS["style: geometry all 16x16 + 8x8"][1])
    app = set(subsets.STYLE_PRESETS["style: appearance 32x32 + 64x64"][1])
    assert not geo & app and len(geo | app) == 16


# ------------------------------------------------------------------ inside ComfyUI
def _weights_after(mp, key):
    import comfy.model_management as mm

    mm.load_models_gpu([mp], force_full_load=True)
    return mp.model.state_dict()[key].detach().clone().double()


def test_apply_combined_equals_merged_delta_not_stacked(tiny):
    """Eq. 4 on delta: ReLU(sigma + d_a + d_b) differs from stacking ReLU(sigma + d_a), ReLU(sigma + d_b)."""
    from svdiff_testkit.comfy_env import pack_module

    shifts_mod = pack_module("nodes.shifts")
    mp, _ = tiny
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    W = mp.model.state_dict()[key].detach().clone().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    shape = tuple(W.shape)
    # d_a pushes the 3 largest singular values below zero (clamped), d_b brings them back
    d_a = torch.zeros(S.shape[0])
    d_a[:3] = -(S[:3].float() + 0.5)
    d_b = torch.zeros(S.shape[0])
    d_b[:3] = S[:3].float() * 0.6
    d_b[3:6] = 0.1
    a = SpectralShift({key: d_a}, {key: shape}, {"architecture": "TinySD"})
    b = SpectralShift({key: d_b}, {key: shape}, {"architecture": "TinySD"})
    node = pack_module("nodes.arithmetic").SVDiffCombineShifts
    res = node.execute(mode="add", weight_a=1.0, weight_b=1.0, weight_c=1.0, weight_d=1.0, alpha=0.5, scale=1.0, rank=4,
                       preset="(pattern only)", pattern="", shift_a=a, shift_b=b)
    merged = res.args[0]
    m_comb, _ = shifts_mod.apply_shift("t", mp, None, merged, 1.0, 1.0, "merged")
    got = _weights_after(m_comb, key)
    expect = W + (U * (torch.relu(S + (d_a + d_b).double()) - S)) @ Vh
    assert torch.allclose(got, expect, atol=2e-3), (got - expect).abs().max()
    # two Apply Spectral Shift nodes in a row compose as Eq. 4 too (one ReLU over the summed
    # deltas), not W + R_a + R_b with a ReLU each, which the clamp would make differ
    notes = []
    m_a, _ = shifts_mod.apply_shift("t", mp, None, a, 1.0, 1.0, "a")
    m_ab, _ = shifts_mod.apply_shift("t", m_a, None, b, 1.0, 1.0, "b", notes)
    stacked = _weights_after(m_ab, key)
    assert torch.allclose(stacked, expect, atol=2e-3), (stacked - expect).abs().max()
    expect_stacked = W + (U * (torch.relu(S + d_a.double()) - S)) @ Vh + (U * (torch.relu(S + d_b.double()) - S)) @ Vh
    assert (expect_stacked - expect).abs().max() > 0.1  # the clamp: stacking would have been visibly wrong
    assert any("Eq. 4" in n for n in notes)
    # strengths are the s_i of appendix E.3: 0.5*a then 2*b is ReLU(sigma + 0.5 d_a + 2 d_b)
    m_a2, _ = shifts_mod.apply_shift("t", mp, None, a, 0.5, 1.0, "a")
    m_ab2, _ = shifts_mod.apply_shift("t", m_a2, None, b, 2.0, 1.0, "b")
    expect2 = W + (U * (torch.relu(S + (0.5 * d_a + 2 * d_b).double()) - S)) @ Vh
    assert torch.allclose(_weights_after(m_ab2, key), expect2, atol=2e-3)
    # the first patched model is unchanged by the second node
    assert torch.allclose(_weights_after(m_a, key), W + (U * (torch.relu(S + d_a.double()) - S)) @ Vh, atol=2e-3)
    import comfy.model_management as mm

    mm.unload_all_models()


def test_combine_node_errors_name_node_and_field(comfy):
    from svdiff_testkit.comfy_env import pack_module

    common = pack_module("nodes.common")
    node = pack_module("nodes.arithmetic").SVDiffCombineShifts
    a, b, c = rand_shift(20), rand_shift(21), rand_shift(22)
    base = dict(weight_a=1.0, weight_b=1.0, weight_c=1.0, weight_d=1.0, alpha=0.5, scale=1.0, rank=2, preset="(pattern only)", pattern="")
    with pytest.raises(common.SVDiffNodeError, match=r"\[Combine/Scale Shifts\] shift_b: add needs at least two"):
        node.execute(mode="add", shift_a=a, **base)
    with pytest.raises(common.SVDiffNodeError, match=r"weight_a..weight_d: .*sum to 3"):
        node.execute(mode="interpolate", shift_a=a, shift_b=b, shift_c=c, **base)
    with pytest.raises(common.SVDiffNodeError, match=r"pattern: .*matches none"):
        node.execute(mode="select layers", shift_a=a, shift_b=b, **{**base, "pattern": "nothing_here"})
    with pytest.raises(common.SVDiffNodeError, match=r"rank: rank 99"):
        node.execute(mode="rank limit", shift_a=a, **{**base, "rank": 99})
    out = node.execute(mode="interpolate", shift_a=a, shift_b=b, shift_c=c, **{**base, "weight_a": 0.25, "weight_b": 0.25, "weight_c": 0.5})
    assert out.args[0].metadata["history"][-1]["op"] == "interpolate"


def test_graph_combine_inspect_export_through_executor(comfy, shift_dir):
    """Checkpoint -> 2x Load Spectral Shift -> Combine (add) -> Inspect and Export as LoRA, through PromptExecutor."""
    import os

    import folder_paths
    import svdiff.shiftfile as F
    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import pack_module, run_prompt

    tiny_mod.install_checkpoint("tiny_sd.safetensors")
    mp, _ = tiny_mod.build(seed=0)
    shapes = pack_module("nodes.adapter").shiftable_shapes(mp, "diffusion_model.")
    keys = [k for k in shapes if ".attn2." in k]
    for seed, name in ((1, "arith_a"), (2, "arith_b")):
        g = torch.Generator().manual_seed(seed)
        sh = SpectralShift({k: torch.randn(delta_length(shapes[k]), generator=g) * 0.1 for k in keys},
                           {k: shapes[k] for k in keys}, {"architecture": "TinySD", "subset": "UNet-CA"})
        F.save_shift(sh, os.path.join(shift_dir, "tests", f"{name}.safetensors"), overwrite=True)
    load = lambda n: {"class_type": "SVDiffLoadShift", "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": f"tests/{n}.safetensors",
                                                                  "strength_model": 1.0, "strength_clip": 1.0}}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd.safetensors"}},
        "2": load("arith_a"),
        "3": load("arith_b"),
        "4": {"class_type": "SVDiffCombineShifts", "inputs": {"mode": "add", "shift_a": ["2", 2], "shift_b": ["3", 2], "weight_a": 0.5, "weight_b": 0.5,
                                                              "weight_c": 1.0, "weight_d": 1.0, "alpha": 0.5, "scale": 1.0, "rank": 4,
                                                              "preset": "(pattern only)", "pattern": ""}},
        "5": {"class_type": "SVDiffInspectShift", "inputs": {"shift_a": ["2", 2], "shift_b": ["3", 2], "shift_c": ["4", 0]}},
        "6": {"class_type": "SVDiffToLoRA", "inputs": {"shift": ["4", 0], "model": ["1", 0], "rank": 2, "filename_prefix": "tests/combined",
                                                       "folder": "output/loras"}},
    }
    ex, outputs = run_prompt(prompt)
    assert ex.success, ex.status_messages
    assert outputs["5"]["images"][0]["filename"].endswith(".png")
    out_dir = os.path.join(folder_paths.get_output_directory(), "loras", "tests")
    assert any(f.startswith("combined_") for f in os.listdir(out_dir))
