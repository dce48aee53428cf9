"""Hostile shift files: a fuzz corpus generated with hypothesis, through the real Load node.

Every case is written into ``models/svdiff/fuzz/`` and loaded with the real *Load Spectral
Shift* node on the tiny model (with its CLIP).  Each case must end in an SVDiffNodeError
that names the node and the file and states a problem we recognise, within bounded time
and memory, with the MODEL's and CLIP's patches unchanged and no pickle ever executed
(``torch.load`` / ``pickle`` are tripwired during every load; a pickle payload that would
create a marker file is planted and the marker must never appear).

The classes are those of issue 8.  ``test_zz_fuzz_summary`` prints the count per class,
how each class ended (problem categories) and the worst time/memory seen; run with ``-s``
or read it in the terminal summary.  Generation is derandomised (reproducible in CI); set
SVDIFF_FUZZ_RANDOM=1 to explore new examples, SVDIFF_FUZZ_SCALE=<float> for more/fewer.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdiff.shiftfile as F
from svdiff.shift import SpectralShift, delta_length, shapes_fingerprint

SCALE = float(os.environ.get("SVDIFF_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("SVDIFF_FUZZ_RANDOM", "0") not in ("0", "", "false")

# Bounds every case must stay within (wall time on a busy 2-core machine; peak RSS growth).
MAX_CASE_SECONDS = 5.0
MAX_CASE_PEAK_MB = 96.0


def fuzz(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------------------
# What a clear error looks like: the problem part of the message, classified.
# --------------------------------------------------------------------------------------
CATEGORIES = [
    (r"file is empty", "empty file"),
    (r"too short to be safetensors", "too short"),
    (r"pickle/zip", "pickle refused"),
    (r"header length \d+ does not fit", "header length does not fit"),
    (r"exceeds the \d+-byte limit", "header over the size limit"),
    (r"larger than any spectral shift", "file over the size limit"),
    (r"header is not UTF-8", "header not UTF-8"),
    (r"header is not a JSON object", "header not a JSON object"),
    (r"duplicate key", "duplicate key"),
    (r"header JSON is malformed", "header JSON malformed"),
    (r"__metadata__ must map strings", "metadata not str->str"),
    (r"tensor entry .* is malformed", "tensor entry malformed"),
    (r"only float16/bfloat16/float32/float64 are allowed", "dtype refused"),
    (r"has an invalid shape", "invalid shape"),
    (r"has invalid data offsets", "invalid data offsets"),
    (r"lies outside the file", "data outside the file"),
    (r"bytes do not hold shape", "byte count != shape x dtype"),
    (r"overlaps another tensor or leaves a gap", "overlap or gap"),
    (r"bytes of data that no tensor owns", "data no tensor owns"),
    (r"unknown format", "unknown format"),
    (r"has no spectral-shift metadata", "not a shift (LoRA/checkpoint?)"),
    (r"holds no tensors", "no tensors"),
    (r"a spectral shift stores 1-D tensors", "tensor not 1-D"),
    (r"format_version .* is not a number", "version not a number"),
    (r"newer than this pack supports", "format from the future"),
    (r"format version -?\d+ is invalid", "version invalid"),
    (r"safetensors could not read it", "safetensors refused"),
    (r"contains NaN values", "NaN"),
    (r"contains Inf values", "Inf"),
    (r"metadata field .* is not valid JSON", "metadata field not JSON"),
    (r"metadata has no 'shapes' table", "no shapes table"),
    (r"metadata 'shapes' has no valid shape", "no valid shape for a tensor"),
    (r"singular values", "delta longer than the spectrum"),
    (r"1-D tensor .* values, its weight has", "1-D length != weight"),
    (r"'shapes_fingerprint' does not match", "shapes fingerprint mismatch"),
    (r"'rank' .* is not a number", "rank not a number"),
    (r"other shapes than the model's", "shapes differ from the model (architecture)"),
    (r"keys match the model's weights", "keys not in the model (architecture)"),
    (r"maps to a weight of the model", "keys not in the model (architecture)"),
    (r"layout|svdiff-pytorch|connect the (MODEL|CLIP)|no base weight", "foreign layout"),
    (r"is a directory", "a directory"),
    (r"is not a regular file", "not a regular file"),
    (r"not found", "not found"),
]


def classify(problem: str) -> str | None:
    for pat, name in CATEGORIES:
        if re.search(pat, problem):
            return name
    return None


# Outcomes each class may end in (the problem must be one of these).
ALLOWED = {
    "truncated": {"empty file", "too short", "header length does not fit", "header not UTF-8", "header JSON malformed",
                  "header not a JSON object", "data outside the file", "data no tensor owns"},
    "header length lie": {"header length does not fit", "header not UTF-8", "header JSON malformed", "header not a JSON object",
                          "data no tensor owns", "data outside the file", "pickle refused"},
    "malformed header JSON": {"header length does not fit", "header not UTF-8", "header JSON malformed", "header not a JSON object", "duplicate key",
                              "tensor entry malformed", "data no tensor owns", "not a shift (LoRA/checkpoint?)",
                              "metadata not str->str",
                              # deleting the comma of [a,b] leaves valid JSON with one merged number
                              "invalid data offsets", "invalid shape", "byte count != shape x dtype", "data outside the file",
                              "overlap or gap"},
    "huge header": {"header over the size limit", "file over the size limit", "no shapes table", "format from the future",
                    "tensor entry malformed", "header JSON malformed"},
    "dtype mismatch": {"dtype refused", "byte count != shape x dtype"},
    "shape mismatch": {"byte count != shape x dtype", "invalid shape", "tensor not 1-D", "delta longer than the spectrum",
                       "1-D length != weight", "shapes fingerprint mismatch", "shapes differ from the model (architecture)",
                       "no shapes table", "no valid shape for a tensor"},
    "NaN/Inf": {"NaN", "Inf"},
    "empty": {"no tensors", "not a shift (LoRA/checkpoint?)", "unknown format", "delta longer than the spectrum",
              "1-D length != weight"},
    "duplicated keys": {"duplicate key", "metadata field not JSON"},
    "unknown keys": {"tensor entry malformed", "keys not in the model (architecture)"},
    "wrong architecture": {"shapes differ from the model (architecture)", "keys not in the model (architecture)",
                           "not a shift (LoRA/checkpoint?)", "foreign layout"},
    "metadata from the future": {"format from the future", "version not a number", "version invalid", "unknown format",
                                 "not a shift (LoRA/checkpoint?)"},
    "pickle renamed .safetensors": {"pickle refused", "header length does not fit"},
    "zero-byte file": {"empty file"},
    "directory with that name": {"a directory"},
    "not a regular file": {"not a regular file"},
    "hostile metadata JSON": {"metadata field not JSON", "no shapes table"},
}


class Ctx:
    """Module-wide state: the tiny model, the node, the base files and the tallies."""

    def __init__(self, comfy, shift_dir, marker_dir):
        from svdiff_testkit import tiny as tiny_mod
        from svdiff_testkit.comfy_env import pack_module

        self.adapter = pack_module("nodes.adapter")
        self.common = pack_module("nodes.common")
        self.Load = comfy["nodes"].NODE_CLASS_MAPPINGS["SVDiffLoadShift"]
        self.mp, self.clip = tiny_mod.build(seed=0)
        self.dir = os.path.join(shift_dir, "fuzz")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.marker_dir = marker_dir
        self.n = 0
        self.by_class: dict = collections.defaultdict(collections.Counter)
        self.worst: dict = collections.defaultdict(lambda: [0.0, 0.0])  # class -> [seconds, MiB]
        self.total_seconds = 0.0
        self.unet_shapes = self.adapter.shiftable_shapes(self.mp, "diffusion_model.")
        self.clip_shapes = self.adapter.shiftable_shapes(self.clip.patcher)
        self.shift = self._base_shift()
        self.bases = {dt: F.shift_to_bytes(self.shift, dt) for dt in ("float16", "float32")}

    def _base_shift(self) -> SpectralShift:
        u, c = self.unet_shapes, self.clip_shapes
        two_d = [k for k in sorted(u) if "attn2.to_k" in k][:2]
        conv = [k for k in sorted(u) if len(u[k]) == 4][:1]
        one_d = [k for k in sorted(u) if len(u[k]) == 1 and "norm" in k][:1]
        text = [k for k in sorted(c) if k.endswith("q_proj.weight")][:2]
        keys = two_d + conv + one_d + text
        assert len(keys) == 6, keys
        shapes = {k: (u.get(k) or c.get(k)) for k in keys}
        g = torch.Generator().manual_seed(3)
        deltas = {k: torch.randn(delta_length(shapes[k]), generator=g) * 0.05 for k in keys}
        return SpectralShift(deltas, shapes, {"architecture": "TinySD", "subset": "all", "training": {"steps": 1},
                                              "description": "fuzz base", "history": []})

    # -- the one place every case goes through -----------------------------------------
    def attempt(self, klass: str, make, name: str | None = None) -> str:
        """Create the entry with ``make(path)``, load it through the node, check the outcome."""
        self.n += 1
        name = name or f"case{self.n:05d}.safetensors"
        path = os.path.join(self.dir, name)
        make(path)
        patches_before = (dict(self.mp.patches), self.mp.patches_uuid, dict(self.clip.patcher.patches), self.clip.patcher.patches_uuid)
        rss0 = _reset_peak()
        t0 = time.perf_counter()
        err = None
        try:
            with _tripwires():
                self.Load.execute(model=self.mp, clip=self.clip, shift_name=f"fuzz/{name}", strength_model=1.0, strength_clip=1.0)
        except self.common.SVDiffNodeError as e:
            err = e
        except BaseException as e:  # anything else is a failure of the pack
            _remove(path)
            raise AssertionError(f"[{klass}] {name}: {type(e).__name__} instead of a clear error: {e}") from e
        dt = time.perf_counter() - t0
        peak = max(0.0, (_peak_rss() - rss0) / (1 << 20))
        _remove(path)
        self.total_seconds += dt
        assert err is not None, f"[{klass}] {name}: a hostile file was accepted"
        msg = str(err)
        assert msg.startswith("[Load Spectral Shift] "), msg
        assert name in msg, f"the error does not name the file: {msg}"
        cat = classify(msg)
        assert cat is not None, f"[{klass}] unrecognised problem: {msg}"
        assert cat in ALLOWED[klass], f"[{klass}] ended as {cat!r}: {msg}"
        after = (dict(self.mp.patches), self.mp.patches_uuid, dict(self.clip.patcher.patches), self.clip.patcher.patches_uuid)
        assert after == patches_before and not self.mp.patches and not self.clip.patcher.patches, "something was patched"
        assert dt < MAX_CASE_SECONDS, f"[{klass}] {name} took {dt:.2f} s"
        assert peak < MAX_CASE_PEAK_MB, f"[{klass}] {name} grew peak RSS by {peak:.1f} MiB"
        assert not os.listdir(self.marker_dir), "a pickle payload was executed"
        self.by_class[klass][cat] += 1
        w = self.worst[klass]
        w[0], w[1] = max(w[0], dt), max(w[1], peak)
        return cat

    def attempt_bytes(self, klass: str, data: bytes) -> str:
        return self.attempt(klass, lambda p: _write(p, data))


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def _peak_rss() -> int:
    return _status_kb("VmHWM")


class _Tripwire(Exception):
    pass


@contextlib.contextmanager
def _tripwires():
    """No unpickling may happen while a shift file is read (a guard, not a mock)."""

    def boom(*a, **k):
        raise _Tripwire("a shift file reached an unpickler")

    saved = (torch.load, pickle.load, pickle.loads)
    torch.load, pickle.load, pickle.loads = boom, boom, boom
    try:
        yield
    finally:
        torch.load, pickle.load, pickle.loads = saved


# --------------------------------------------------------------------------------------
# safetensors file surgery
# --------------------------------------------------------------------------------------
def split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def assemble(header, data: bytes = b"", n: int | None = None, pad: bool = True) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    b = header.encode("utf-8") if isinstance(header, str) else bytes(header)
    if pad:
        b += b" " * (-len(b) % 8)
    return struct.pack("<Q", len(b) if n is None else n) + b + data


def tensor_keys(header: dict) -> list:
    return [k for k in header if k != "__metadata__"]


@pytest.fixture(scope="module")
def ctx(comfy, tmp_path_factory):
    import folder_paths

    shift_dir = os.path.join(folder_paths.models_dir, "svdiff")
    os.makedirs(shift_dir, exist_ok=True)
    marker_dir = str(tmp_path_factory.mktemp("pickle-markers"))
    c = Ctx(comfy, shift_dir, marker_dir)
    yield c
    shutil.rmtree(c.dir, ignore_errors=True)
    assert not os.listdir(marker_dir)


# --------------------------------------------------------------------------------------
# The harness itself can see success: the base files load and patch.
# --------------------------------------------------------------------------------------
def test_base_files_are_valid_and_would_patch(ctx):
    for dt, raw in ctx.bases.items():
        path = os.path.join(ctx.dir, f"base_{dt}.safetensors")
        _write(path, raw)
        m, c, sh = ctx.Load.execute(model=ctx.mp, clip=ctx.clip, shift_name=f"fuzz/base_{dt}.safetensors",
                                    strength_model=1.0, strength_clip=1.0).result
        assert set(m.patches) == {k for k in ctx.shift.deltas if k.startswith("diffusion_model.")}
        assert set(c.patcher.patches) == {k for k in ctx.shift.deltas if k.startswith("clip_l.")}
        assert not ctx.mp.patches and not ctx.clip.patcher.patches
        _remove(path)
    # and the harness notices an accepted file
    with pytest.raises(AssertionError, match="accepted"):
        ctx.attempt_bytes("truncated", ctx.bases["float16"])


# --------------------------------------------------------------------------------------
# The classes of issue 8
# --------------------------------------------------------------------------------------
@fuzz(30)
@given(data=st.data())
def test_fuzz_truncated(ctx, data):
    raw = ctx.bases[data.draw(st.sampled_from(sorted(ctx.bases)))]
    (n,) = struct.unpack("<Q", raw[:8])
    k = data.draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(8 + n, len(raw) - 1)), label="cut at")  # also inside the data
    ctx.attempt_bytes("truncated", raw[:k])


@fuzz(25)
@given(data=st.data())
def test_fuzz_header_length_lies(ctx, data):
    raw = ctx.bases[data.draw(st.sampled_from(sorted(ctx.bases)))]
    (n,) = struct.unpack("<Q", raw[:8])
    lie = data.draw(
        st.one_of(
            st.integers(0, 2**64 - 1),
            st.integers(-64, 64).map(lambda d: n + d),
            st.sampled_from([0, 1, 7, len(raw) - 8, len(raw) - 7, 2**63, 2**64 - 1]),
        ).filter(lambda v: 0 <= v < 2**64 and v != n),
        label="claimed header length",
    )
    ctx.attempt_bytes("header length lie", struct.pack("<Q", lie) + raw[8:])


def _outer_structural_positions(text: str) -> list:
    """Indices of JSON punctuation outside strings (deleting one always breaks the JSON)."""
    out, in_str, esc = [], False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                out.append(i)
            continue
        if ch == '"':
            in_str = True
            out.append(i)
        elif ch in "{}[],:":
            out.append(i)
    return out


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                           max_leaves=12)


@fuzz(40)
@given(data=st.data())
def test_fuzz_malformed_header_json(ctx, data):
    raw = ctx.bases["float16"]
    header, body = split(raw)
    text = json.dumps(header, separators=(",", ":"))
    kind = data.draw(st.sampled_from(["delete punctuation", "random text", "bad utf-8", "cut json", "deep nesting",
                                      "trailing garbage", "not an object", "bad escapes"]), label="kind")
    if kind == "delete punctuation":
        i = data.draw(st.sampled_from(_outer_structural_positions(text)))
        blob = assemble(text[:i] + text[i + 1:], body)
    elif kind == "random text":
        t = data.draw(st.text(max_size=300))
        blob = assemble(t, body if data.draw(st.booleans()) else b"")
    elif kind == "bad utf-8":
        bad = data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80", b"\x80"]))
        i = data.draw(st.integers(0, len(text)))
        blob = assemble(text.encode()[:i] + bad + text.encode()[i:], body)
    elif kind == "cut json":
        i = data.draw(st.integers(0, len(text) - 1))
        blob = assemble(text[:i], body)
    elif kind == "deep nesting":
        depth = data.draw(st.integers(50, 200_000), label="depth")
        opener, closer = data.draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth
        blob = assemble('{"x":' + inner + "}", body)
    elif kind == "trailing garbage":
        junk = data.draw(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != ""))
        blob = assemble(text + junk, body)
    elif kind == "not an object":
        v = data.draw(json_values.filter(lambda v: not isinstance(v, dict)))
        blob = assemble(json.dumps(v), body)
    else:  # invalid escapes / control characters inside strings
        bad = data.draw(st.sampled_from(["\\x41", "\\u12", "\\q", "\n", "\x00", "\t\x01"]))
        i = text.index('"') + 1  # inside the first key
        blob = assemble(text[:i] + bad + text[i:], body)
    ctx.attempt_bytes("malformed header JSON", blob)


@fuzz(14)
@given(data=st.data())
def test_fuzz_huge_header(ctx, data):
    kind = data.draw(st.sampled_from(["declared huge (sparse)", "file too big (sparse)", "many tensors", "huge metadata"]))
    if kind == "declared huge (sparse)":
        n = data.draw(st.integers(F.MAX_HEADER_BYTES + 1, F.MAX_FILE_BYTES - 64), label="n")
        extra = data.draw(st.integers(0, 64))

        def make(p, n=n, extra=extra):
            with open(p, "wb") as f:
                f.write(struct.pack("<Q", n) + b"{")
                f.truncate(8 + n + extra)  # sparse: nothing is written, nothing may be read

        ctx.attempt("huge header", make)
        return
    if kind == "file too big (sparse)":
        size = data.draw(st.integers(F.MAX_FILE_BYTES + 1, 64 << 30), label="size")

        def make(p, size=size):
            with open(p, "wb") as f:
                f.write(struct.pack("<Q", 100) + b"{}")
                f.truncate(size)

        ctx.attempt("huge header", make)
        return
    meta = F.encode_metadata(ctx.shift, "float16")
    if kind == "many tensors":
        count = data.draw(st.integers(5_000, 40_000), label="tensors")
        header = {f"diffusion_model.t{i}.weight": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
        meta.pop("shapes")
        header["__metadata__"] = meta
        ctx.attempt_bytes("huge header", assemble(header))
    else:
        mb = data.draw(st.integers(1, 6), label="MiB")
        header, body = split(ctx.bases["float16"])
        header["__metadata__"]["description"] = "x" * (mb << 20)
        header["__metadata__"]["format_version"] = "2"
        ctx.attempt_bytes("huge header", assemble(header, body))


@fuzz(25)
@given(data=st.data())
def test_fuzz_dtype_mismatch(ctx, data):
    dt = data.draw(st.sampled_from(sorted(ctx.bases)))
    header, body = split(ctx.bases[dt])
    key = data.draw(st.sampled_from(tensor_keys(header)))
    cur = header[key]["dtype"]
    width = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
    new = data.draw(st.one_of(
        st.sampled_from(["I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F4",
                         "E8M0", "f16", "float16", "F 16", "", "F16 "]),
        st.sampled_from([d for d in width if width[d] != width[cur]]),
        st.text(max_size=8).filter(lambda s: s not in width),
        st.sampled_from([16, None, ["F16"], {"F16": 1}, 2.0]),
    ), label="dtype")
    header[key]["dtype"] = new
    ctx.attempt_bytes("dtype mismatch", assemble(header, body))


def _rebuild(ctx, shapes: dict, deltas: dict, fix_fingerprint: bool, dtype="float16", meta_edit=None) -> bytes:
    """A well-formed file of our layout with arbitrary (possibly wrong) shapes table."""
    from safetensors.torch import save

    meta = F.encode_metadata(ctx.shift, dtype)
    meta["shapes"] = json.dumps({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in shapes.items()})
    if fix_fingerprint:
        try:
            meta["shapes_fingerprint"] = shapes_fingerprint(shapes)
        except TypeError:
            pass
    if meta_edit:
        meta_edit(meta)
    return save({k: v.to(F._SAVE_DTYPES[dtype]).contiguous() for k, v in deltas.items()}, metadata=meta)


@fuzz(35)
@given(data=st.data())
def test_fuzz_shape_mismatch(ctx, data):
    kind = data.draw(st.sampled_from(["header shape vs bytes", "reshaped not 1-D", "shapes table altered", "delta too long",
                                      "1-D length wrong", "shapes table broken"]))
    sh = ctx.shift
    if kind in ("header shape vs bytes", "reshaped not 1-D"):
        header, body = split(ctx.bases[data.draw(st.sampled_from(sorted(ctx.bases)))])
        key = data.draw(st.sampled_from(tensor_keys(header)))
        info = header[key]
        width = 2 if info["dtype"] == "F16" else 4
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        numel = nbytes // width
        if kind == "header shape vs bytes":
            new = data.draw(st.one_of(
                st.lists(st.integers(0, 2**41), max_size=4).filter(lambda s: math.prod(s) * width != nbytes),
                st.lists(st.one_of(st.integers(-5, -1), st.floats(), st.booleans(), st.text(max_size=3)), min_size=1, max_size=3),
                st.sampled_from([None, "32", {"0": 32}, 32]),
            ), label="shape")
        else:
            divs = [d for d in range(1, numel + 1) if numel % d == 0]
            a = data.draw(st.sampled_from(divs))
            new = data.draw(st.sampled_from([[a, numel // a], [numel // a, 1, a], [1, numel]]))
        info["shape"] = new
        ctx.attempt_bytes("shape mismatch", assemble(header, body))
        return
    shapes = dict(sh.shapes)
    deltas = dict(sh.deltas)
    fix = data.draw(st.booleans(), label="fingerprint recomputed")
    key = data.draw(st.sampled_from(sorted(shapes)), label="key")
    if kind == "shapes table altered":
        new = tuple(data.draw(st.lists(st.integers(1, 4096), min_size=1, max_size=4).filter(lambda s: tuple(s) != tuple(shapes[key]))))
        shapes[key] = new
    elif kind == "delta too long":
        if len(shapes[key]) == 1:
            key = sorted(k for k in shapes if len(shapes[k]) > 1)[0]
        extra = data.draw(st.integers(1, 64))
        deltas[key] = torch.zeros(delta_length(shapes[key]) + extra)
        fix = True
    elif kind == "1-D length wrong":
        key = [k for k in shapes if len(shapes[k]) == 1][0]
        n = data.draw(st.integers(1, 200).filter(lambda v: v != shapes[key][0]))
        deltas[key] = torch.zeros(n)
        fix = True
    else:  # the table is missing a key, not a dict, or holds invalid dims
        broken = data.draw(st.sampled_from(["missing key", "not a dict", "zero dim", "negative dim", "bool dim", "float dim",
                                            "six dims", "no table"]))
        if broken == "missing key":
            shapes.pop(key)
        elif broken == "not a dict":
            shapes = None
        elif broken == "no table":
            blob = _rebuild(ctx, shapes, deltas, True, meta_edit=lambda m: m.pop("shapes"))
            ctx.attempt_bytes("shape mismatch", blob)
            return
        else:
            shapes[key] = {"zero dim": [0, 32], "negative dim": [-32, 32], "bool dim": [True, 32], "float dim": [32.0, 32],
                           "six dims": [1, 1, 1, 1, 1, 32]}[broken]
        if shapes is None:
            blob = _rebuild(ctx, {}, deltas, False, meta_edit=lambda m: m.__setitem__("shapes", "[1, 2]"))
        else:
            blob = _rebuild(ctx, shapes, deltas, False)
        ctx.attempt_bytes("shape mismatch", blob)
        return
    ctx.attempt_bytes("shape mismatch", _rebuild(ctx, shapes, deltas, fix))


@fuzz(25)
@given(data=st.data())
def test_fuzz_nan_inf(ctx, data):
    import numpy as np

    dt = data.draw(st.sampled_from(sorted(ctx.bases)))
    header, body = split(ctx.bases[dt])
    key = data.draw(st.sampled_from(tensor_keys(header)))
    b, e = header[key]["data_offsets"]
    buf = bytearray(body)
    if dt == "float16":
        view = np.frombuffer(buf, dtype=np.uint16, count=(e - b) // 2, offset=b)
        bits = 0x7C00 | data.draw(st.integers(0, 0x3FF), label="mantissa") | (0x8000 if data.draw(st.booleans()) else 0)
    else:
        view = np.frombuffer(buf, dtype=np.uint32, count=(e - b) // 4, offset=b)
        bits = 0x7F800000 | data.draw(st.integers(0, 0x7FFFFF), label="mantissa") | (0x80000000 if data.draw(st.booleans()) else 0)
    idx = data.draw(st.integers(0, len(view) - 1), label="element")
    view.setflags(write=True)
    view[idx] = bits
    cat = ctx.attempt_bytes("NaN/Inf", assemble(header, bytes(buf)))
    is_nan = (bits & (0x3FF if dt == "float16" else 0x7FFFFF)) != 0
    assert cat == ("NaN" if is_nan else "Inf")


@fuzz(18)
@given(data=st.data())
def test_fuzz_empty(ctx, data):
    kind = data.draw(st.sampled_from(["{}", "random metadata only", "our metadata only", "zero-length deltas"]))
    if kind == "{}":
        ctx.attempt_bytes("empty", assemble("{}", b"", pad=data.draw(st.booleans())))
    elif kind == "random metadata only":
        meta = data.draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5)
                         .filter(lambda m: m.get("format") != F.FORMAT_NAME))
        ctx.attempt_bytes("empty", assemble({"__metadata__": meta}))
    elif kind == "our metadata only":
        meta = F.encode_metadata(ctx.shift, "float16")
        meta["shapes"] = "{}"
        ctx.attempt_bytes("empty", assemble({"__metadata__": meta}))
    else:
        keys = data.draw(st.lists(st.sampled_from(sorted(ctx.shift.shapes)), min_size=1, unique=True), label="emptied")
        deltas = {k: (torch.zeros(0) if k in keys else v) for k, v in ctx.shift.deltas.items()}
        ctx.attempt_bytes("empty", _rebuild(ctx, ctx.shift.shapes, deltas, True))


def _dup_text(text: str, key: str) -> str:
    """Insert a second ``"key": <value>`` member right after the first one at the top level."""
    obj = json.loads(text)
    member = json.dumps(key) + ":" + json.dumps(obj[key], separators=(",", ":"))
    return "{" + member + "," + text[1:]


@fuzz(25)
@given(data=st.data())
def test_fuzz_duplicated_keys(ctx, data):
    header, body = split(ctx.bases["float16"])
    text = json.dumps(header, separators=(",", ":"))
    kind = data.draw(st.sampled_from(["tensor entry", "__metadata__", "metadata field", "entry field", "inside shapes JSON",
                                      "inside training JSON"]))
    if kind == "tensor entry":
        key = data.draw(st.sampled_from(tensor_keys(header)))
        text = _dup_text(text, key)
    elif kind == "__metadata__":
        text = _dup_text(text, "__metadata__")
    elif kind == "metadata field":
        field = data.draw(st.sampled_from(sorted(header["__metadata__"])))
        inner = _dup_text(json.dumps(header["__metadata__"], separators=(",", ":")), field)
        rest = {k: v for k, v in header.items() if k != "__metadata__"}
        text = '{"__metadata__":' + inner + "," + json.dumps(rest, separators=(",", ":"))[1:]
    elif kind == "entry field":
        key = data.draw(st.sampled_from(tensor_keys(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        inner = _dup_text(json.dumps(header[key], separators=(",", ":")), field)
        rest = {k: v for k, v in header.items() if k != key}
        text = "{" + json.dumps(key) + ":" + inner + "," + json.dumps(rest, separators=(",", ":"))[1:]
    else:  # duplicates hidden in the JSON strings inside __metadata__ (same or different values)
        field = "shapes" if kind == "inside shapes JSON" else "training"
        inner = header["__metadata__"][field]
        obj = json.loads(inner)
        k = data.draw(st.sampled_from(sorted(obj)))
        same = data.draw(st.booleans(), label="same value")
        val = obj[k] if same else ([1] if field == "shapes" else "other")
        header["__metadata__"][field] = "{" + json.dumps(k) + ":" + json.dumps(val) + "," + inner[1:]
        text = json.dumps(header, separators=(",", ":"))
    ctx.attempt_bytes("duplicated keys", assemble(text, body))


key_names = st.one_of(
    st.text(max_size=40),
    st.builds(lambda s: f"diffusion_model.{s}.weight", st.text(max_size=20)),
    st.builds(lambda s: f"clip_l.transformer.{s}.weight", st.text(alphabet="abcxyz.0123", max_size=20)),
    st.sampled_from(["", "../../etc/passwd", "diffusion_model.", "diffusion_model.out.2.bias", "x" * 5000,
                     "diffusion_model.input_blocks.0.0.bias", "first_stage_model.decoder.conv_in.weight"]),
)


@fuzz(25)
@given(data=st.data())
def test_fuzz_unknown_keys(ctx, data):
    kind = data.draw(st.sampled_from(["extra entry field", "junk top-level entry", "every key renamed"]))
    if kind == "extra entry field":
        header, body = split(ctx.bases["float16"])
        key = data.draw(st.sampled_from(tensor_keys(header)))
        field = data.draw(st.text(max_size=12).filter(lambda f: f not in ("dtype", "shape", "data_offsets")))
        header[key][field] = data.draw(json_values)
        ctx.attempt_bytes("unknown keys", assemble(header, body))
    elif kind == "junk top-level entry":
        header, body = split(ctx.bases["float16"])
        name = data.draw(st.text(max_size=20).filter(lambda k: k not in header))
        header[name] = data.draw(json_values.filter(lambda v: not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}))
        ctx.attempt_bytes("unknown keys", assemble(header, body))
    else:
        known = set(ctx.unet_shapes) | set(ctx.clip_shapes)
        olds = sorted(ctx.shift.deltas)
        news = data.draw(st.lists(key_names.filter(lambda k: k not in known and k != "__metadata__" and not k.endswith(".delta")),
                                  min_size=len(olds), max_size=len(olds), unique=True), label="new names")
        ren = dict(zip(olds, news))
        shapes = {ren[k]: v for k, v in ctx.shift.shapes.items()}
        deltas = {ren[k]: v for k, v in ctx.shift.deltas.items()}
        ctx.attempt_bytes("unknown keys", _rebuild(ctx, shapes, deltas, True))


SD15_LIKE = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "diffusion_model.middle_block.1.norm.weight": (1280,),
    "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
}
FLUX_LIKE = {
    "diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "diffusion_model.single_blocks.3.linear2.weight": (3072, 15360),
    "diffusion_model.final_layer.linear.weight": (64, 3072),
}


@fuzz(25)
@given(data=st.data())
def test_fuzz_wrong_architecture(ctx, data):
    from safetensors.torch import save

    kind = data.draw(st.sampled_from(["scaled widths", "SD1.5 shapes", "other model's keys", "LoRA file", "checkpoint file",
                                      "svdiff-pytorch layout, unknown names"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    if kind in ("scaled widths", "SD1.5 shapes", "other model's keys"):
        if kind == "scaled widths":
            f = data.draw(st.sampled_from([2, 3, 4]), label="factor")
            keys = data.draw(st.lists(st.sampled_from(sorted(ctx.shift.shapes)), min_size=1, unique=True))
            shapes = {k: (tuple(s[0] * f for _ in [0]) + tuple(s[1:]) if k in keys else tuple(s)) for k, s in ctx.shift.shapes.items()}
        elif kind == "SD1.5 shapes":
            keys = data.draw(st.lists(st.sampled_from(sorted(SD15_LIKE)), min_size=1, unique=True))
            shapes = {k: SD15_LIKE[k] for k in keys}
        else:
            keys = data.draw(st.lists(st.sampled_from(sorted(FLUX_LIKE)), min_size=1, unique=True))
            shapes = {k: FLUX_LIKE[k] for k in keys}
        deltas = {k: torch.randn(delta_length(s), generator=g) * 0.01 for k, s in shapes.items()}
        arch = data.draw(st.sampled_from(["TinySD", "SD15", "SDXL", "Flux", ""]))
        sh = SpectralShift(deltas, shapes, {"architecture": arch})
        ctx.attempt_bytes("wrong architecture", F.shift_to_bytes(sh, "float16"))
        return
    if kind == "LoRA file":
        r = data.draw(st.integers(1, 8))
        t = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(r, 32, generator=g),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, r, generator=g),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(float(r))}
        meta = data.draw(st.sampled_from([None, {"ss_network_module": "networks.lora"}]))
        blob = save(t, metadata=meta)
    elif kind == "checkpoint file":
        t = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
             "model.diffusion_model.input_blocks.0.0.bias": torch.randn(32, generator=g)}
        blob = save(t)
    else:
        names = data.draw(st.lists(st.text(alphabet="abcdefgh_.0123", min_size=1, max_size=30), min_size=1, max_size=4, unique=True))
        blob = save({f"zz_{n}.delta": torch.randn(4, generator=g) for n in names})
    ctx.attempt_bytes("wrong architecture", blob)


@fuzz(25)
@given(data=st.data())
def test_fuzz_metadata_from_the_future(ctx, data):
    def not_one(s: str) -> bool:
        try:
            return int(s) != 1
        except ValueError:
            return True

    field, value = data.draw(st.one_of(
        st.tuples(st.just("format_version"), st.integers(2, 10**40).map(str)),
        st.tuples(st.just("format_version"), st.text(max_size=12).filter(not_one)),
        st.tuples(st.just("format_version"), st.sampled_from(["2.0", "1.1", "v2", "0", "-1", "", "1e3", "\u0662", "2_000"])),
        st.tuples(st.just("format"), st.text(min_size=1, max_size=24).filter(lambda s: s != F.FORMAT_NAME)),
        st.tuples(st.just("format"), st.sampled_from(["svdiff-comfyui-2", "SVDIFF-COMFYUI", "svdiff-comfyui ", "svdiff"])),
    ), label="field")
    header, body = split(ctx.bases[data.draw(st.sampled_from(sorted(ctx.bases)))])
    header["__metadata__"][field] = value
    ctx.attempt_bytes("metadata from the future", assemble(header, body))


@fuzz(25)
@given(data=st.data())
def test_fuzz_hostile_metadata_json(ctx, data):
    """The JSON strings inside __metadata__ (shapes, training, history) are parsed too."""
    field = data.draw(st.sampled_from(["shapes", "training", "history"]))
    kind = data.draw(st.sampled_from(["deep nesting", "malformed", "huge number"]))
    if kind == "deep nesting":
        depth = data.draw(st.integers(2_000, 200_000), label="depth")
        value = "[" * depth + "]" * depth
    elif kind == "malformed":
        value = data.draw(st.sampled_from(["{", "[1,", "{'a': 1}", "NaN]", "{\"a\" 1}", "\x00"]))
    else:
        value = "[" + "9" * data.draw(st.integers(5_000, 100_000)) + "]"
    header, body = split(ctx.bases["float16"])
    header["__metadata__"][field] = value
    ctx.attempt_bytes("hostile metadata JSON", assemble(header, body))


class _Payload:
    """Unpickling this creates the marker file (it would prove code ran)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(kind: str, protocol: int, marker: str) -> bytes:
    import io

    obj = {"diffusion_model.x.weight": torch.zeros(4), "evil": _Payload(marker)}
    if kind == "torch.save (zip)":
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    if kind == "torch.save (legacy)":
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False, pickle_protocol=max(2, protocol))
        return buf.getvalue()
    return pickle.dumps(_Payload(marker), protocol=protocol)


def test_pickle_payload_is_live(tmp_path):
    """Control: the planted payload really creates the marker when something unpickles it."""
    marker = str(tmp_path / "ran")
    blob = _pickle_bytes("pickle", 2, marker)
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"], check=True, timeout=60)
    assert os.path.exists(marker)


@fuzz(20)
@given(data=st.data())
def test_fuzz_pickle_renamed(ctx, data):
    kind = data.draw(st.sampled_from(["torch.save (zip)", "torch.save (legacy)", "pickle"]))
    protocol = data.draw(st.integers(0 if kind == "pickle" else 2, 5), label="protocol")
    blob = _pickle_bytes(kind, protocol, os.path.join(ctx.marker_dir, "payload-ran"))
    ctx.attempt_bytes("pickle renamed .safetensors", blob)


def test_zero_byte_directory_and_special_files(ctx, tmp_path):
    ctx.attempt("zero-byte file", lambda p: open(p, "wb").close())
    ctx.attempt("directory with that name", lambda p: os.makedirs(p))

    def dir_with_content(p):
        os.makedirs(os.path.join(p, "inner"))
        _write(os.path.join(p, "model.safetensors"), ctx.bases["float16"])

    ctx.attempt("directory with that name", dir_with_content)
    # a FIFO would block a reader forever: it must be refused without being opened
    ctx.attempt("not a regular file", lambda p: os.mkfifo(p))
    ctx.attempt("not a regular file", lambda p: os.symlink("/dev/zero", p))
    ctx.attempt("not a regular file", lambda p: os.symlink(str(tmp_path / "nowhere"), p))
    ctx.attempt("not a regular file", lambda p: os.symlink(p, p))  # a loop


def test_errors_surface_through_the_executor(ctx, comfy):
    """A hostile file in a real prompt: ComfyUI reports our message for the Load node."""
    import folder_paths
    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import run_prompt

    tiny_mod.register_tiny_sd()
    ckpt_dir = folder_paths.get_folder_paths("checkpoints")[0]
    os.makedirs(ckpt_dir, exist_ok=True)
    if not os.path.exists(os.path.join(ckpt_dir, "tiny_sd.safetensors")):
        tmp = os.path.join(ckpt_dir, f".tiny_sd.{os.getpid()}.partial")
        tiny_mod.write_checkpoint(tmp)
        os.replace(tmp, os.path.join(ckpt_dir, "tiny_sd.safetensors"))
    getattr(folder_paths, "filename_list_cache", {}).pop("checkpoints", None)
    marker = os.path.join(ctx.marker_dir, "payload-ran")
    cases = {"evil_pickle.safetensors": _pickle_bytes("torch.save (zip)", 2, marker),
             "cut.safetensors": ctx.bases["float16"][:100]}
    for name, blob in cases.items():
        _write(os.path.join(ctx.dir, name), blob)
        getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd.safetensors"}},
            "2": {"class_type": "SVDiffLoadShift", "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": f"fuzz/{name}",
                                                              "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["2", 2], "filename_prefix": "fuzz_never", "dtype": "float16"}},
        }
        ex, _ = run_prompt(prompt)
        assert not ex.success
        errs = [d for ev, d in ex.status_messages if ev == "execution_error"]
        assert errs and errs[0]["node_id"] == "2", ex.status_messages
        assert "[Load Spectral Shift]" in errs[0]["exception_message"] and name in errs[0]["exception_message"]
        _remove(os.path.join(ctx.dir, name))
    assert not os.listdir(ctx.marker_dir)
    assert not [f for f in os.listdir(folder_paths.get_folder_paths("svdiff")[0]) if f.startswith("fuzz_never")]


def test_zz_fuzz_summary(ctx, request):
    """Totals per class (issue 8 asks for them in the closing note)."""
    total = sum(sum(c.values()) for c in ctx.by_class.values())
    lines = [f"SVDiff hostile-file fuzz: {total} cases, all refused with a clear error, nothing patched, no pickle run "
             f"(total {ctx.total_seconds:.1f} s in the loader)"]
    for klass in ALLOWED:
        c = ctx.by_class.get(klass)
        if not c:
            continue
        s, mb = ctx.worst[klass]
        ends = ", ".join(f"{k} {v}" for k, v in c.most_common())
        lines.append(f"  {klass:30s} {sum(c.values()):4d}  worst {s * 1000:7.1f} ms {mb:6.1f} MiB peak  | {ends}")
    text = "\n".join(lines)
    print("\n" + text)
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.ensure_newline()
            tr.write_line(text)
    if ctx.n >= 250:  # the whole module ran (not a -k selection)
        assert total >= 200
        assert len(ctx.by_class) >= 15
