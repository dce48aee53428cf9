"""Glue shared by the pack's nodes: the SPECTRAL_SHIFT type, folders, errors, progress."""

from __future__ import annotations

import logging
import os

import folder_paths
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from . import comfy_compat as compat

log = logging.getLogger("svdiff")

SHIFT_FOLDER = "svdiff"
CATEGORY = "SVDiff"

# The value type carried between the pack's nodes: an svdiff.shift.SpectralShift.
SpectralShiftType = io.Custom("SPECTRAL_SHIFT")

# A multi-subject training set (svdiff.cutmix.CutMixTrainingSet) from the Cut-Mix Builder,
# accepted by SVDiff Train instead of plain images.
TrainingSetType = io.Custom("SVDIFF_TRAINING_SET")


class SVDiffNodeError(ValueError):
    """An error shown in ComfyUI that names the node and what is wrong."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[{node}] {message}")


def register_shift_folder() -> None:
    """Register models/svdiff for .safetensors, keeping paths added by extra_model_paths.yaml."""
    compat.register_model_folder(SHIFT_FOLDER, os.path.join(folder_paths.models_dir, SHIFT_FOLDER), {".safetensors"})


def shift_files() -> list:
    register_shift_folder()
    return folder_paths.get_filename_list(SHIFT_FOLDER)


def shift_save_dir() -> str:
    register_shift_folder()
    d = folder_paths.get_folder_paths(SHIFT_FOLDER)[0]
    os.makedirs(d, exist_ok=True)
    return d


def resolve_file(node: str, field: str, folder: str, name, where: str) -> str:
    """The full path of ``name`` in ComfyUI's ``folder`` list (e.g. "svdiff", "loras").

    A missing file is an SVDiffNodeError naming the node, the field and ``where`` it was
    looked for; nothing else is caught.
    """
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except (FileNotFoundError, TypeError):
        raise SVDiffNodeError(node, f"{field}: file {name!r} not found in {where}") from None


def existing_entry(folder: str, name) -> str | None:
    """The path of whatever exists under ``name`` in ComfyUI's ``folder`` list (a file, but
    also a directory, FIFO or broken link), never opened; None when nothing is there."""
    rel = os.path.relpath(os.path.join("/", str(name)), "/")
    for base in folder_paths.get_folder_paths(folder):
        p = os.path.join(base, rel)
        if os.path.lexists(p):
            return p
    return None


def queued_file_check(node: str, field: str, folder: str, name, where: str, none: str | None = None):
    """A node's ``validate_inputs`` answer for a file input: True, or the error text naming
    the node and the field, when a prompt is queued.

    ComfyUI 0.3.75 does not check a V3 combo's value at queue time, 0.33 does; a file input
    named in ``validate_inputs`` gets this check on both (ComfyUI then skips only its own
    combo check of that input).  ``none`` (e.g. "[None]") and a linked value (absent at
    queue time) pass; so does something that exists but is not a file, which the node names
    when it runs.
    """
    if isinstance(name, list):  # a node with is_input_list gets its values as lists
        name = name[0] if name else None
    if name is None or (none is not None and name == none):
        return True
    if folder == SHIFT_FOLDER:
        register_shift_folder()
    if folder_paths.get_full_path(folder, str(name)) is not None or existing_entry(folder, name) is not None:
        return True
    return str(SVDiffNodeError(node, f"{field}: file {name!r} not found in {where}"))


def require_shift(node: str, value, field: str = "shift"):
    """``value`` if it is a SPECTRAL_SHIFT (an svdiff.shift.SpectralShift), else an error naming the field."""
    from ..svdiff.shift import SpectralShift

    if not isinstance(value, SpectralShift):
        raise SVDiffNodeError(node, f"{field}: expected a SPECTRAL_SHIFT, got {type(value).__name__}")
    return value


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress(total: int):
    return comfy.utils.ProgressBar(total)


def compute_device():
    return comfy.model_management.get_torch_device()


def next_free_path(folder: str, prefix: str, ext: str = ".safetensors") -> tuple[str, str]:
    """ComfyUI's numbered-filename convention: <prefix>_<counter:05>_<ext>, first free number.

    Raises UnsafePathError, before any folder is created, when the prefix's folder resolves
    outside ``folder`` (a symbolic link inside it may point anywhere).
    """
    from ..svdiff.fileio import UnsafePathError, is_within

    if not is_within(os.path.dirname(os.path.join(folder, prefix)), folder):
        raise UnsafePathError(f"filename_prefix {prefix!r} would write outside {folder} (through a symbolic link?)")
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    while True:
        name = f"{filename}_{counter:05}_{ext}"
        path = os.path.join(full_folder, name)
        if not os.path.lexists(path):
            return path, os.path.join(subfolder, name) if subfolder else name
        counter += 1


def save_numbered(node: str, data: bytes, folder: str, filename_prefix: str, ext: str = ".safetensors") -> str:
    """Write ``data`` as the next free numbered file under ``folder``: atomic, never overwriting.

    Every problem with the prefix (``..``, absolute paths, refused characters, a symbolic
    link or a file in the way) is an SVDiffNodeError naming the node and ``filename_prefix``.
    """
    from ..svdiff.fileio import UnsafePathError, atomic_write_bytes, is_within, sanitize_prefix

    try:
        prefix = sanitize_prefix(filename_prefix)
    except UnsafePathError as e:
        raise SVDiffNodeError(node, str(e)) from None
    for _ in range(100):
        try:
            path, _rel = next_free_path(folder, prefix, ext)
        except UnsafePathError as e:
            raise SVDiffNodeError(node, str(e)) from None
        except OSError as e:  # e.g. a file where a sub-folder should be
            raise SVDiffNodeError(node, f"filename_prefix {filename_prefix!r}: cannot create its folder ({e.strerror or e})") from None
        if not is_within(path, folder):
            raise SVDiffNodeError(node, f"filename_prefix {filename_prefix!r} would write outside {folder}")
        try:
            atomic_write_bytes(path, data, overwrite=False)
        except FileExistsError:
            continue  # another writer took the number; take the next one
        return path
    raise SVDiffNodeError(node, "filename_prefix: could not find a free file name")
