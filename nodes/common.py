"""Glue shared by the pack's nodes: the SPECTRAL_SHIFT type, folders, errors, progress."""

from __future__ import annotations

import logging
import os

import folder_paths
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

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
    default = os.path.join(folder_paths.models_dir, SHIFT_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(SHIFT_FOLDER, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[SHIFT_FOLDER] = (paths, {".safetensors"})
    # refresh the listing cache so new files show without a restart
    getattr(folder_paths, "filename_list_cache", {}).pop(SHIFT_FOLDER, None)


def shift_files() -> list:
    register_shift_folder()
    return folder_paths.get_filename_list(SHIFT_FOLDER)


def shift_save_dir() -> str:
    register_shift_folder()
    d = folder_paths.get_folder_paths(SHIFT_FOLDER)[0]
    os.makedirs(d, exist_ok=True)
    return d


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress(total: int):
    return comfy.utils.ProgressBar(total)


def compute_device():
    return comfy.model_management.get_torch_device()
