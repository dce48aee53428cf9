"""The decomposition routes of svdiff.decompose (plain PyTorch, tiny shapes).

float32 Gram route with its per-matrix float64 fallback, the truncated (rank-r) route, the
compact cache form and the disk-cap choice.
"""

import logging

import pytest
import torch

import svdiff.decompose as D
import svdiff.shift as S


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_spectrum(m, n, sigma, seed=0):
    """An m x n matrix with singular values ``sigma`` (descending) and random singular vectors."""
    k = min(m, n)
    U, _ = torch.linalg.qr(rand(m, k, seed=seed).double())
    V, _ = torch.linalg.qr(rand(n, k, seed=seed + 1).double())
    return ((U * sigma.double()) @ V.t()).float()


def patched(w, dec, delta):
    return w.double() + S.spectral_residual(dec, delta).double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (24, 8, 3, 3), (64, 64)])
def test_float32_gram_equals_float64_reference(shape):
    w = rand(*shape) if shape != (64, 64) else with_spectrum(64, 64, torch.linspace(2.0, 0.5, 64))
    D.ROUTE_COUNTS.clear()
    a = D.decompose(w, "gram", storage_dtype=torch.float32)
    assert D.ROUTE_COUNTS == {"gram32": 1}  # well conditioned: float32 is enough
    ref = D.decompose(w, "gram64", storage_dtype=torch.float32)
    k = D.num_singular_values(shape)
    assert torch.allclose(a.S, ref.S, rtol=1e-5, atol=1e-6)
    assert (a.U.double().t() @ a.U.double() - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-5
    assert (a.Vh.double() @ a.Vh.double().t() - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-5
    assert rel(a.reconstruct().double(), w.double()) < 1e-6
    delta = rand(k, seed=5) * float(a.S.mean()) * 0.3
    assert rel(patched(w, a, delta), patched(w, ref, delta)) < 1e-5


def test_ill_conditioned_matrix_falls_back_to_float64():
    sigma = torch.logspace(0, -5, 32)  # condition number 1e5: float32 A^T A cannot resolve the tail
    w = with_spectrum(80, 32, sigma)
    D.ROUTE_COUNTS.clear()
    a = D.decompose(w, "gram", storage_dtype=torch.float32)
    assert D.ROUTE_COUNTS == {"gram64": 1}
    ref64 = D.decompose(w, "gram64", storage_dtype=torch.float32)
    assert torch.equal(a.S, ref64.S) and torch.equal(a.U, ref64.U)  # exactly the float64 route
    assert (a.U.double().t() @ a.U.double() - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-3
    ref = torch.linalg.svdvals(w.double())
    assert torch.allclose(a.S.double(), ref, rtol=1e-4, atol=1e-9)
    # and float32 alone would have been wrong there (why the check exists)
    assert D.gram32_or_none(w) is None


def test_rank_deficient_matrix_falls_back_and_keeps_u_orthonormal():
    w = rand(32, 4) @ rand(4, 48, seed=1)  # rank 4 of 32
    D.ROUTE_COUNTS.clear()
    dec = D.decompose(w, "gram", storage_dtype=torch.float32)
    assert D.ROUTE_COUNTS == {"gram64": 1}
    assert (dec.reconstruct() - w).abs().max() < 1e-4 * w.abs().max()
    assert (dec.U.t() @ dec.U - torch.eye(32)).abs().max() < 1e-4
    assert dec.S[4:].max() < 1e-4 * dec.S[0]


def decaying(m, n, seed=0):
    k = min(m, n)
    return with_spectrum(m, n, torch.arange(1, k + 1, dtype=torch.float64) ** -1.0, seed)


def test_truncated_top_r_matches_full_decomposition():
    w = decaying(400, 240)
    r = 8
    a, _ = D.tall(w)
    f = D.truncated_factors(a, r)
    assert f is not None
    U, Sr, V = (t.double() for t in f)
    full = D.decompose(w, "gram64", storage_dtype=torch.float32)
    assert torch.allclose(Sr, full.S[:r].double(), rtol=1e-3)
    # singular vectors agree up to sign
    cos_u = (U * full.U[:, :r].double()).sum(0).abs()
    cos_v = (V * full.Vh[:r].t().double()).sum(0).abs()
    assert cos_u.min() > 1 - 1e-3 and cos_v.min() > 1 - 1e-3
    D.ROUTE_COUNTS.clear()
    dec = D.decompose(w, rank=r, storage_dtype=torch.float32)
    assert D.ROUTE_COUNTS == {"truncated": 1} and dec.rank == r and dec.U.shape == (400, r) and dec.Vh.shape == (r, 240)
    delta = rand(r, seed=3) * float(full.S[:r].mean()) * 0.3
    assert rel(patched(w, dec, delta), patched(w, full, delta)) < 1e-3
    # a wide weight gives the transposed factors
    wide = D.decompose(w.t().contiguous(), rank=r, storage_dtype=torch.float32)
    assert wide.U.shape == (240, r) and wide.Vh.shape == (r, 400)
    assert rel(patched(w.t(), wide, delta), patched(w, full, delta).t()) < 1e-3


def test_truncated_route_that_does_not_converge_gives_the_full_answer():
    w = rand(400, 240)  # a flat (random) spectrum: the top 8 are nearly degenerate
    a, _ = D.tall(w)
    assert D.truncated_factors(a, 8, max_iter=1, tol=1e-9) is None  # below float32's reach
    D.ROUTE_COUNTS.clear()
    dec = D.decompose(w, rank=8, storage_dtype=torch.float32)
    full = D.decompose(w, storage_dtype=torch.float32)
    assert dec.rank == 8
    assert "truncated->full" not in D.ROUTE_COUNTS
    # one that cannot converge ends on the full eigendecomposition of the float64 Gram matrix it
    # formed for its second phase: the full route's sigma, without a second Gram product
    D.ROUTE_COUNTS.clear()
    U, S, V = D.truncated_factors(a, 8, max_iter=1, tol=1e-12, fallback=True)
    assert D.ROUTE_COUNTS == {"truncated->eigh": 1}
    assert torch.equal(S.float(), full.S[:8]) and U.shape == (400, 8) and V.shape == (240, 8)
    delta = rand(8, seed=4) * 0.5
    assert rel(patched(w, dec, delta), patched(w, full, delta)) < 1e-3


def test_small_matrices_take_the_full_route_for_a_rank():
    w = rand(40, 24)
    D.ROUTE_COUNTS.clear()
    dec = D.decompose(w, rank=4, storage_dtype=torch.float32)
    assert "truncated" not in D.ROUTE_COUNTS and dec.rank == 4
    full = D.decompose(w, storage_dtype=torch.float32)
    assert torch.equal(dec.S, full.S[:4]) and torch.equal(dec.U, full.U[:, :4])
    assert D.decompose(w, rank=24).rank == 24 and D.decompose(w, rank=99).rank == 24  # rank >= k: full


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (12, 4, 3, 3)])
def test_compact_cache_round_trip_reconstructs_the_same_patched_weight(tmp_path, shape):
    from safetensors.torch import load_file

    w = rand(*shape, seed=7)
    cache = D.SVDCache(disk_dir=str(tmp_path), disk_limit=1 << 30)
    fresh = cache.get(w)
    cache.clear_memory()
    loaded = cache.get(w)
    assert cache.stats["disk_hits"] == 1 and cache.stats["computed"] == 1
    k = D.num_singular_values(shape)
    stored = load_file(cache._disk_path(D.fingerprint(w)))
    assert set(stored) == {"S", "V"} and stored["V"].shape == (k, k)  # no tall factor on disk
    big = max(shape[0], w[0].numel())
    assert sum(t.numel() * t.element_size() for t in stored.values()) < fresh.nbytes() * (2 * k + 2) / (k + big)
    delta = rand(k, seed=8) * float(fresh.S.mean()) * 0.3
    assert rel(patched(w, loaded, delta), patched(w, fresh, delta)) < 2e-3  # float16 factors either way
    ref = D.decompose(w, "gram64", storage_dtype=torch.float32)
    assert rel(patched(w, loaded, delta), patched(w, ref, delta)) <= 1.5 * rel(patched(w, fresh, delta), patched(w, ref, delta)) + 1e-6


def test_compact_form_keeps_the_columns_it_cannot_recompute(tmp_path):
    w = rand(40, 6) @ rand(6, 24, seed=1)  # rank 6 of 24: 18 null directions
    cache = D.SVDCache(disk_dir=str(tmp_path))
    fresh = cache.get(w)
    cache.clear_memory()
    loaded = cache.get(w)
    from safetensors.torch import load_file

    stored = load_file(cache._disk_path(D.fingerprint(w)))
    assert stored["U_tail"].shape == (40, 18)
    assert torch.equal(loaded.U[:, 6:], fresh.U[:, 6:])
    assert (loaded.U.float().t() @ loaded.U.float() - torch.eye(24)).abs().max() < 2e-3


def test_rank_entries_are_cached_per_rank_and_served_from_a_full_entry(tmp_path):
    w = decaying(400, 240, seed=2)
    cache = D.SVDCache(disk_dir=str(tmp_path))
    r8 = cache.get(w, rank=8)
    assert r8.rank == 8 and cache.stats["computed"] == 1
    hit = cache.get(w, rank=8)  # expanded from the compact entry in memory
    assert cache.stats["memory_hits"] == 1 and rel(hit.reconstruct(), r8.reconstruct()) < 2e-3
    cache.clear_memory()
    again = cache.get(w, rank=8)
    assert cache.stats["disk_hits"] == 1 and torch.allclose(again.S, r8.S)
    r16 = cache.get(w, rank=16)  # a new rank is a new entry
    assert r16.rank == 16 and cache.stats["computed"] == 2
    full = cache.get(w)
    assert full.rank == 240 and cache.stats["computed"] == 3
    via_full = cache.get(w, rank=4)  # served from the full entry in memory
    assert via_full.rank == 4 and cache.stats["computed"] == 3 and cache.stats["memory_hits"] == 2
    assert torch.equal(via_full.S, full.S[:4])
    cache.clear_memory()
    from_disk = cache.get(w, rank=5)  # no rank-5 file: the first 5 of the full file on disk
    assert from_disk.rank == 5 and cache.stats["computed"] == 3
    assert torch.equal(from_disk.S, full.S[:5])


def test_files_of_earlier_versions_still_load(tmp_path):
    from safetensors.torch import save_file

    w = rand(30, 12)
    dec = D.decompose(w)
    cache = D.SVDCache(disk_dir=str(tmp_path))
    path = cache._disk_path(D.fingerprint(w))
    import os

    os.makedirs(os.path.dirname(path))
    save_file({"U": dec.U, "S": dec.S, "Vh": dec.Vh}, path)
    got = cache.get(w)  # read into the compact form (V from the float16 factor; U recomputed)
    assert cache.stats["disk_hits"] == 1 and torch.equal(got.S, dec.S)
    assert rel(got.reconstruct(), dec.reconstruct()) < 2e-3
    cache.clear_memory()
    assert cache.get(w, rank=3).rank == 3 and cache.stats["disk_hits"] == 2


def test_choose_disk_cap():
    G = 1 << 30
    # room for this checkpoint and three more like it
    assert D.choose_disk_cap(need=1 * G, free=100 * G, used=0) == (4 * G, "4x this checkpoint's factors")
    # a small checkpoint still gets the 1 GiB minimum
    assert D.choose_disk_cap(need=G // 10, free=100 * G, used=0)[0] == G
    # never more than half of what the cache could occupy (free + what it already holds)
    cap, why = D.choose_disk_cap(need=1 * G, free=3 * G, used=1 * G)
    assert cap == 2 * G and why == "half of the free space"
    # the user's SVDIFF_DISK_CACHE_GB wins, within the space there is
    assert D.choose_disk_cap(need=G, free=100 * G, used=0, user_cap=3 * G) == (3 * G, "set by SVDIFF_DISK_CACHE_GB")
    assert D.choose_disk_cap(need=G, free=G, used=0, user_cap=3 * G)[0] == G
    assert D.choose_disk_cap(need=G, free=0, used=0)[0] == 0


def test_plan_disk_logs_one_line_per_checkpoint_and_trims(tmp_path, caplog, monkeypatch):
    cache = D.SVDCache(disk_dir=str(tmp_path / "c"), disk_limit=None)
    for i in range(4):
        cache.get(rand(64, 32, seed=30 + i))
    one = cache.disk_bytes() // 4
    monkeypatch.setattr(D, "_free_bytes", lambda folder: 3 * one)  # a nearly full disk
    shapes = [(64, 32)] * 10
    with caplog.at_level(logging.INFO, logger="svdiff"):
        cap = cache.plan_disk(shapes, label="TinySD")
        cache.plan_disk(shapes, label="TinySD")
    lines = [r.getMessage() for r in caplog.records if "disk cache cap" in r.getMessage()]
    assert len(lines) == 1 and "TinySD" in lines[0] and "half of the free space" in lines[0] and "does not all fit" in lines[0]
    assert cap == (3 * one + 4 * one) // 2
    assert cache.disk_bytes() <= cache.disk_limit <= cap  # trimmed at once
    assert D.SVDCache(disk_dir=None).plan_disk(shapes) is None


def test_truncated_route_gives_up_early_when_its_residuals_cannot_reach_the_tolerance():
    assert D._may_converge([0.5], 1e-3, 10)  # one residual says nothing yet
    assert D._may_converge([0.1, 0.01], 1e-3, 1)  # falling 10x per iteration: one more does it
    assert not D._may_converge([0.1, 0.09], 1e-3, 5)  # 0.9 per iteration: 5 more reach only 0.05
    assert not D._may_converge([0.1, 0.12], 1e-3, 50)  # not falling at all
    calls = []
    orig = D._may_converge
    D._may_converge = lambda h, tol, left: calls.append(len(h)) or orig(h, tol, left)
    try:
        a, _ = D.tall(rand(400, 240))  # flat spectrum
        # (sigma_11/sigma_8)^2 ~ 1 and a tolerance float32 cannot reach: both phases stall
        assert D.truncated_factors(a, 8, oversample=2, max_iter=50, tol=1e-9) is None
    finally:
        D._may_converge = orig
    assert len(calls) < 40  # gave up long before the 50 + 108 iterations of the two phases' budgets


# -- streamed load: the compact route and the residual through the weight ---------------------
@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (24, 8, 3, 3), (12, 40, 1, 1)])
def test_compact_route_gives_gram64s_sigma_and_v_without_the_tall_factor(shape):
    w = rand(*shape, seed=3)
    D.ROUTE_COUNTS.clear()
    cf = D.compact_factors(w)
    assert D.ROUTE_COUNTS == {"gram64(compact)": 1} and cf.U_tail is None
    f = D.factors(w, "gram64")
    assert torch.equal(cf.S, f.S.float()) and torch.equal(cf.V, f.Va.float())
    (p, k), transpose = D.tall_shape(shape)
    assert cf.V.shape == (k, k) and cf.transpose == transpose and cf.shape == tuple(shape)
    assert rel(cf.expand(w, storage_dtype=torch.float32).reconstruct(), w) < 1e-5


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (24, 8, 3, 3)])
@pytest.mark.parametrize("strength", [1.0, 0.4, -1.5])
def test_residual_through_the_weight_equals_eq2_residual(shape, strength):
    w = rand(*shape, seed=4)
    ref = D.decompose(w, "svd", storage_dtype=torch.float32)
    cf = D.compact_factors(w)
    delta = rand(ref.rank, seed=5) * float(ref.S.mean()) * 0.4
    got = S.compact_residual(cf, delta, strength, w)
    want = S.spectral_residual(ref, delta, strength)
    assert got.shape == w.shape and rel(got, want) < 1e-4
    assert torch.equal(S.compact_residual(cf, torch.zeros(ref.rank), strength, w), torch.zeros_like(w))
    # a rank-4 shift changes the top 4 directions only; the k x r order of products is taken
    assert rel(S.compact_residual(cf, delta[:4], strength, w), S.spectral_residual(ref, delta[:4], strength)) < 1e-4
    # float16 weights are read block by block in float32: the same residual as their float32 copy
    h = w.half()
    assert torch.equal(S.compact_residual(cf, delta, strength, h), S.compact_residual(cf, delta, strength, h.float()))


def test_residual_through_the_weight_uses_the_kept_tail_for_small_and_null_directions():
    for w in (rand(40, 6) @ rand(6, 24, seed=1), (rand(6, 40).t() @ rand(6, 24, seed=1)).t().contiguous()):
        cf = D.compact_factors(w)  # null directions: the full route completes U, the tail is kept
        assert cf.head == 6 and cf.U_tail is not None and cf.U_tail.shape[1] == 18
        ref = D.decompose(w, "gram64", storage_dtype=torch.float32)
        delta = rand(24, seed=2) * 0.3
        assert rel(S.compact_residual(cf, delta, 1.0, w), S.spectral_residual(ref, delta)) < 1e-3  # float16 tail
    with pytest.raises(ValueError, match="singular values"):
        S.compact_residual(cf, torch.zeros(25), 1.0, w)
    with pytest.raises(ValueError, match="shape"):
        S.compact_residual(cf, torch.zeros(24), 1.0, w.t())


def test_residual_blocks_bound_the_float32_copies(monkeypatch):
    """No float32 copy of the whole weight: blocks of rows (columns of a wide weight) are cast."""
    w = rand(300, 20, seed=6).half()
    cf = D.compact_factors(w)
    delta = rand(20, seed=7)
    whole = S.compact_residual(cf, delta, 1.0, w)
    seen = []
    real = torch.Tensor.to

    def spy(t, *a, **k):
        out = real(t, *a, **k)
        if out.dtype == torch.float32 and t.dtype == torch.float16 and t.ndim == 2:
            seen.append(tuple(t.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    monkeypatch.setattr(S, "row_blocks", lambda r, c, itemsize=4: D.row_blocks(r, c, 20 * 4 * 7, itemsize))  # 7 rows a block
    blocked = S.compact_residual(cf, delta, 1.0, w)
    assert seen and max(s[0] for s in seen) == 7 and torch.allclose(blocked, whole, atol=1e-6)


def test_ensure_stores_without_holding_and_hands_back_what_it_cannot_store(tmp_path):
    w = rand(64, 32, seed=8)
    fp = D.fingerprint(w)
    streamed = D.SVDCache(memory_limit=0, disk_dir=str(tmp_path / "c"))
    assert streamed.ensure(w, fp=fp) is None and streamed.stats["computed"] == 1
    assert len(streamed) == 0 and streamed.has(fp, tuple(w.shape))
    assert streamed.ensure(w, fp=fp) is None and streamed.stats["computed"] == 1  # found on disk: nothing done
    got = streamed.compact(w, fp=fp)
    assert streamed.stats["disk_hits"] == 1 and torch.equal(got.S, D.compact_factors(w).S)
    nowhere = D.SVDCache(memory_limit=0, disk_dir=None)  # no disk, no memory tier: the caller must hold them
    kept = nowhere.ensure(w, fp=fp)
    assert isinstance(kept, D.CompactFactors) and len(nowhere) == 0
    in_memory = D.SVDCache(memory_limit=1 << 20, disk_dir=None)
    assert in_memory.ensure(w, fp=fp) is None and len(in_memory) == 1


@pytest.mark.parametrize("shape", [(700, 300), (90, 40), (2000, 1100)])
def test_block_triangular_gram_is_a_t_a_and_exactly_symmetric(shape):
    a = rand(*shape, seed=9)
    G = D.gram64_matrix(a)
    ref = a.double().t() @ a.double()
    assert G.dtype == torch.float64 and torch.equal(G, G.t())
    assert float((G - ref).abs().max() / ref.abs().max()) < 1e-14
