"""Bad inputs of SVDiff Train's newer routes, through ComfyUI's executor.

Captions, aspect buckets and schedules: each bad value ends the prompt with an execution
error whose message names the node and the field, nothing is written into models/svdiff
(``save_every`` is on, so a run that had started would have saved), and the checkpoint's
model gives the same output afterwards.
"""

from __future__ import annotations

import os

import pytest
import torch

from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import run_prompt
from svdiff_testkit.probes import unet_forward

CKPT = "tiny_reliability_inputs.safetensors"

# (what, SVDiff Train inputs, image batch (w, h, count), expected start of the message)
CASES = [
    ("caption count", {"captions": "photo of a sks dog"}, (64, 64, 2), "captions: 1 caption lines for 2 images"),
    ("empty caption", {"captions": "photo of a sks dog\n\n"}, (64, 64, 2), "captions:"),
    ("caption without the token", {"captions": "photo of a sks dog\nphoto of a dog"}, (64, 64, 2),
     "captions: line 2 ('photo of a dog') lacks the instance token 'sks'"),
    ("extreme aspect ratio", {}, (320, 64, 1), "images: image 1 is 320x64, more than 4:1"),
    ("image smaller than its bucket", {"resolution": 128}, (40, 40, 1), "images: image 1 is 40x40, less than half of its 128x128 bucket"),
    ("warmup beyond the run", {"warmup_steps": 5}, (64, 64, 2), "warmup_steps: 5 warmup steps leave no step"),
]


@pytest.fixture(scope="module")
def env(comfy):
    import nodes
    from svdiff_testkit import tiny

    name = tiny.install_checkpoint(CKPT, seed=0)
    with torch.inference_mode():
        model = nodes.CheckpointLoaderSimple().load_checkpoint(name)[0]
    return {"defs": W.object_info(), "before": unet_forward(model), "model": model}


def _prompt(defs, train: dict, image: tuple) -> dict:
    w, h, n = image
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "prompt": "photo of a sks dog",
              "class_prompt": "photo of a dog", "prior_weight": 0.0, "steps": 3, "resolution": 64, "subset": "UNet-CA",
              "save_every": 1, "filename_prefix": "reliability_inputs/run", "preview_every": 0, **train}
    return W.fill_defaults({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": n, "color": 0x446688}},
        "3": {"class_type": "SVDiffTrain", "inputs": inputs},
        "4": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["3", 2], "filename_prefix": "reliability_inputs/final"}},
    }, defs)


def _written() -> list:
    import folder_paths

    d = os.path.join(folder_paths.get_folder_paths("svdiff")[0], "reliability_inputs")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.parametrize("what, train, image, message", CASES, ids=[c[0] for c in CASES])
def test_bad_training_input_is_named_and_nothing_is_lost(env, what, train, image, message):
    before_files = _written()
    ex, _ = run_prompt(_prompt(env["defs"], train, image), prompt_id=f"bad-{what}")
    assert not ex.success
    errs = [d for ev, d in ex.status_messages if ev == "execution_error"]
    assert errs and errs[0]["node_id"] == "3", ex.status_messages
    assert errs[0]["exception_message"].startswith(f"[SVDiff Train] {message}"), errs[0]["exception_message"]
    assert _written() == before_files
    assert torch.equal(unet_forward(env["model"]), env["before"])


def test_the_same_graph_with_good_inputs_trains_and_saves(env):
    good = {"captions": "photo of a sks dog\nphoto of a sks dog, blue", "lr_schedule": "cosine", "warmup_steps": 1}
    ex, outputs = run_prompt(_prompt(env["defs"], good, (64, 96, 2)), prompt_id="good-inputs")
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    assert any(f.startswith("run_") for f in _written()) and any(f.startswith("final_") for f in _written())
