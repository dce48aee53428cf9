"""Load / Apply / Save Spectral Shift: shift files in, patched MODEL/CLIP out."""

from __future__ import annotations

import json
import os

import folder_paths
from comfy_api.latest import io, ui

from ..svdiff import shiftfile
from ..svdiff.shift import SpectralShift
from .adapter import UNET_PREFIX, patch_with_shift
from . import comfy_compat as compat
from . import interchange
from .common import (CATEGORY, SpectralShiftType, SVDiffNodeError, existing_entry, log, queued_file_check, register_shift_folder,
                     require_shift, resolve_file, save_numbered, shift_files, shift_save_dir)


def strength_inputs() -> list:
    """The strength_model / strength_clip inputs of Load and Apply Spectral Shift."""
    return [
        io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                       tooltip="Scale s of the shift inside the ReLU: ReLU(sigma + s*delta) (appendix E.3). "
                               "1 = as trained, 0 = off, negative reverses the concept."),
        io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                       tooltip="The same scale for the text encoder's shifts."),
    ]


def split_model_and_clip_keys(shift: SpectralShift):
    unet = [k for k in shift.deltas if k.startswith(UNET_PREFIX)]
    other = [k for k in shift.deltas if not k.startswith(UNET_PREFIX)]
    return unet, other


def apply_shift(node: str, model, clip, shift: SpectralShift, strength_model: float, strength_clip: float, source: str,
                notes: list | None = None, compose: bool = True):
    """Patch clones of MODEL and CLIP with the UNet and text-encoder parts of ``shift``.

    A MODEL/CLIP that already carries a spectral shift gets the two composed as Eq. 4 (see
    ``adapter.compose_with_carried_shifts``); what was composed or could not be goes to ``notes``.
    """
    require_shift(node, shift)
    unet_keys, clip_keys = split_model_and_clip_keys(shift)
    if not unet_keys and not clip_keys:
        raise SVDiffNodeError(node, f"{source} holds no weights")
    if unet_keys and model is None:
        raise SVDiffNodeError(node, f"{source} shifts the UNet but no MODEL is connected")
    if clip_keys and not unet_keys and clip is None:
        raise SVDiffNodeError(node, f"{source} shifts only the text encoder but no CLIP is connected")
    # Validate both parts before patching either: nothing is patched half way.
    new_model, new_clip = model, clip
    if unet_keys and model is not None:
        new_model, rep = patch_with_shift(model, shift, strength_model, node, source, prefix=UNET_PREFIX, compose=compose)
        if notes is not None:
            notes.extend(f"MODEL: {w}" for w in rep["warnings"])
    if clip_keys:
        if clip is None:
            from .common import log

            log.warning("[%s] %s also shifts the text encoder (%d weights) but no CLIP is connected", node, source, len(clip_keys))
        else:
            sub = SpectralShift({k: shift.deltas[k] for k in clip_keys}, {k: shift.shapes[k] for k in clip_keys}, shift.metadata)
            patched_patcher, rep = patch_with_shift(clip.patcher, sub, strength_clip, node, source, compose=compose)
            if notes is not None:
                notes.extend(f"CLIP: {w}" for w in rep["warnings"])
            new_clip = clip.clone()
            new_clip.patcher = patched_patcher
    return new_model, new_clip


def read_shift_file(node: str, path: str, model=None, clip=None) -> SpectralShift:
    """Read any shift file the pack knows, with errors that name the node and the file."""
    try:
        tensors, metadata, layout = shiftfile.load_raw(path)
        if layout == shiftfile.FORMAT_NAME:
            return shiftfile.shift_from_raw(path, tensors, metadata)
        return interchange.shift_from_foreign(path, tensors, metadata, layout, model=model, clip=clip)
    except shiftfile.ShiftFileError as e:
        raise SVDiffNodeError(node, str(e)) from None


def _existing_non_file(shift_name: str):
    """A directory, FIFO, device or broken link under that name in models/svdiff (never opened):
    its path, so that read_shift_file names what it is instead of "not found"."""
    register_shift_folder()
    return existing_entry("svdiff", shift_name)


class SVDiffLoadShift(io.ComfyNode):
    NODE_NAME = "Load Spectral Shift"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffLoadShift",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Load an SVDiff spectral-shift file and patch MODEL/CLIP with it (chains with LoRAs).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a patched clone is returned; the input is not changed)."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to patch when the file also shifts it (optional)."),
                io.Combo.Input("shift_name", options=shift_files(), tooltip="A spectral-shift .safetensors file from models/svdiff."),
                *strength_inputs(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), SpectralShiftType.Output(display_name="SPECTRAL_SHIFT")],
        )

    @classmethod
    def execute(cls, model, shift_name, strength_model, strength_clip, clip=None) -> io.NodeOutput:
        node = cls.NODE_NAME
        try:
            path = resolve_file(node, "shift_name", "svdiff", shift_name, "models/svdiff")
        except SVDiffNodeError:
            path = _existing_non_file(shift_name)  # a folder or broken link there: read_shift_file names it
            if path is None:
                raise
        shift = read_shift_file(node, path, model=model, clip=clip)
        notes: list = []
        m, c = apply_shift(node, model, clip, shift, strength_model, strength_clip, os.path.basename(path), notes)
        return io.NodeOutput(m, c, shift, ui=ui.PreviewText("\n".join(notes)) if notes else None)

    @classmethod
    def validate_inputs(cls, shift_name=None):
        """A missing file is refused when the prompt is queued (only shift_name is named here,
        so ComfyUI still checks the strengths' ranges itself)."""
        return queued_file_check(cls.NODE_NAME, "shift_name", "svdiff", shift_name, "models/svdiff")

    @classmethod
    def fingerprint_inputs(cls, shift_name, **kwargs):
        p = folder_paths.get_full_path("svdiff", str(shift_name))
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        return f"{p}:{st.st_mtime_ns}:{st.st_size}" if st else shift_name


class SVDiffApplyShift(io.ComfyNode):
    NODE_NAME = "Apply Spectral Shift"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffApplyShift",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Patch MODEL/CLIP with a SPECTRAL_SHIFT flowing in the graph (from training or arithmetic).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a patched clone is returned)."),
                SpectralShiftType.Input("shift", tooltip="The spectral shift to apply."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to patch when the shift also covers it (optional)."),
                *strength_inputs(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, shift, strength_model, strength_clip, clip=None) -> io.NodeOutput:
        notes: list = []
        m, c = apply_shift(cls.NODE_NAME, model, clip, shift, strength_model, strength_clip, "the connected shift", notes)
        return io.NodeOutput(m, c, ui=ui.PreviewText("\n".join(notes)) if notes else None)


def save_shift_numbered(node: str, shift: SpectralShift, filename_prefix: str, dtype: str = "float16",
                        extra_metadata: dict | None = None) -> str:
    """Save into models/svdiff under the next free number; atomic and never overwriting.
    ``extra_metadata``: more metadata strings (provenance), never replacing the format's own."""
    require_shift(node, shift)
    try:
        data = shiftfile.shift_to_bytes(shift, dtype, extra=extra_metadata)
    except ValueError as e:
        raise SVDiffNodeError(node, str(e)) from None
    path = save_numbered(node, data, shift_save_dir(), filename_prefix)
    register_shift_folder()
    return path


# Provenance in a saved file, as ComfyUI's checkpoint saver records it: the API prompt under
# "prompt" and every extra_pnginfo entry (the editor's "workflow") under its own key, as JSON.
# Bounded: a value over PROVENANCE_MAX_VALUE bytes, or one past PROVENANCE_MAX_TOTAL in all, is
# left out and named in "provenance_skipped" (the reader refuses headers over 64 MiB).
PROVENANCE_MAX_VALUE = 1 << 20
PROVENANCE_MAX_TOTAL = 4 << 20
PROVENANCE_SKIPPED = "provenance_skipped"


def _provenance_items(prompt, extra_pnginfo) -> list:
    items = [] if prompt is None else [("prompt", prompt)]
    if isinstance(extra_pnginfo, dict):
        items += [(str(k), v) for k, v in extra_pnginfo.items() if str(k) != "prompt"]
    return items


def provenance_metadata(prompt, extra_pnginfo) -> dict:
    """The metadata strings recording how a file was made (see PROVENANCE_MAX_VALUE).

    Never raises: a value that is not JSON, too large, or named like one of the format's own
    entries is skipped, and ``provenance_skipped`` lists it with the reason.
    """
    out, skipped, total = {}, [], 0
    reserved = shiftfile.CORE_METADATA_KEYS | {PROVENANCE_SKIPPED}
    for key, value in _provenance_items(prompt, extra_pnginfo):
        if key in reserved:
            skipped.append(f"{key}: the name of a shift-file entry")
            continue
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError, RecursionError) as e:
            skipped.append(f"{key}: not JSON ({type(e).__name__})")
            continue
        size = len(text.encode("utf-8"))
        if size > PROVENANCE_MAX_VALUE or total + size > PROVENANCE_MAX_TOTAL:
            limit = PROVENANCE_MAX_VALUE if size > PROVENANCE_MAX_VALUE else PROVENANCE_MAX_TOTAL
            skipped.append(f"{key}: {size} bytes, over the {limit >> 20} MB limit")
            continue
        out[key] = text
        total += size
    if skipped:
        out[PROVENANCE_SKIPPED] = json.dumps(skipped)
    return out


class SVDiffSaveShift(io.ComfyNode):
    NODE_NAME = "Save Spectral Shift"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffSaveShift",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Write a SPECTRAL_SHIFT to models/svdiff as a numbered .safetensors file (never overwrites).",
            is_output_node=True,
            inputs=[
                SpectralShiftType.Input("shift", tooltip="The spectral shift to save."),
                io.String.Input("filename_prefix", default="svdiff/shift",
                                tooltip="Name (optionally with sub-folders) inside models/svdiff; a number is appended."),
                io.Combo.Input("dtype", options=["float16", "float32"], default="float16",
                               tooltip="Storage precision: float16 halves the file; float32 keeps delta exactly."),
                io.String.Input("description", default="", multiline=True, optional=True,
                                tooltip="Free text stored in the file's metadata (what the subject is, trigger words, ...)."),
            ],
            outputs=[io.String.Output(display_name="path")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def provenance(cls) -> dict:
        """The prompt and workflow that ran this node, for the file's metadata (nothing with
        --disable-metadata; a problem here is logged, never fails the save)."""
        hidden = getattr(cls, "hidden", None)
        if hidden is None or compat.metadata_disabled():
            return {}
        try:
            return provenance_metadata(getattr(hidden, "prompt", None), getattr(hidden, "extra_pnginfo", None))
        except Exception as e:  # provenance is a courtesy: the shift is saved without it
            log.warning("[%s] the prompt and workflow were not recorded: %s", cls.NODE_NAME, e)
            return {PROVENANCE_SKIPPED: json.dumps([f"all: {type(e).__name__}"])}

    @classmethod
    def execute(cls, shift, filename_prefix, dtype, description="") -> io.NodeOutput:
        if description:
            shift = shift.copy()
            shift.metadata["description"] = description
        path = save_shift_numbered(cls.NODE_NAME, shift, filename_prefix, dtype, extra_metadata=cls.provenance())
        size = os.path.getsize(path)
        text = f"saved {os.path.basename(path)} ({size / 1024:.1f} KiB, {len(shift)} weights) in {os.path.dirname(path)}"
        return io.NodeOutput(path, ui=ui.PreviewText(text))


NODES = [SVDiffLoadShift, SVDiffApplyShift, SVDiffSaveShift]
