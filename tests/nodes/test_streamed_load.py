"""Loading a shift streams its factors (issue 16, item 2).

Load Spectral Shift decomposes each base weight (or finds it in the SVD cache), writes it to the
disk cache and drops it; when ComfyUI patches the model, each adapter reads its layer's compact
factors back, forms the residual through the base weight and drops them again.  So a load holds
the factors of one layer at a time and nothing after it, and a reload reads them from disk.
"""

import weakref

import pytest
import torch

from svdiff_testkit.comfy_env import pack_module

from .test_adapter_comfy import random_shift

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def streamed(monkeypatch, tmp_path):
    """The pack's default cache (a disk tier, no memory tier) in a fresh folder, its compact() watched."""
    ad = pack_module("nodes.adapter")
    cache = ad.SVDCache(memory_limit=0, disk_dir=str(tmp_path / "svd"), disk_limit=None)
    monkeypatch.setattr(ad, "_CACHE", cache)
    live, most = [], [0]
    real = cache.compact

    def watched(*a, **k):
        most[0] = max(most[0], sum(1 for r in live if r() is not None))  # factors still alive from earlier layers
        cf = real(*a, **k)
        live.append(weakref.ref(cf))
        return cf

    monkeypatch.setattr(cache, "compact", watched)
    return ad, cache, live, most


def patched_state(m):
    m.load(torch.device("cpu"), force_patch_weights=True, full_load=True)
    try:
        return {k: v.detach().clone() for k, v in m.model.state_dict().items()}
    finally:
        m.unpatch_model()


def reference(mp, sh, key):
    import svdiff.decompose as D
    from svdiff.shift import spectral_residual

    w = mp.model.state_dict()[key].detach().float()
    return w + spectral_residual(D.decompose(w, "gram64", storage_dtype=torch.float32), sh.deltas[key])


def test_a_load_holds_one_layers_factors_at_a_time_and_none_after(tiny, streamed):
    ad, cache, live, most = streamed
    shifts = pack_module("nodes.shifts")
    mp, _ = tiny
    sh = random_shift(mp, 0.3, seed=11)
    m, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "streamed")
    spectral = [k for k, p in m.patches.items() if p[0][1].source is not None]
    assert spectral and cache.stats["computed"] == len(spectral) and cache.stats["disk_hits"] == 0
    assert len(cache) == 0 and cache.disk_bytes() > 0  # decomposed, stored on disk, not held
    assert all(m.patches[k][0][1].source.kept is None for k in spectral)
    state = patched_state(m)
    assert cache.stats["disk_hits"] == len(spectral) and cache.stats["computed"] == len(spectral)
    assert len(live) == len(spectral) and most[0] == 0 and all(r() is None for r in live)  # each layer's factors dropped before the next
    want = reference(mp, sh, KEY)
    assert float((state[KEY].float() - want).norm() / (want - mp.model.state_dict()[KEY]).norm()) < 1e-4
    # a reload (ComfyUI patches again) reads them again, and gives the same weights
    again = patched_state(m)
    assert cache.stats["disk_hits"] == 2 * len(spectral) and torch.equal(again[KEY], state[KEY])
    assert torch.equal(mp.model.state_dict()[KEY], ad.base_weight(mp, KEY))  # base restored


def test_a_factor_file_lost_after_the_load_is_recomputed_at_patch_time(tiny, streamed):
    ad, cache, _, _ = streamed
    shifts = pack_module("nodes.shifts")
    mp, _ = tiny
    sh = random_shift(mp, 0.3, seed=12, keys=[KEY])
    m, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "lost")
    first = patched_state(m)[KEY]
    import os

    os.remove(cache._disk_path(m.patches[KEY][0][1].source.fp))  # e.g. trimmed by the disk cap
    assert torch.equal(patched_state(m)[KEY], first) and cache.stats["computed"] == 2


def test_without_any_cache_tier_the_adapters_keep_compact_factors(tiny, monkeypatch):
    ad = pack_module("nodes.adapter")
    shifts = pack_module("nodes.shifts")
    monkeypatch.setattr(ad, "_CACHE", ad.SVDCache(memory_limit=0, disk_dir=None))
    mp, _ = tiny
    sh = random_shift(mp, 0.3, seed=13, keys=[KEY])
    m, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "kept")
    src = m.patches[KEY][0][1].source
    assert src.kept is not None and src.kept.V.shape[0] == src.kept.rank  # sigma and the small factor only
    want = reference(mp, sh, KEY)
    got = patched_state(m)[KEY].float()
    assert float((got - want).norm() / (want - mp.model.state_dict()[KEY]).norm()) < 1e-4
    assert ad.svd_cache().stats["computed"] == 1


def test_residuals_are_kept_only_while_comfyui_patches_every_forward(tiny, streamed, monkeypatch):
    from .test_adapter_comfy import _lowvram_out

    ad, cache, _, _ = streamed
    shifts = pack_module("nodes.shifts")
    settings = pack_module("nodes.settings")
    mp, _ = tiny
    sh = random_shift(mp, 0.3, seed=14)
    m, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "per-forward")
    adapters = [p[0][1] for p in m.patches.values() if p[0][1].source is not None]
    used0 = ad.RESIDUAL_BUDGET.used
    patched_state(m), patched_state(m)  # a load and a reload: each weight patched once, nothing kept
    assert all(not a._cache.entries for a in adapters) and ad.RESIDUAL_BUDGET.used == used0
    monkeypatch.setenv("SVDIFF_LOWVRAM_MERGE", "0")  # ComfyUI's per-forward low-VRAM path
    monkeypatch.setattr(settings, "_CURRENT", None)
    outs = [_lowvram_out(m) for _ in range(2)]
    assert all(a._cache.entries for a in adapters) and ad.RESIDUAL_BUDGET.used > used0
    hits = cache.stats["disk_hits"]
    outs.append(_lowvram_out(m))  # served from the kept residuals: no factors read
    assert cache.stats["disk_hits"] == hits and torch.equal(outs[2], outs[1]) and torch.allclose(outs[0], outs[1])
    patched_state(m)  # an ordinary load again: the residuals are given back
    assert all(not a._cache.entries for a in adapters) and ad.RESIDUAL_BUDGET.used == used0


def test_patches_with_a_streamed_source_survive_a_deep_copy(tiny, streamed):
    import copy

    _, _, _, _ = streamed
    shifts = pack_module("nodes.shifts")
    mp, _ = tiny
    m, _ = shifts.apply_shift("test", mp, None, random_shift(mp, 0.3, seed=15, keys=[KEY]), 1.0, 1.0, "copy")
    a = m.patches[KEY][0][1]
    b = copy.deepcopy(a)  # e.g. a pack that deep-copies a patch list: the view of the model is shared
    assert b.source.view is a.source.view and b.source.view.model is mp.model
    w = mp.model.state_dict()[KEY].detach().float()
    assert torch.equal(b.calculate_weight(w.clone(), KEY, 1.0, 1.0, None, None), a.calculate_weight(w.clone(), KEY, 1.0, 1.0, None, None))
