"""File inputs checked when a prompt is queued, on every supported ComfyUI.

ComfyUI 0.3.75 does not check a V3 combo's value in ``validate_prompt`` (0.33 does): without
the nodes' own ``validate_inputs`` a missing shift file would only fail once the prompt runs.
Load Spectral Shift's ``shift_name`` and SVDiff Train's ``resume_from`` are named in their
``validate_inputs``: a missing file is refused by ``execution.validate_prompt`` (what
``/prompt`` calls) with the node and the field named, an existing one passes, and naming only
the file input leaves ComfyUI's own range checks of the node's other inputs in place.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from svdiff_testkit import workflow as W

CKPT = "tiny_queue_checks.safetensors"
SHIFT = "queue_checks/present.safetensors"


@pytest.fixture(scope="module")
def env(comfy):
    from svdiff_testkit import demo_model

    demo_model.tiny_checkpoint_with_shift(CKPT, SHIFT, seed=4)
    return {"defs": W.object_info()}


def validate(prompt: dict, prompt_id: str = "queue-check") -> tuple[bool, dict]:
    """(valid, node_errors) as ComfyUI's /prompt sees them."""
    import execution

    result = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    return bool(result[0]), result[3]


def load_prompt(shift_name: str, strength_model: float = 1.0) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "SVDiffLoadShift", "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": shift_name,
                                                          "strength_model": strength_model, "strength_clip": 1.0}},
        "3": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["2", 2], "filename_prefix": "queue_checks/never", "dtype": "float16"}},
    }


def train_prompt(defs: dict, resume_from: str, **inputs) -> dict:
    return W.fill_defaults({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SVDiffTrain", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
                                                      "steps": 1, "resolution": 64, "resume_from": resume_from, **inputs}},
        "4": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["3", 2], "filename_prefix": "queue_checks/never"}},
    }, defs)


def errors_of(node_errors: dict, node_id: str) -> list:
    return (node_errors.get(node_id) or {}).get("errors", [])


def test_missing_shift_file_is_refused_at_queue_time_naming_node_and_field(env):
    ok, node_errors = validate(load_prompt("queue_checks/missing.safetensors"))
    assert not ok
    errs = errors_of(node_errors, "2")
    assert [e["type"] for e in errs] == ["custom_validation_failed"], node_errors
    assert errs[0]["extra_info"]["input_name"] == "shift_name"
    assert "[Load Spectral Shift] shift_name: file 'queue_checks/missing.safetensors' not found in models/svdiff" \
        in errs[0]["details"]
    assert node_errors["2"]["class_type"] == "SVDiffLoadShift"


def test_existing_shift_file_passes(env):
    ok, node_errors = validate(load_prompt(SHIFT))
    assert ok, node_errors


def test_out_of_range_strength_is_still_refused_at_queue_time(env):
    """validate_inputs names shift_name only: ComfyUI's own min/max check of strength_model stays."""
    ok, node_errors = validate(load_prompt(SHIFT, strength_model=1e9))
    assert not ok
    errs = errors_of(node_errors, "2")
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errs] == [("value_bigger_than_max", "strength_model")], errs
    ok, node_errors = validate(load_prompt("queue_checks/missing.safetensors", strength_model=-1e9))
    kinds = sorted((e["type"], e["extra_info"]["input_name"]) for e in errors_of(node_errors, "2"))
    assert not ok and kinds == [("custom_validation_failed", "shift_name"), ("value_smaller_than_min", "strength_model")], kinds


def test_missing_resume_from_is_refused_at_queue_time_naming_node_and_field(env):
    ok, node_errors = validate(train_prompt(env["defs"], "queue_checks/gone.safetensors"))
    assert not ok
    errs = errors_of(node_errors, "3")
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errs] == [("custom_validation_failed", "resume_from")], node_errors
    assert "[SVDiff Train] resume_from: file 'queue_checks/gone.safetensors' not found in models/svdiff" in errs[0]["details"]


def test_resume_from_none_or_an_existing_file_passes(env):
    for value in ("[None]", SHIFT):
        ok, node_errors = validate(train_prompt(env["defs"], value))
        assert ok, (value, json.dumps(node_errors)[:2000])


def test_train_still_gets_comfyuis_range_checks(env):
    ok, node_errors = validate(train_prompt(env["defs"], SHIFT, learning_rate=5.0, steps=10**9))
    kinds = sorted((e["type"], e["extra_info"]["input_name"]) for e in errors_of(node_errors, "3"))
    assert not ok and kinds == [("value_bigger_than_max", "learning_rate"), ("value_bigger_than_max", "steps")], kinds
