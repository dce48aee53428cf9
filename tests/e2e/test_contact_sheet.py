"""The toy-world contact sheet of ``make demo`` runs end to end on the real nodes (a few steps of
everything: quality is not asserted here) and writes only its PNG, inside its out_dir."""

from __future__ import annotations

import os

import pytest

from svdiff_testkit.comfy_env import REPO
from toyworld import contact_sheet
from toyworld import model as toy

pytestmark = pytest.mark.skipif(not os.path.isfile(toy.WEIGHTS), reason="toy weights not built (make toyworld)")


def _files(root: str) -> dict:
    """Files under ComfyUI's base directory, except the pack's own SVD disk cache (user/svdiff_cache,
    nodes/adapter.py), which SVDiff Train fills in any graph."""
    out = {}
    cache = os.path.join(root, "user", "svdiff_cache")
    for dp, _, fs in os.walk(root):  # symlinked folders (the pack in custom_nodes) are not followed
        if dp == cache or dp.startswith(cache + os.sep):
            continue
        for f in fs:
            p = os.path.join(dp, f)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


SKIP_DIRS = {".git", ".venv", ".comfyui", "__pycache__", ".pytest_cache"}


def _repo_files() -> set:
    """Every file in the working tree but the environments, caches and git's own folder."""
    out = set()
    for dp, ds, fs in os.walk(REPO):
        ds[:] = [d for d in ds if d not in SKIP_DIRS and not d.startswith((".venv-", ".comfyui-"))]
        out.update(os.path.join(dp, f) for f in fs)
    return out


def test_quick_contact_sheet_writes_one_png_of_the_expected_size(comfy, tmp_path):
    from PIL import Image

    import folder_paths

    toy.register()
    toy.install_checkpoint(folder_paths.get_folder_paths("checkpoints")[0])  # before the snapshot: the loader's input
    getattr(folder_paths, "filename_list_cache", {}).pop("checkpoints", None)
    out_dir = tmp_path / "sheet"
    before_base, before_repo = _files(comfy["base"]), _repo_files()
    lines = []
    path = contact_sheet.make_contact_sheet(str(out_dir), quick=True, log=lines.append)
    assert os.path.dirname(path) == str(out_dir) and os.path.isfile(path)
    assert sorted(os.listdir(out_dir)) == [contact_sheet.SHEET_NAME]  # no temporary file left beside it
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == contact_sheet.sheet_size(*contact_sheet.sheet_layout(contact_sheet.quick_recipe()))
    assert _files(comfy["base"]) == before_base, "the sheet wrote into the ComfyUI base directory"
    assert not _repo_files() - before_repo, f"the sheet wrote into the repository: {sorted(_repo_files() - before_repo)}"
    # every row printed the classifier's reading
    text = "\n".join(lines)
    for row in ("1.", "2.", "3.", "4a.", "4b.", "5.", "6."):
        assert f"  {row} " in text, text
    assert "read as ring" in text
