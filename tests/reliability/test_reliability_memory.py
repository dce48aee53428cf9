"""Loading and unloading a shift many times does not grow memory; the SVD cache is shared.

Fifty rounds of *Load Spectral Shift* on the same tiny model (with its CLIP), each patched
clone loaded by ComfyUI (weights patched), used, then dropped and the base model loaded
again (weights restored).  RSS after the rounds must stay within a small bound of RSS after
a warm-up; no adapter or patched clone may outlive its round; the SVD cache neither
recomputes nor grows (loads stream each layer's factors from the disk cache, holding none);
every clone's adapters refer to one cache entry per base weight.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from svdiff_testkit.memory import rss_mb

ROUNDS = 50
MAX_GROWTH_MB = 24.0  # whole 50 rounds, after a warm-up
MAX_LATE_GROWTH_MB = 8.0  # second half of the rounds (a per-round leak would show here)


def live(cls) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


@pytest.fixture(scope="module")
def setup(comfy):
    import folder_paths
    from svdiff import shiftfile
    from svdiff.shift import SpectralShift, delta_length
    from svdiff_testkit import tiny
    from svdiff_testkit.comfy_env import pack_module

    adapter = pack_module("nodes.adapter")
    mp, clip = tiny.build(seed=5)
    shapes = {**adapter.shiftable_shapes(mp, "diffusion_model."),
              **{k: v for k, v in adapter.shiftable_shapes(clip.patcher).items() if k.endswith("_proj.weight")}}
    g = torch.Generator().manual_seed(9)
    deltas = {k: torch.randn(delta_length(s), generator=g) * 0.1 for k, s in shapes.items()}
    d = os.path.join(folder_paths.models_dir, "svdiff")
    os.makedirs(d, exist_ok=True)
    shiftfile.save_shift(SpectralShift(deltas, shapes, {"architecture": "TinySD"}), os.path.join(d, "reliability_mem.safetensors"),
                         overwrite=True)
    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
    return {"mp": mp, "clip": clip, "adapter": adapter, "Load": comfy["nodes"].NODE_CLASS_MAPPINGS["SVDiffLoadShift"],
            "spectral": sum(1 for s in shapes.values() if len(s) >= 2)}


@torch.no_grad()
def one_round(s):
    import comfy.model_management as mm

    m, c, _ = s["Load"].execute(model=s["mp"], clip=s["clip"], shift_name="reliability_mem.safetensors",
                                strength_model=1.0, strength_clip=1.0).result
    mm.load_models_gpu([m, c.patcher], force_full_load=True)  # ComfyUI patches the shared modules' weights
    m.model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), c_crossattn=torch.randn(1, 77, 32))
    del m, c
    mm.load_models_gpu([s["mp"], s["clip"].patcher], force_full_load=True)  # base loaded again: weights restored


def test_fifty_loads_do_not_grow_memory_and_reuse_the_svd_cache(setup, capsys):
    adapter = setup["adapter"]
    cache = adapter.svd_cache()
    Adapter = adapter.SpectralShiftAdapter
    for _ in range(3):  # warm-up: decompositions cached, allocator pools filled
        one_round(setup)
    base_adapters = live(Adapter)
    stats0 = dict(cache.stats)
    entries0, bytes0 = len(cache), cache.memory_bytes
    budget0 = adapter.RESIDUAL_BUDGET.used
    rss = [rss_mb()]
    for i in range(ROUNDS):
        one_round(setup)
        if i % 10 == 9:
            rss.append(rss_mb())
    growth = rss[-1] - rss[0]
    late = rss[-1] - rss[len(rss) // 2]
    with capsys.disabled():
        print(f"\n[memory] {ROUNDS} load/unload rounds: RSS {rss[0]:.1f} -> {rss[-1]:.1f} MiB (growth {growth:+.1f} MiB, "
              f"second half {late:+.1f} MiB; max {max(rss):.1f}); SVD cache {len(cache)} entries, "
              f"{cache.memory_bytes / 2**20:.2f} MiB; stats {cache.stats}")
    assert live(Adapter) == base_adapters, "adapters outlive the clones that held them"
    assert adapter.RESIDUAL_BUDGET.used == budget0, "residual-cache budget not given back"
    assert cache.stats["computed"] == stats0["computed"], "a decomposition was computed again"
    # streamed load (the default: no memory tier beside the disk cache): every patch of every
    # round reads its layer's factors once, and nothing stays in memory
    assert cache.memory_limit == 0 and cache.disk_dir
    assert cache.stats["disk_hits"] - stats0["disk_hits"] == ROUNDS * setup["spectral"]
    assert (len(cache), cache.memory_bytes) == (entries0, bytes0) == (0, 0)
    assert cache.memory_bytes <= cache.memory_limit
    assert growth < MAX_GROWTH_MB, rss
    assert late < MAX_LATE_GROWTH_MB, rss
    assert not setup["mp"].patches and not setup["clip"].patcher.patches


def test_clones_share_one_decomposition_per_weight(setup):
    Load = setup["Load"]
    outs = [Load.execute(model=setup["mp"], clip=setup["clip"], shift_name="reliability_mem.safetensors",
                         strength_model=s, strength_clip=1.0).result for s in (1.0, 0.5, -1.0)]
    spectral = [k for k, v in outs[0][0].patches.items() if v[0][1].source is not None]
    assert len(spectral) == sum(1 for k in spectral if k.startswith("diffusion_model.")) > 0
    for k in spectral:
        srcs = [o[0].patches[k][0][1].source for o in outs]
        assert srcs[0].fp == srcs[1].fp == srcs[2].fp, k  # one cache entry per base weight
        assert all(s.kept is None for s in srcs), k  # held by the cache (disk), not by the adapters
    # the CLIP clones too
    ck = [k for k, v in outs[0][1].patcher.patches.items() if v[0][1].source is not None]
    assert ck
    for k in ck:
        assert outs[0][1].patcher.patches[k][0][1].source.fp == outs[1][1].patcher.patches[k][0][1].source.fp


def test_svd_cache_is_bounded(setup):
    """A small memory budget evicts least-recently-used decompositions instead of growing."""
    from svdiff.decompose import SVDCache

    mp = setup["mp"]
    weights = [v for k, v in mp.model.state_dict().items() if k.endswith(".weight") and v.ndim >= 2][:12]
    one = SVDCache(disk_dir=None).get(weights[0]).nbytes()
    cache = SVDCache(memory_limit=4 * one, disk_dir=None)
    for _ in range(3):
        for w in weights:
            cache.get(w)
            assert cache.memory_bytes <= cache.memory_limit or len(cache) == 1
    assert len(cache) < len(weights)
