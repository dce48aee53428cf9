"""Hostile paths and interrupted writes: nothing lands outside models/svdiff (or the output
folder), nothing existing is overwritten, and a crash mid-write leaves the old state.

The save folders are pointed at a sandbox deep inside a temporary directory (as
``extra_model_paths.yaml`` / ``--output-directory`` would), so that every escape through
``..`` or an absolute path would land inside the sandbox, where the test sees it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdiff.fileio as fileio
import svdiff.shiftfile as F
from svdiff.shift import SpectralShift
from svdiff_testkit.comfy_env import REPO

RANDOM = os.environ.get("SVDIFF_FUZZ_RANDOM", "0") not in ("0", "", "false")


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def tree(root: str) -> set:
    """Every file, directory and link below ``root`` (relative paths; directories end in /)."""
    out = set()
    for d, dirs, files in os.walk(root):
        for x in dirs:
            out.add(os.path.relpath(os.path.join(d, x), root) + "/")
        for x in files:
            out.add(os.path.relpath(os.path.join(d, x), root))
    return out


def small_shift(seed=0) -> SpectralShift:
    g = torch.Generator().manual_seed(seed)
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    return SpectralShift({k: torch.randn(8, generator=g)}, {k: (32, 32)}, {"architecture": "TinySD"})


@pytest.fixture(scope="module")
def sandbox(comfy, tmp_path_factory):
    """models/svdiff and output/ moved to <root>/a/b/c/{svdiff,output}; restored afterwards."""
    import folder_paths
    from svdiff_testkit.comfy_env import pack_module

    root = str(tmp_path_factory.mktemp("paths-sandbox"))
    svd = os.path.join(root, "a", "b", "c", "svdiff")
    out = os.path.join(root, "a", "b", "c", "output")
    os.makedirs(svd)
    os.makedirs(out)
    saved_paths = folder_paths.folder_names_and_paths.get("svdiff")
    saved_out = folder_paths.get_output_directory()
    folder_paths.folder_names_and_paths["svdiff"] = ([svd], {".safetensors"})
    folder_paths.set_output_directory(out)
    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
    try:
        yield {"root": root, "svdiff": svd, "output": out, "shifts": pack_module("nodes.shifts"),
               "common": pack_module("nodes.common"), "arith": pack_module("nodes.arithmetic")}
    finally:
        if saved_paths is not None:
            folder_paths.folder_names_and_paths["svdiff"] = saved_paths
        folder_paths.set_output_directory(saved_out)
        getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)


# --------------------------------------------------------------------------------------
# sanitize_prefix: any string either is refused or stays inside the folder
# --------------------------------------------------------------------------------------
BAD = '<>:"|?*\\\x00\x01\n\t\x1f'
segment = st.one_of(
    st.just(".."), st.just("."), st.just(""), st.just("..."), st.just(". ."),
    st.text(alphabet=st.sampled_from(list("abc.-_ ") + list(BAD) + ["é", "\u202e", "\ufeff", "/"]), min_size=1, max_size=10),
    st.text(max_size=12),
    st.sampled_from(["C:", "c:", "~", "$HOME", "%year%", "con", "a" * 201, "\ud800", "\udcff", "..\\..", "%2e%2e"]),
)
prefixes = st.builds(
    lambda lead, segs, sep: lead + sep.join(segs),
    st.sampled_from(["", "", "", "/", "//", "\\", "C:\\", "c:/", "\\\\server\\share\\", "./", "../", " "]),
    st.lists(segment, min_size=1, max_size=6),
    st.sampled_from(["/", "\\", "//", "/./"]),
)


@fuzz(300)
@given(prefix=prefixes)
def test_sanitize_prefix_refuses_or_stays_inside(prefix):
    base = "/srv/comfy/models/svdiff"
    try:
        rel = fileio.sanitize_prefix(prefix)
    except fileio.UnsafePathError as e:
        assert "filename_prefix" in str(e)
        return
    parts = rel.split("/")
    assert ".." not in parts and "" not in parts and not rel.startswith("/")
    assert not any(set(p) & set(BAD) for p in parts)
    full = os.path.normpath(os.path.join(base, rel))
    assert os.path.commonpath([full, base]) == base and full != base


# --------------------------------------------------------------------------------------
# The real Save node with hostile prefixes
# --------------------------------------------------------------------------------------
@fuzz(60)
@given(prefix=prefixes)
def test_save_node_never_writes_outside_models_svdiff(sandbox, prefix):
    import nodes

    Save = nodes.NODE_CLASS_MAPPINGS["SVDiffSaveShift"]
    before = tree(sandbox["root"])
    try:
        res = Save.execute(shift=small_shift(), filename_prefix=prefix, dtype="float16")
    except sandbox["common"].SVDiffNodeError as e:
        msg = str(e)
        assert msg.startswith("[Save Spectral Shift]") and "filename_prefix" in msg, msg
        new = tree(sandbox["root"]) - before
        assert not [p for p in new if not p.startswith("a/b/c/svdiff/")], f"refused {prefix!r} but created {new}"
        assert not [p for p in new if not p.endswith("/")], f"refused {prefix!r} but left files {new}"
        return
    except BaseException as e:
        raise AssertionError(f"{prefix!r}: {type(e).__name__} instead of a clear error: {e}") from e
    path = res.result[0]
    real = os.path.realpath(path)
    assert os.path.commonpath([real, os.path.realpath(sandbox["svdiff"])]) == os.path.realpath(sandbox["svdiff"])
    new = tree(sandbox["root"]) - before
    files = [p for p in new if not p.endswith("/")]
    assert files == [os.path.relpath(real, os.path.realpath(sandbox["root"]))], (prefix, new)
    assert all(p.startswith("a/b/c/svdiff/") for p in new), (prefix, new)
    assert torch.allclose(F.load_shift(path).deltas[next(iter(small_shift().deltas))], small_shift().deltas[next(iter(small_shift().deltas))],
                          atol=1e-2)
    os.remove(path)


def test_absolute_and_dotdot_prefixes_are_refused_by_name(sandbox):
    import nodes

    Save = nodes.NODE_CLASS_MAPPINGS["SVDiffSaveShift"]
    decoy = os.path.join(sandbox["root"], "decoy")
    os.makedirs(decoy, exist_ok=True)
    for prefix in [os.path.join(decoy, "evil"), "../../../../decoy/evil", "svdiff/../../../../decoy/evil", "..\\..\\decoy\\evil",
                   "C:\\decoy\\evil", "a/\x00/evil", "a/b|c", ""]:
        with pytest.raises(sandbox["common"].SVDiffNodeError, match=r"\[Save Spectral Shift\] filename_prefix"):
            Save.execute(shift=small_shift(), filename_prefix=prefix, dtype="float16")
    assert os.listdir(decoy) == []


def test_symlinked_subfolder_cannot_lead_outside(sandbox):
    """A link inside models/svdiff pointing elsewhere: refused, and nothing is created through it."""
    import nodes

    Save = nodes.NODE_CLASS_MAPPINGS["SVDiffSaveShift"]
    outside = os.path.join(sandbox["root"], "outside")
    os.makedirs(outside, exist_ok=True)
    link = os.path.join(sandbox["svdiff"], "link")
    if not os.path.lexists(link):
        os.symlink(outside, link)
    try:
        for prefix in ["link/x", "link/sub/deeper/x"]:
            with pytest.raises(sandbox["common"].SVDiffNodeError, match=r"filename_prefix.*outside"):
                Save.execute(shift=small_shift(), filename_prefix=prefix, dtype="float16")
        assert os.listdir(outside) == [], "directories or files were created outside through the link"
    finally:
        os.remove(link)


def test_file_in_the_way_of_a_subfolder_is_a_clear_error(sandbox):
    import nodes

    Save = nodes.NODE_CLASS_MAPPINGS["SVDiffSaveShift"]
    blocker = os.path.join(sandbox["svdiff"], "blocker")
    with open(blocker, "wb") as f:
        f.write(b"i am a file")
    try:
        for prefix in ["blocker/x", "blocker/deeper/x"]:
            with pytest.raises(sandbox["common"].SVDiffNodeError, match=r"\[Save Spectral Shift\] filename_prefix.*blocker"):
                Save.execute(shift=small_shift(), filename_prefix=prefix, dtype="float16")
        assert open(blocker, "rb").read() == b"i am a file"
    finally:
        os.remove(blocker)


def test_lora_export_to_output_folder_stays_inside(sandbox, tiny):
    """Export as LoRA into output/loras with hostile prefixes: refused, nothing outside."""
    import nodes

    Export = nodes.NODE_CLASS_MAPPINGS["SVDiffToLoRA"]
    mp, _ = tiny
    before = tree(sandbox["root"])
    for prefix in ["../../escape", "/abs/escape", "ok/../../escape", "x\x00y"]:
        with pytest.raises(sandbox["common"].SVDiffNodeError, match="filename_prefix"):
            Export.execute(shift=small_shift(), model=mp, rank=0, filename_prefix=prefix, folder="output/loras")
    new = tree(sandbox["root"]) - before
    assert not [p for p in new if not p.endswith("/")], new
    res = Export.execute(shift=small_shift(), model=mp, rank=0, filename_prefix="fine/lora", folder="output/loras")
    path = res.result[0]
    assert os.path.commonpath([os.path.realpath(path), os.path.realpath(sandbox["output"])]) == os.path.realpath(sandbox["output"])


# --------------------------------------------------------------------------------------
# Never overwrite
# --------------------------------------------------------------------------------------
def test_existing_files_are_never_overwritten(sandbox):
    import nodes

    Save = nodes.NODE_CLASS_MAPPINGS["SVDiffSaveShift"]
    d = os.path.join(sandbox["svdiff"], "keep")
    os.makedirs(d, exist_ok=True)
    old = {}
    for i in (1, 2, 4):
        p = os.path.join(d, f"mine_{i:05}_.safetensors")
        with open(p, "wb") as f:
            f.write(f"precious {i}".encode())
        old[p] = open(p, "rb").read()
    written = [Save.execute(shift=small_shift(i), filename_prefix="keep/mine", dtype="float32").result[0] for i in range(3)]
    assert len(set(written)) == 3 and not set(written) & set(old)
    for p, content in old.items():
        assert open(p, "rb").read() == content
    for i, p in enumerate(written):
        assert torch.equal(F.load_shift(p).deltas[next(iter(small_shift().deltas))], next(iter(small_shift(i).deltas.values())))
    # the low-level writer refuses too, also when asked to write the same bytes
    p0 = next(iter(old))
    with pytest.raises(FileExistsError):
        fileio.atomic_write_bytes(p0, b"new", overwrite=False)
    with pytest.raises(FileExistsError):
        F.save_shift(small_shift(), p0)
    assert open(p0, "rb").read() == old[p0]
    assert not [f for f in os.listdir(d) if f.startswith(".tmp-")]


def test_concurrent_savers_never_share_a_name(sandbox):
    """Two threads saving under one prefix at once: every file distinct and intact."""
    shifts = sandbox["shifts"]
    results, errors = [], []

    def worker(tag):
        try:
            for i in range(6):
                sh = small_shift(100 * tag + i)
                results.append((shifts.save_shift_numbered("Save Spectral Shift", sh, "race/same", "float32"), sh))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    paths = [p for p, _ in results]
    assert len(paths) == 12 and len(set(paths)) == 12
    for p, sh in results:
        k = next(iter(sh.deltas))
        assert torch.equal(F.load_shift(p).deltas[k], sh.deltas[k])


# --------------------------------------------------------------------------------------
# Crashes mid-write
# --------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


@pytest.mark.parametrize("exc", [_Crash, KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [False, True])
def test_writer_failing_half_way_leaves_the_old_state(tmp_path, exc, existing):
    target = tmp_path / "shift.safetensors"
    good = F.shift_to_bytes(small_shift(), "float16")
    if existing:
        target.write_bytes(good)

    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(good[: len(good) // 2])
            f.flush()
            assert os.path.getsize(tmp) == len(good) // 2
            raise exc("crash half way")

    with pytest.raises(exc):
        fileio.atomic_write_via(str(target), writer, overwrite=existing)
    assert sorted(os.listdir(tmp_path)) == (["shift.safetensors"] if existing else [])
    if existing:
        assert target.read_bytes() == good
        F.load_shift(str(target))


_CHILD = r"""
import importlib.util, os, sys, time, signal, resource
spec = importlib.util.spec_from_file_location("svdiff_child", os.path.join(sys.argv[1], "svdiff", "__init__.py"),
                                              submodule_search_locations=[os.path.join(sys.argv[1], "svdiff")])
pkg = importlib.util.module_from_spec(spec); sys.modules["svdiff_child"] = pkg; spec.loader.exec_module(pkg)
import importlib
fileio = importlib.import_module("svdiff_child.fileio")
mode, target = sys.argv[2], sys.argv[3]
if mode == "kill":
    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            print("HALF", flush=True)
            time.sleep(120)
    fileio.atomic_write_via(target, writer, overwrite=sys.argv[4] == "1")
elif mode == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        fileio.atomic_write_bytes(target, b"\1" * 100000, overwrite=sys.argv[4] == "1")
    except OSError as e:
        print("OSERROR", e.errno, flush=True)
        sys.exit(3)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_killed_writer_leaves_old_state_and_nothing_loadable(sandbox, existing):
    """SIGKILL in the middle of a write: the final name keeps its old content (or does not
    exist); the orphaned temporary file is hidden from ComfyUI's shift list and the loader."""
    common = sandbox["common"]
    d = os.path.join(sandbox["svdiff"], f"killed{int(existing)}")
    os.makedirs(d, exist_ok=True)
    target = os.path.join(d, "victim.safetensors")
    good = F.shift_to_bytes(small_shift(), "float16")
    if existing:
        with open(target, "wb") as f:
            f.write(good)
    p = subprocess.Popen([sys.executable, "-c", _CHILD, REPO, "kill", target, "1" if existing else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "HALF", (line, p.stderr.read() if p.poll() is not None else "")
        partial = [f for f in os.listdir(d) if f != "victim.safetensors"]
        assert partial and os.path.getsize(os.path.join(d, partial[0])) == 1 << 20  # the write really was half way
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    if existing:
        assert open(target, "rb").read() == good
        F.load_shift(target)
    else:
        assert not os.path.lexists(target)
    listed = [f for f in common.shift_files() if f.startswith(f"killed{int(existing)}")]
    assert listed == (["killed1/victim.safetensors"] if existing else []), listed
    orphans = [f for f in os.listdir(d) if f.startswith(".tmp-")]
    assert orphans and all(f.endswith(".part") for f in orphans)


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_mid_write_leaves_old_state(tmp_path, existing):
    """A write failing with EFBIG (file-size limit, as a full disk would): old state, no temp left."""
    target = tmp_path / "big.safetensors"
    if existing:
        target.write_bytes(b"old content")
    r = subprocess.run([sys.executable, "-c", _CHILD, REPO, "fsize", str(target), "1" if existing else "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "OSERROR" in r.stdout, (r.stdout, r.stderr)
    assert sorted(os.listdir(tmp_path)) == (["big.safetensors"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old content"
