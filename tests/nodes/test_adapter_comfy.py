"""The spectral-shift adapter inside ComfyUI's real patch system (tiny SD1-style model)."""

import torch

from svdiff.shift import SpectralShift
from svdiff_testkit.probes import unet_forward, unet_inputs


def random_shift(mp, scale, seed=1, keys=None, pack=None):
    from svdiff_testkit.comfy_env import pack_module

    adapter = pack_module("nodes.adapter")
    shapes = adapter.shiftable_shapes(mp, "diffusion_model.")
    keys = keys or list(shapes)
    g = torch.Generator().manual_seed(seed)
    from svdiff.shift import delta_length

    deltas = {k: torch.randn(delta_length(shapes[k]), generator=g) * scale for k in keys}
    return SpectralShift(deltas, {k: shapes[k] for k in keys}, {"architecture": "TinySD"})


def test_zero_shift_is_bit_identical(tiny):
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    base_out = unet_forward(mp)
    shifts = pack_module("nodes.shifts")
    sh = random_shift(mp, 0.0)
    m2, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "zero")
    assert m2 is not mp
    out = unet_forward(m2)
    assert torch.equal(out, base_out)


def test_random_shift_moves_sigma_as_eq2_and_base_untouched(tiny):
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    base_out = unet_forward(mp)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w0 = mp.model.state_dict()[key].clone()
    sh = random_shift(mp, 0.5)
    shifts = pack_module("nodes.shifts")
    m2, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "rand")
    out = unet_forward(m2)
    assert not torch.equal(out, base_out)
    w1 = m2.model.state_dict()[key].clone()
    s0 = torch.linalg.svdvals(w0.double())
    expect = torch.relu(s0 + sh.deltas[key].double()).sort(descending=True).values
    got = torch.linalg.svdvals(w1.double())
    assert torch.allclose(got, expect, atol=2e-3), (got - expect).abs().max()
    # the base MODEL still gives bit-identical outputs after the shifted one ran
    assert torch.equal(unet_forward(mp), base_out)


def _lowvram_out(mp, seed=0):
    """A UNet evaluation with every module in ComfyUI's low-VRAM mode (weights streamed)."""
    x, ctx = unet_inputs(mp, seed)
    mp.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False, full_load=False)
    try:
        with torch.no_grad():
            return mp.model.apply_model(x, torch.tensor([5.0]), c_crossattn=ctx).clone()
    finally:
        mp.unpatch_model()


def test_lowvram_mode_merges_once_and_matches_full_load(tiny, monkeypatch):
    import comfy.model_management as mm
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    shifts = pack_module("nodes.shifts")
    ad = pack_module("nodes.adapter")
    base_full = unet_forward(mp)
    mm.unload_all_models()
    sh = random_shift(mp, 0.3)
    m2, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "lowvram")
    full = unet_forward(m2)
    mm.unload_all_models()
    calls = []
    orig = ad.merge_shifted_lowvram_weights
    monkeypatch.setattr(ad, "merge_shifted_lowvram_weights", lambda *a: calls.append(orig(*a)) or calls[-1])
    m2.callbacks["on_load_after"][ad.LOWVRAM_MERGE_KEY] = [ad.merge_shifted_lowvram_weights]
    merged = _lowvram_out(m2)
    assert calls and calls[0] == len(sh)  # every shifted weight patched once at load
    assert torch.allclose(merged, full, atol=1e-5)
    monkeypatch.setenv("SVDIFF_LOWVRAM_MERGE", "0")
    settings = pack_module("nodes.settings")
    monkeypatch.setattr(settings, "_CURRENT", None)  # read again from the environment; restored after the test
    assert settings.current().lowvram_merge is False
    per_forward = _lowvram_out(m2)  # ComfyUI's own LowVramPatch path
    assert torch.allclose(per_forward, full, atol=1e-5)
    # the base model is untouched by either path
    assert torch.equal(_lowvram_out(mp), base_full)
    mm.unload_all_models()
    assert torch.equal(unet_forward(mp), base_full)


def test_rank_limited_shift_is_patched_from_rank_r_factors_and_composes_with_a_full_one(tiny):
    from svdiff.arithmetic import rank_limit
    from svdiff.decompose import decompose
    from svdiff.shift import spectral_residual
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    ad = pack_module("nodes.adapter")
    shifts = pack_module("nodes.shifts")
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    full = random_shift(mp, 0.5, seed=3)
    r4 = rank_limit(full, 4)
    m_r, _ = shifts.apply_shift("test", mp, None, r4, 1.0, 1.0, "r4")
    adapter = ad.carried_shift_patches(m_r, key)[0][1]
    assert adapter.source.rank == 4  # the top 4 triplets only (appendix E.1), cached under their rank
    w = ad.base_weight(mp, key)
    ref = decompose(w, "gram64", storage_dtype=torch.float32)
    got = adapter.residual(1.0, torch.device("cpu"), torch.float32)
    want = spectral_residual(ref, r4.deltas[key])
    assert float((got - want).norm() / want.norm()) < 2e-3  # the truncated route's tolerance
    # on a model that carries a full shift, it composes as Eq. 4 with the longer (full) decomposition
    m_full, _ = shifts.apply_shift("test", mp, None, full, 1.0, 1.0, "full")
    m_both, _ = shifts.apply_shift("test", m_full, None, r4, 1.0, 1.0, "r4")
    composed = ad.carried_shift_patches(m_both, key)
    assert len(composed) == 1 and composed[0][1].source.rank == ref.rank
    assert composed[0][1].delta.shape[0] == ref.rank
    assert torch.isfinite(unet_forward(m_both)).all()


def test_disk_cap_is_chosen_once_per_checkpoint_with_one_log_line(tiny, monkeypatch, caplog, tmp_path):
    import logging

    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    ad = pack_module("nodes.adapter")
    shifts = pack_module("nodes.shifts")
    monkeypatch.setattr(ad, "_CACHE", None)  # a fresh process-wide cache (restored after the test)
    monkeypatch.setattr(ad.folder_paths, "get_user_directory", lambda: str(tmp_path))
    with caplog.at_level(logging.INFO, logger="svdiff"):
        shifts.apply_shift("test", mp, None, random_shift(mp, 0.3, seed=5), 1.0, 1.0, "a")
        keys = list(ad.shiftable_shapes(mp, "diffusion_model."))[:3]
        shifts.apply_shift("test", mp, None, random_shift(mp, 0.3, seed=6, keys=keys), 1.0, 1.0, "b")
    lines = [r.getMessage() for r in caplog.records if "disk cache cap" in r.getMessage()]
    assert len(lines) == 1, lines
    cache = ad.svd_cache()
    assert str(tmp_path) in lines[0] and cache.disk_dir.startswith(str(tmp_path))
    assert 0 < cache.disk_limit and cache.disk_bytes() <= cache.disk_limit
