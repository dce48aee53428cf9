"""svdiff core on its own (plain PyTorch): decomposition, Eq. 2 residual form, files."""

import os
import subprocess
import sys

import pytest
import torch

import svdiff.decompose as D
import svdiff.shift as S
import svdiff.shiftfile as F

from svdiff_testkit.comfy_env import REPO


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32), (8, 4, 3, 3), (40, 8, 1, 1)])
@pytest.mark.parametrize("algo", ["svd", "gram"])
def test_decomposition_reconstructs_and_is_orthonormal(shape, algo):
    w = rand(*shape)
    dec = D.decompose(w, algo, storage_dtype=torch.float32)
    k = D.num_singular_values(shape)
    assert dec.U.shape == (shape[0], k) and dec.S.shape == (k,) and dec.Vh.shape[0] == k
    assert torch.all(dec.S[:-1] >= dec.S[1:])  # descending
    rec = dec.reconstruct()
    assert (rec - w).abs().max() < 1e-4 * w.abs().max()
    eye = torch.eye(k)
    assert (dec.U.t() @ dec.U - eye).abs().max() < 1e-4
    assert (dec.Vh @ dec.Vh.t() - eye).abs().max() < 1e-4


def test_gram_handles_rank_deficient_weights():
    w = rand(32, 4) @ rand(4, 48, seed=1)  # rank 4 of 32
    dec = D.decompose(w, "gram", storage_dtype=torch.float32)
    assert (dec.reconstruct() - w).abs().max() < 1e-4 * w.abs().max()
    assert (dec.U.t() @ dec.U - torch.eye(32)).abs().max() < 1e-4  # U stays orthonormal past the rank
    assert dec.S[4:].max() < 1e-4 * dec.S[0]


def test_gram_matches_reference_singular_values():
    w = rand(96, 40)
    a = D.decompose(w, "svd", storage_dtype=torch.float32)
    b = D.decompose(w, "gram", storage_dtype=torch.float32)
    assert torch.allclose(a.S, b.S, rtol=1e-5, atol=1e-5)


def test_zero_delta_is_exact_even_with_half_precision_factors():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = rand(48, 24).to(dtype)
        dec = D.decompose(w)  # float16 U, V
        out = S.apply_spectral_shift(w, dec, torch.zeros(24))
        assert out.dtype == dtype and torch.equal(out, w)


def test_random_delta_changes_sigma_exactly_as_eq2():
    w = rand(40, 24, dtype=None) if False else rand(40, 24)
    dec = D.decompose(w, storage_dtype=torch.float32)
    delta = rand(24, seed=3) * 0.5
    out = S.apply_spectral_shift(w.double(), dec, delta)  # float64 weight, float32 math
    got = torch.linalg.svdvals(out.double())
    want = torch.relu(dec.S.double() + delta.double()).sort(descending=True).values
    assert torch.allclose(got, want, atol=1e-4)


def test_relu_clamps_negative_singular_values_and_strength_scales_inside():
    w = rand(16, 16)
    dec = D.decompose(w, storage_dtype=torch.float32)
    delta = -2 * dec.S  # drives every value below zero
    out = S.apply_spectral_shift(w, dec, delta)
    assert out.abs().max() < 1e-4  # all clamped to zero -> zero matrix
    half = S.apply_spectral_shift(w, dec, delta, strength=0.5)  # sigma - sigma = 0 exactly
    assert half.abs().max() < 1e-4
    assert torch.equal(S.apply_spectral_shift(w, dec, rand(16, seed=9), strength=0.0), w)
    s = S.shifted_sigma(dec.S, delta, 0.25)
    assert torch.allclose(s, torch.relu(dec.S + 0.25 * delta))


def test_rank_limited_delta_only_moves_top_r():
    w = rand(30, 20)
    dec = D.decompose(w, storage_dtype=torch.float32)
    delta = torch.full((5,), 0.7)
    out = S.apply_spectral_shift(w, dec, delta)
    got = torch.linalg.svdvals(out.double())
    want = dec.S.double().clone()
    want[:5] += 0.7
    assert torch.allclose(got, want.sort(descending=True).values, atol=1e-4)
    with pytest.raises(ValueError):
        S.apply_spectral_shift(w, dec, torch.zeros(21))


def test_vector_shift_is_additive():
    w = rand(10)
    d = rand(10, seed=2)
    assert torch.allclose(S.apply_vector_shift(w, d, 0.5), w + 0.5 * d)


def test_spectral_shift_value_validates_lengths():
    with pytest.raises(ValueError):
        S.SpectralShift({"a.weight": torch.zeros(9)}, {"a.weight": (8, 4)})
    with pytest.raises(ValueError):
        S.SpectralShift({"n.weight": torch.zeros(3)}, {"n.weight": (4,)})
    sh = S.zeros_like_weights({"a.weight": (8, 4), "n.weight": (4,)}, rank=2)
    assert sh.deltas["a.weight"].shape == (2,) and sh.deltas["n.weight"].shape == (4,)
    assert sh.full_delta("a.weight").shape == (4,)


def _example_shift():
    shapes = {"diffusion_model.a.weight": (8, 4, 3, 3), "diffusion_model.n.weight": (8,), "clip_l.x.weight": (6, 5)}
    deltas = {k: rand(S.delta_length(s), seed=i) for i, (k, s) in enumerate(shapes.items())}
    return S.SpectralShift(deltas, shapes, {"architecture": "SD15", "subset": "UNet", "training": {"prompt": "photo of a sks dog"}})


def test_file_round_trip_float32_exact_and_float16_close(tmp_path):
    sh = _example_shift()
    p32 = F.save_shift(sh, str(tmp_path / "a.safetensors"), dtype="float32")
    back = F.load_shift(p32)
    assert back.shapes == sh.shapes
    for k in sh.deltas:
        assert torch.equal(back.deltas[k], sh.deltas[k])
    assert back.metadata["training"]["prompt"] == "photo of a sks dog"
    p16 = F.save_shift(sh, str(tmp_path / "b.safetensors"))
    b16 = F.load_shift(p16)
    for k in sh.deltas:
        # float16 keeps 11 significant bits: relative error <= 2^-11 of each value
        assert torch.allclose(b16.deltas[k], sh.deltas[k], rtol=2 ** -11, atol=1e-7)
    assert os.path.getsize(p16) == F.predicted_file_size(sh, "float16") < os.path.getsize(p32)


def test_save_never_overwrites(tmp_path):
    sh = _example_shift()
    p = str(tmp_path / "a.safetensors")
    F.save_shift(sh, p)
    before = open(p, "rb").read()
    with pytest.raises(FileExistsError):
        F.save_shift(S.zeros_like_weights(sh.shapes), p)
    assert open(p, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    sh = _example_shift()
    good = F.shift_to_bytes(sh, "float32")
    cases = {
        "missing.safetensors": (None, "not found"),
        "empty.safetensors": (b"", "empty"),
        "text.safetensors": (b"this is not a safetensors file at all", "header length"),
        "trunc.safetensors": (good[: len(good) - 7], "outside the file"),
    }
    for name, (data, words) in cases.items():
        path = str(tmp_path / name) if data is None else _write(tmp_path, name, data)
        with pytest.raises(F.ShiftFileError) as e:
            F.load_shift(path)
        assert name in str(e.value) and words in str(e.value), str(e.value)


def test_nan_wrong_length_unknown_version_and_pickle_are_refused(tmp_path):
    from safetensors.torch import save

    sh = _example_shift()
    meta = F.encode_metadata(sh, "float32")
    bad = dict(sh.deltas)
    bad["diffusion_model.n.weight"] = torch.full((8,), float("nan"))
    p = _write(tmp_path, "nan.safetensors", save(bad, metadata=meta))
    with pytest.raises(F.ShiftFileError, match="NaN"):
        F.load_shift(p)
    wrong = dict(sh.deltas)
    wrong["diffusion_model.n.weight"] = torch.zeros(5)
    p = _write(tmp_path, "len.safetensors", save(wrong, metadata=meta))
    with pytest.raises(F.ShiftFileError, match="1-D tensor"):
        F.load_shift(p)
    future = dict(meta, format_version="99")
    p = _write(tmp_path, "future.safetensors", save(sh.deltas, metadata=future))
    with pytest.raises(F.ShiftFileError, match="newer"):
        F.load_shift(p)
    p = _write(tmp_path, "ints.safetensors", save({"diffusion_model.n.weight": torch.zeros(8, dtype=torch.int64)}, metadata=meta))
    with pytest.raises(F.ShiftFileError, match="dtype"):
        F.load_shift(p)
    marker = tmp_path / "executed"
    pk = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, pk)
    with pytest.raises(F.ShiftFileError, match="pickle"):
        F.load_shift(str(pk))
    assert not marker.exists()
    os.mkdir(tmp_path / "dir.safetensors")
    with pytest.raises(F.ShiftFileError, match="directory"):
        F.load_shift(str(tmp_path / "dir.safetensors"))


def test_compatibility_refuses_other_architectures():
    sh = _example_shift()
    model = {"diffusion_model.a.weight": (8, 4, 3, 3), "diffusion_model.n.weight": (8,), "clip_l.x.weight": (6, 5)}
    assert len(F.check_compatible(sh, model, "f")) == 3
    other = dict(model, **{"diffusion_model.a.weight": (16, 4, 3, 3)})
    with pytest.raises(F.ShiftFileError, match="diffusion_model.a.weight"):
        F.check_compatible(sh, other, "f")
    with pytest.raises(F.ShiftFileError, match="only 0 of 3"):
        F.check_compatible(sh, {"unrelated.weight": (3, 3)}, "f")


def test_svd_cache_memory_and_disk(tmp_path):
    cache = D.SVDCache(memory_limit=1 << 20, disk_dir=str(tmp_path / "c"), disk_limit=1 << 30)
    w = rand(64, 32)
    a = cache.get(w)
    b = cache.get(w.clone())  # same content -> same entry (kept compact, expanded through the weight)
    assert cache.stats == {"memory_hits": 1, "disk_hits": 0, "computed": 1}
    assert torch.equal(b.S, a.S) and torch.equal(b.Vh, a.Vh) and (b.U.float() - a.U.float()).abs().max() < 1e-3
    cache.clear_memory()
    c = cache.get(w)
    # the disk keeps sigma and the small square factor; the other factor is recomputed (W V / sigma),
    # equal up to float16 rounding
    assert cache.stats["disk_hits"] == 1 and torch.equal(c.S, a.S) and torch.equal(c.Vh, a.Vh)
    assert (c.U.float() - a.U.float()).abs().max() < 1e-3
    # memory stays bounded: least recently used out first
    one = D.compact_factors(w).nbytes()
    small = D.SVDCache(memory_limit=one * 2 + 1)
    for i in range(5):
        small.get(rand(64, 32, seed=10 + i))
    assert len(small) == 2 and small.memory_bytes <= one * 2 + 1
    none = D.SVDCache(memory_limit=0)  # no memory tier: nothing kept (a disk cache serves reloads)
    none.get(w)
    assert len(none) == 0 and none.memory_bytes == 0
    # a damaged disk entry is recomputed, not trusted
    cache.clear_memory()
    path = cache._disk_path(D.fingerprint(w))
    open(path, "wb").write(b"garbage")
    d = cache.get(w)
    assert cache.stats["computed"] == 2 and torch.equal(d.S, a.S)


def test_disk_cache_is_bounded(tmp_path):
    one = D.decompose(rand(64, 32)).nbytes()
    cache = D.SVDCache(disk_dir=str(tmp_path / "c"), disk_limit=int(one * 2.5))
    for i in range(5):
        cache.get(rand(64, 32, seed=20 + i))
    assert cache.disk_bytes() <= one * 2.5 + 4096


def test_core_imports_no_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('svdiff', r'{REPO}/svdiff/__init__.py', submodule_search_locations=[r'{REPO}/svdiff'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['svdiff'] = m; spec.loader.exec_module(m)\n"
        "import os, importlib\n"
        f"[importlib.import_module('svdiff.' + f[:-3]) for f in os.listdir(r'{REPO}/svdiff') if f.endswith('.py') and f != '__init__.py']\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'comfy_api', 'execution', 'server')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr


def test_stale_partial_files_of_killed_writers_are_cleaned(tmp_path):
    import time as _t
    import svdiff.fileio as FI

    old = tmp_path / ".tmp-dead.part"
    old.write_bytes(b"half")
    fresh = tmp_path / ".tmp-busy.part"
    fresh.write_bytes(b"in progress")
    past = _t.time() - FI.STALE_PARTIAL_SECONDS - 10
    os.utime(old, (past, past))
    FI.atomic_write_bytes(str(tmp_path / "new.bin"), b"data")
    assert not old.exists() and fresh.exists() and (tmp_path / "new.bin").read_bytes() == b"data"
