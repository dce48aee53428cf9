"""Save Spectral Shift records how a file was made, as ComfyUI's checkpoint saver does: the
API prompt under ``prompt`` and the editor's workflow (extra_pnginfo) under ``workflow``, as
JSON in the file's metadata; bounded in size, never failing the save."""

from __future__ import annotations

import json
import os

import pytest

from svdiff_testkit.comfy_env import run_prompt

CKPT = "tiny_provenance.safetensors"
SHIFT = "provenance/source.safetensors"


@pytest.fixture(scope="module")
def env(comfy):
    from svdiff_testkit import demo_model

    return {"shift_dir": demo_model.tiny_checkpoint_with_shift(CKPT, SHIFT, seed=3)}


def save_prompt(prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "SVDiffLoadShift", "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": SHIFT,
                                                          "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["2", 2], "filename_prefix": prefix, "dtype": "float16",
                                                          "description": "provenance test"}},
    }


def run_save(prefix: str, extra_data: dict | None = None):
    import folder_paths

    folder = os.path.join(folder_paths.models_dir, "svdiff", os.path.dirname(prefix))
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    ex, _ = run_prompt(save_prompt(prefix), prompt_id=prefix.replace("/", "-"), extra_data=extra_data)
    assert ex.success, ex.status_messages
    new = sorted(set(os.listdir(folder)) - before)
    assert len(new) == 1, new
    return os.path.join(folder, new[0])


def file_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def test_save_through_the_executor_records_prompt_and_workflow(env):
    from svdiff import shiftfile

    workflow = {"last_node_id": 3, "nodes": [{"id": 3, "type": "SVDiffSaveShift"}], "links": [], "version": 0.4}
    path = run_save("provenance/with_workflow", {"extra_pnginfo": {"workflow": workflow}})
    meta = file_metadata(path)
    stored = json.loads(meta["prompt"])  # the executor's prompt (it adds e.g. "is_changed" to entries)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in stored.items()} == \
        save_prompt("provenance/with_workflow")
    assert json.loads(meta["workflow"]) == workflow
    assert "provenance_skipped" not in meta
    assert meta["format"] == shiftfile.FORMAT_NAME and meta["description"] == "provenance test"
    shift = shiftfile.load_shift(path)  # the file still loads, as a shift of the same weights
    assert len(shift) > 0 and shift.metadata["description"] == "provenance test"


def test_a_prompt_without_workflow_stores_the_prompt_only(env):
    path = run_save("provenance/api_only")
    meta = file_metadata(path)
    assert json.loads(meta["prompt"])["3"]["class_type"] == "SVDiffSaveShift"
    assert "workflow" not in meta and "provenance_skipped" not in meta


def test_an_oversized_workflow_is_skipped_and_named_and_the_save_succeeds(env):
    from svdiff import shiftfile

    big = {"nodes": [], "extra": {"blob": "x" * (1 << 20)}}  # just over 1 MB as JSON
    path = run_save("provenance/too_big", {"extra_pnginfo": {"workflow": big, "format": "not-a-shift"}})
    meta = file_metadata(path)
    assert "workflow" not in meta and "prompt" in meta
    skipped = json.loads(meta["provenance_skipped"])
    assert any(s.startswith("workflow:") and "1 MB" in s for s in skipped), skipped
    assert any(s.startswith("format:") for s in skipped), skipped  # never replaces the format's own entries
    assert meta["format"] == shiftfile.FORMAT_NAME
    assert len(shiftfile.load_shift(path)) > 0


def test_provenance_metadata_is_bounded_and_never_raises(comfy):
    from svdiff_testkit.comfy_env import pack_module

    shifts = pack_module("nodes.shifts")

    class NotJSON:
        def __repr__(self):
            raise RuntimeError("no")

    circular: dict = {}
    circular["self"] = circular
    big = {k: k * (1000 << 10) for k in "bcdef"}  # each under 1 MB, five of them over 4 MB
    out = shifts.provenance_metadata({"1": {"class_type": "X"}}, {"a": circular, **big, "g": 1})
    skipped = json.loads(out["provenance_skipped"])
    assert any(s.startswith("a: not JSON") for s in skipped), skipped
    assert [s[:2] for s in skipped if "4 MB" in s] == ["f:"], skipped  # the total stays within 4 MB
    assert all(k in out for k in "bcde") and sum(len(v) for v in out.values()) < (4 << 20) + 4096
    assert out["g"] == "1" and json.loads(out["prompt"]) == {"1": {"class_type": "X"}}
    assert shifts.provenance_metadata(None, None) == {}
    assert shifts.provenance_metadata(None, "not a dict") == {}


def test_disable_metadata_stores_no_provenance(env, monkeypatch):
    from comfy.cli_args import args

    monkeypatch.setattr(args, "disable_metadata", True)
    path = run_save("provenance/disabled", {"extra_pnginfo": {"workflow": {"nodes": []}}})
    meta = file_metadata(path)
    assert "prompt" not in meta and "workflow" not in meta and "provenance_skipped" not in meta
