"""Reading and writing spectral-shift files (safetensors), treating every file as hostile.

Layout (format ``svdiff-comfyui`` version 1):

* one 1-D tensor per patched weight, keyed by the ComfyUI state-dict key of that weight
  (``diffusion_model.…`` for the UNet, ``clip_l.transformer.…`` etc. for text encoders);
  float16 by default, float32 on request.  A rank-r matrix shift stores its first r values.
* ``__metadata__`` (strings only, as safetensors requires):

  ==================  ==========================================================
  format              "svdiff-comfyui"
  format_version      "1"
  architecture        e.g. "SD15", "SD20", "SDXL"
  subset              the parameter subset that was trained (Table 1), e.g. "UNet"
  rank                "0" (all singular values) or r (appendix E.1)
  shapes              JSON {key: base-weight shape}
  shapes_fingerprint  hash of ``shapes`` (identifies the architecture)
  base_fingerprint    hash of the base UNet weights the shift was trained on
  clip_fingerprint    the same for the text-encoder weights (when it shifts them)
  training            JSON of the training settings (instance prompt, steps, ...)
  trigger_words       the instance prompt's special tokens, for people sharing files
  description         free text
  history             JSON list of the operations that made the shift
  ==================  ==========================================================

  A saver may add further string entries (``extra`` of :func:`shift_to_bytes`): Save
  Spectral Shift records, as ComfyUI's checkpoint saver does, the API prompt as ``prompt``
  and the editor's workflow as ``workflow`` (JSON), or names what it left out in
  ``provenance_skipped``.  They never replace the entries above.

Reading parses the header itself before anything else touches the file: bounded header
size, strict JSON without duplicate keys, known dtypes, consistent offsets that stay
inside the file, then loads with ``safetensors`` (never ``torch.load``: no pickle is ever
executed), and checks values are finite and lengths agree with the shapes.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

from .fileio import atomic_write_bytes
from .shift import SpectralShift, delta_length, is_spectral_shape, shapes_fingerprint

FORMAT_NAME = "svdiff-comfyui"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 << 20  # 64 MiB of JSON is far above any real shift file's header
MAX_FILE_BYTES = 4 << 30
_DTYPES = {"F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4), "F64": (torch.float64, 8)}
_SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class ShiftFileError(ValueError):
    """A spectral-shift file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"spectral shift file '{path}': {problem}")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in the header")
        out[k] = v
    return out


def read_header(path: str) -> tuple[dict, dict, int]:
    """Parse and validate a safetensors header: (tensors, metadata, data_start)."""
    if not os.path.lexists(path):
        raise ShiftFileError(path, "file not found")
    if os.path.isdir(path):
        raise ShiftFileError(path, "is a directory, not a file")
    if not os.path.isfile(path):
        raise ShiftFileError(path, "is not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ShiftFileError(path, "file is empty (0 bytes)")
    if size < 8:
        raise ShiftFileError(path, f"file is {size} bytes, too short to be safetensors")
    if size > MAX_FILE_BYTES:
        raise ShiftFileError(path, f"file is {size} bytes, larger than any spectral shift ({MAX_FILE_BYTES} allowed)")
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > size - 8:
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise ShiftFileError(path, "is a pickle/zip (PyTorch .pt/.ckpt) file, not safetensors; it is not loaded")
            raise ShiftFileError(path, f"header length {n} does not fit in a file of {size} bytes (truncated or not safetensors)")
        if n > MAX_HEADER_BYTES:
            raise ShiftFileError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ShiftFileError(path, "header is not UTF-8 text (not a safetensors file)") from None
    if not text.lstrip().startswith("{"):
        raise ShiftFileError(path, "header is not a JSON object (not a safetensors file)")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise ShiftFileError(path, f"header JSON is malformed: {e}") from None
    if not isinstance(header, dict):
        raise ShiftFileError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ShiftFileError(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or len(info) != 3:
            raise ShiftFileError(path, f"tensor entry {key!r} is malformed")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ShiftFileError(path, f"tensor {key!r} has dtype {dtype!r}; only float16/bfloat16/float32/float64 are allowed")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise ShiftFileError(path, f"tensor {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ShiftFileError(path, f"tensor {key!r} has invalid data offsets {offs!r}")
        b, e = offs
        numel = math.prod(shape)
        if not 0 <= b <= e <= data_len:
            raise ShiftFileError(path, f"tensor {key!r} data [{b}, {e}) lies outside the file's {data_len} data bytes (truncated?)")
        if e - b != numel * _DTYPES[dtype][1]:
            raise ShiftFileError(path, f"tensor {key!r}: {e - b} bytes do not hold shape {shape} of {dtype}")
        spans.append((b, e, key))
    spans.sort()
    pos = 0
    for b, e, key in spans:
        if b != pos:
            raise ShiftFileError(path, f"tensor {key!r} data overlaps another tensor or leaves a gap")
        pos = e
    if pos != data_len:
        raise ShiftFileError(path, f"the file has {data_len - pos} bytes of data that no tensor owns")
    return header, metadata, 8 + n


def detect_layout(tensor_keys, metadata: dict) -> str:
    """'svdiff-comfyui' (ours), 'svdiff-pytorch' (the unofficial implementation) or 'unknown'."""
    if metadata.get("format") == FORMAT_NAME:
        return FORMAT_NAME
    keys = list(tensor_keys)
    if keys and not metadata.get("format") and all(k.endswith(".delta") for k in keys):
        return "svdiff-pytorch"
    return "unknown"


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors re-validates; any complaint is a bad file
        raise ShiftFileError(path, f"safetensors could not read it: {e}") from None


def _check_finite(path: str, tensors: dict) -> None:
    for key, t in tensors.items():
        if t.numel() and not torch.isfinite(t.float()).all():
            bad = "NaN" if torch.isnan(t.float()).any() else "Inf"
            raise ShiftFileError(path, f"tensor {key!r} contains {bad} values")


def load_raw(path: str) -> tuple[dict, dict, str]:
    """Validated tensors + metadata + layout name of any shift file this pack reads."""
    header, metadata, _ = read_header(path)
    layout = detect_layout(header.keys(), metadata)
    if layout == "unknown":
        fmt = metadata.get("format")
        if fmt:
            raise ShiftFileError(path, f"unknown format {fmt!r} (expected {FORMAT_NAME!r})")
        raise ShiftFileError(path, "has no spectral-shift metadata and is not in a known shift layout (is it a LoRA or a checkpoint?)")
    if not header:
        raise ShiftFileError(path, "holds no tensors")
    for key, info in header.items():
        if len(info["shape"]) != 1 and not (layout == "svdiff-pytorch" and len(info["shape"]) == 0):
            raise ShiftFileError(path, f"tensor {key!r} has shape {info['shape']}; a spectral shift stores 1-D tensors")
    if layout == FORMAT_NAME:
        try:
            version = int(metadata.get("format_version", ""))
        except ValueError:
            raise ShiftFileError(path, f"format_version {metadata.get('format_version')!r} is not a number") from None
        if version > FORMAT_VERSION:
            raise ShiftFileError(path, f"format version {version} is newer than this pack supports ({FORMAT_VERSION}); update the pack")
        if version < 1:
            raise ShiftFileError(path, f"format version {version} is invalid")
    tensors = _load_tensors(path)
    _check_finite(path, tensors)
    return tensors, metadata, layout


def _json_field(path: str, metadata: dict, name: str, default):
    raw = metadata.get(name)
    if raw is None or raw == "":
        return default
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # also duplicate keys and hostile nesting depth
        raise ShiftFileError(path, f"metadata field {name!r} is not valid JSON: {str(e)[:200]}") from None


def shift_from_raw(path: str, tensors: dict, metadata: dict) -> SpectralShift:
    """Build a SpectralShift from a validated file of our own layout."""
    shapes_raw = _json_field(path, metadata, "shapes", None)
    if not isinstance(shapes_raw, dict):
        raise ShiftFileError(path, "metadata has no 'shapes' table")
    shapes = {}
    for key, t in tensors.items():
        s = shapes_raw.get(key)
        if not (isinstance(s, list) and 1 <= len(s) <= 5 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in s)):
            raise ShiftFileError(path, f"metadata 'shapes' has no valid shape for tensor {key!r}")
        s = tuple(s)
        n = t.shape[0]
        if is_spectral_shape(s):
            full = delta_length(s)
            if not 0 < n <= full:
                raise ShiftFileError(path, f"tensor {key!r} has {n} values but its weight {list(s)} has {full} singular values")
        elif n != s[0]:
            raise ShiftFileError(path, f"1-D tensor {key!r} has {n} values, its weight has {s[0]}")
        shapes[key] = s
    fp = metadata.get("shapes_fingerprint")
    if fp and fp != shapes_fingerprint(shapes):
        raise ShiftFileError(path, "metadata 'shapes_fingerprint' does not match its 'shapes' table (file altered?)")
    meta = {
        "architecture": metadata.get("architecture", ""),
        "subset": metadata.get("subset", ""),
        "rank": 0,
        "base_fingerprint": metadata.get("base_fingerprint", ""),
        "clip_fingerprint": metadata.get("clip_fingerprint", ""),
        "training": _json_field(path, metadata, "training", {}),
        "trigger_words": metadata.get("trigger_words", ""),
        "description": metadata.get("description", ""),
        "history": _json_field(path, metadata, "history", []),
        "source_file": os.path.basename(path),
        "file_dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else "",
    }
    try:
        meta["rank"] = int(metadata.get("rank", "0") or 0)
    except ValueError:
        raise ShiftFileError(path, f"metadata 'rank' {metadata.get('rank')!r} is not a number") from None
    return SpectralShift({k: v.float() for k, v in tensors.items()}, shapes, meta)


def load_shift(path: str) -> SpectralShift:
    """Read and validate a shift file in this pack's layout.

    Files in the svdiff-pytorch layout need the base model to be converted; they raise
    here and are read with ``svdiff.interchange`` (which the loader node uses).
    """
    tensors, metadata, layout = load_raw(path)
    if layout != FORMAT_NAME:
        raise ShiftFileError(path, f"is in the {layout} layout; convert it with svdiff.interchange")
    return shift_from_raw(path, tensors, metadata)


# The __metadata__ entries of the format itself (what encode_metadata writes).
CORE_METADATA_KEYS = frozenset((
    "format", "format_version", "architecture", "subset", "rank", "shapes", "shapes_fingerprint", "base_fingerprint",
    "clip_fingerprint", "training", "trigger_words", "description", "history", "dtype",
))


def encode_metadata(shift: SpectralShift, dtype_name: str) -> dict:
    m = shift.metadata
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "architecture": str(m.get("architecture", "")),
        "subset": str(m.get("subset", "")),
        "rank": str(int(m.get("rank", 0) or 0)),
        "shapes": json.dumps({k: list(v) for k, v in shift.shapes.items()}, separators=(",", ":")),
        "shapes_fingerprint": shapes_fingerprint(shift.shapes),
        "base_fingerprint": str(m.get("base_fingerprint", "")),
        "clip_fingerprint": str(m.get("clip_fingerprint", "")),
        "training": json.dumps(m.get("training", {}), default=str),
        "trigger_words": str(m.get("trigger_words", "")),
        "description": str(m.get("description", "")),
        "history": json.dumps(m.get("history", []), default=str),
        "dtype": dtype_name,
    }


def shift_to_bytes(shift: SpectralShift, dtype: str = "float16", extra: dict | None = None) -> bytes:
    """The file's bytes.  ``extra``: more ``__metadata__`` strings (e.g. provenance); a key
    of the format's own (``format``, ``shapes``, ...) is ignored there, never replaced."""
    from safetensors.torch import save

    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose from {sorted(_SAVE_DTYPES)}")
    if not shift.deltas:
        raise ValueError("the spectral shift is empty; there is nothing to save")
    tdt = _SAVE_DTYPES[dtype]
    tensors = {}
    for k, d in shift.deltas.items():
        t = d.detach().to("cpu", tdt).contiguous()
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"delta for {k!r} is not finite in {dtype} (NaN, Inf or out of range); save in float32")
        tensors[k] = t
    metadata = encode_metadata(shift, dtype)
    for k, v in (extra or {}).items():
        if isinstance(k, str) and isinstance(v, str) and k not in CORE_METADATA_KEYS:
            metadata[k] = v
    return save(tensors, metadata=metadata)


def save_shift(shift: SpectralShift, path: str, dtype: str = "float16", overwrite: bool = False) -> str:
    """Write ``shift`` to ``path`` atomically; an existing file is never replaced unless asked."""
    return atomic_write_bytes(path, shift_to_bytes(shift, dtype), overwrite=overwrite)


def predicted_file_size(shift: SpectralShift, dtype: str = "float16") -> int:
    """Exact size of the file :func:`save_shift` writes."""
    return len(shift_to_bytes(shift, dtype))


def match_report(shift: SpectralShift, model_shapes: dict, what: str = "model") -> dict:
    """How a shift's keys meet a model's weights: matched, missing and mismatched keys."""
    matched, missing, mismatched = [], [], []
    for k, s in shift.shapes.items():
        if k not in model_shapes:
            missing.append(k)
        elif tuple(model_shapes[k]) != tuple(s):
            mismatched.append((k, tuple(s), tuple(model_shapes[k])))
        else:
            matched.append(k)
    return {"matched": matched, "missing": missing, "mismatched": mismatched, "total": len(shift.shapes)}


def check_compatible(shift: SpectralShift, model_shapes: dict, source: str, min_fraction: float = 0.5) -> list:
    """Refuse a shift that clearly belongs to another architecture; return the matched keys.

    Any shape mismatch is refused (naming the first key); keys absent from the model are
    tolerated only when most keys match (e.g. a text-encoder part for a missing CLIP is
    handled by the caller, which passes only the part it patches).
    """
    rep = match_report(shift, model_shapes)
    if rep["mismatched"]:
        k, s, ms = rep["mismatched"][0]
        raise ShiftFileError(
            source,
            f"{len(rep['mismatched'])} of {rep['total']} weights have other shapes than the model's; first: {k!r} is {list(s)} in the shift, {list(ms)} in the model (another architecture?)",
        )
    n = len(rep["matched"])
    if rep["total"] and n < min_fraction * rep["total"]:
        first = rep["missing"][0] if rep["missing"] else "?"
        raise ShiftFileError(
            source,
            f"only {n} of {rep['total']} keys match the model's weights (first missing: {first!r}); it was made for another architecture",
        )
    return rep["matched"]
