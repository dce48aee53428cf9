"""Interrupts through ComfyUI's flag at random steps of SVDiff Train (decomposition, prior-
image generation, the training loop) and DDIM Invert, inside real prompts on one executor.

A progress hook (ComfyUI's global ProgressBar hook, which the server also uses) calls
``comfy.model_management.interrupt_current_processing()`` at a chosen update; the node's
next ``check_interrupt()`` (or ComfyUI between nodes) stops the prompt.  After every
interrupt: the executor reports ``execution_interrupted``; no partial file is in
models/svdiff (every shift there loads, no temporary file remains); the checkpoint's cached
MODEL/CLIP carry no patches and give bit-identical outputs; over 20 interrupted runs RSS
stays within a bound; and the next run in the same process works and reproduces the result
of an uninterrupted run exactly.
"""

from __future__ import annotations

import collections
import os
import random

import pytest
import torch

from svdiff_testkit import comfy_env, demo_model
from svdiff_testkit.probes import fingerprint_outputs
from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import REPO
from svdiff_testkit.memory import rss_mb

CKPT_NODE = "2"  # the checkpoint loader's id in the bundled workflows


def checkpoint_objects(env):
    return comfy_env.cached_checkpoint(env["executor"], CKPT_NODE)


REPS = 20
MAX_GROWTH_MB = 64.0
TRAIN_STEPS, PRIORS, PRIOR_STEPS = 5, 2, 3


ANY = "any phase"


def progress_is_throttled() -> bool:
    """ComfyUI 0.33's ProgressBar drops updates that come too soon after the last one."""
    import comfy.utils

    return hasattr(comfy.utils.ProgressBar(1), "_last_update_time")


class Interrupter:
    """A ComfyUI progress hook that raises the interrupt flag at the k-th update of a phase.

    ``at`` = (phase, k).  ComfyUI 0.33 throttles progress updates by time (only the first and
    the last update of a progress bar, and those with a preview, always reach the hook), so
    counting updates over the whole run does not say where a run is.  Each update is labelled
    with its phase (``phase_of``, "applying the trained shift" for decomposition after the
    training loop); the flag goes up at the k-th update of the chosen phase, or at the first
    update of a later phase when this run sent fewer updates for it.
    """

    def __init__(self):
        self.at = None
        self.order: list = []
        self.calls: list = []
        self.fired = False

    def reset(self, at=None, order=()):
        self.at, self.order, self.calls, self.fired = at, list(order), [], False

    def label(self, total) -> str:
        ph = phase_of(total)
        if ph == "decomposition" and "training loop" in self.calls:
            ph = "applying the trained shift"
        return ph

    def __call__(self, value, total, preview, node_id=None):
        ph = self.label(total)
        self.calls.append(ph)
        if self.at is None or self.fired:
            return
        target, k = self.at
        later = ph in self.order and target in self.order and self.order.index(ph) > self.order.index(target)
        count = len(self.calls) if target == ANY else self.calls.count(ph)
        if (target in (ph, ANY) and count >= k) or later:
            import comfy.model_management as mm

            self.fired = True
            mm.interrupt_current_processing(True)


@pytest.fixture(scope="module")
def env(comfy):
    import comfy.utils
    import folder_paths

    info = demo_model.install()
    defs = W.object_info()
    wf = W.fill_defaults(W.to_prompt(os.path.join(REPO, "example_workflows", "01_single_subject.json"), defs,
                                   replace={"ckpt_name": info["checkpoint_name"]}), defs)
    keep = {nid: e for nid, e in wf.items() if e["class_type"] in
            {"CheckpointLoaderSimple", "LoadImage", "ImageBatch", "SVDiffTrain", "SVDiffSaveShift"}}
    train = next(nid for nid, e in keep.items() if e["class_type"] == "SVDiffTrain")
    save = next(nid for nid, e in keep.items() if e["class_type"] == "SVDiffSaveShift")
    keep[train]["inputs"].update(steps=TRAIN_STEPS, num_prior_images=PRIORS, prior_steps=PRIOR_STEPS, resolution=64,
                                 save_every=2, filename_prefix="reliability_int/ckpt")
    keep[save]["inputs"]["filename_prefix"] = "reliability_int/final"
    ex = comfy_env.new_executor()
    hook = Interrupter()
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield {"prompt": keep, "train": train, "save": save, "executor": ex, "hook": hook, "ckpt": info["checkpoint_name"],
               "svdiff": os.path.join(folder_paths.models_dir, "svdiff"), "n": [0]}
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


def run(env, prompt, at=None, order=()):
    from svdiff_testkit.comfy_env import run_prompt

    env["n"][0] += 1
    env["hook"].reset(at, order)
    try:
        ex, outputs = run_prompt(prompt, prompt_id=f"int{env['n'][0]}", executor=env["executor"])
    finally:
        env["hook"].at = None
    events = [ev for ev, _ in ex.status_messages]
    return ex, outputs, events, list(env["hook"].calls)


def shift_files_state(folder):
    """(loadable shift files, leftover temporaries) under models/svdiff/reliability_int."""
    import svdiff.shiftfile as F

    d = os.path.join(folder, "reliability_int")
    if not os.path.isdir(d):
        return set(), []
    files, temps = set(), []
    for f in os.listdir(d):
        if f.startswith(".tmp-"):
            temps.append(f)
        elif f.endswith(".safetensors"):
            F.load_shift(os.path.join(d, f))  # raises on a partial file
            files.add(f)
    return files, temps


def final_shift(env):
    """The newest file the Save Spectral Shift node wrote."""
    import svdiff.shiftfile as F

    d = os.path.join(env["svdiff"], "reliability_int")
    finals = sorted((f for f in os.listdir(d) if f.startswith("final_")), key=lambda f: os.stat(os.path.join(d, f)).st_mtime_ns)
    return F.load_shift(os.path.join(d, finals[-1]))


def phase_of(total):
    if total == TRAIN_STEPS:
        return "training loop"
    if total == PRIORS * PRIOR_STEPS:
        return "prior images"
    return "decomposition"


def test_interrupting_svdiff_train_at_random_steps(env, capsys):
    prompt = env["prompt"]
    base_run = W.patch_inputs(prompt, "SVDiffTrain", seed=1000)
    ex, outputs, events, calls = run(env, base_run)
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    reference = final_shift(env)
    model0, clip0 = checkpoint_objects(env)
    ref = fingerprint_outputs(model0, clip0)
    phases = collections.Counter(calls)  # updates per phase in the uninterrupted run
    order = list(dict.fromkeys(calls))  # the phases in the order the run went through them
    assert set(phases) >= {"decomposition", "prior images", "training loop", "applying the trained shift"}, phases.keys()
    rng = random.Random(8)
    names = order
    ended = collections.Counter()
    rss = []
    for rep in range(REPS):
        phase = names[rep % len(names)]
        # the last phase: its first update (later ones may be throttled away, and nothing follows it)
        at = (phase, 1 if phase == names[-1] else rng.randint(1, phases[phase]))
        files_before, _ = shift_files_state(env["svdiff"])
        # a new seed each time: prior images are generated again (an interrupted set is never cached)
        p = W.patch_inputs(prompt, "SVDiffTrain", seed=2000 + rep)
        ex, outputs, events, calls = run(env, p, at=at, order=order)
        assert not ex.success and "execution_interrupted" in events, (phase, at, events)
        node = next(d["node_id"] for ev, d in ex.status_messages if ev == "execution_interrupted")
        ended[(phase, "SVDiff Train" if node == env["train"] else prompt[node]["class_type"])] += 1
        files_after, temps = shift_files_state(env["svdiff"])  # every file there loads
        assert not temps, temps
        new = files_after - files_before
        assert not [f for f in new if f.startswith("final_")], "the Save node ran after an interrupt"
        if phase in ("decomposition", "prior images"):
            assert not new, (phase, new)
        assert len(new) <= TRAIN_STEPS // 2 + 1  # only complete save_every checkpoints (steps 2, 4, 5)
        model, clip = checkpoint_objects(env)
        assert model is model0 and not model.patches and not clip.patcher.patches
        got = fingerprint_outputs(model, clip)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), f"rep {rep} ({phase} @ {at}) changed the base model"
        if rep in (1, REPS - 1):
            rss.append(rss_mb())
    # the next uninterrupted run works and reproduces the first run exactly
    ex, outputs, events, _ = run(env, W.patch_inputs(prompt, "SVDiffTrain", seed=1000, filename_prefix="reliability_int/again"))
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    again = final_shift(env)
    for k, v in reference.deltas.items():
        assert torch.equal(again.deltas[k], v), k
    growth = rss[-1] - rss[0]
    with capsys.disabled():
        print(f"\n[interrupts] {REPS} interrupted SVDiff Train runs: {dict(ended)}; RSS {rss[0]:.1f} -> {rss[-1]:.1f} MiB "
              f"({growth:+.1f} MiB over {REPS - 2} runs)")
    assert growth < MAX_GROWTH_MB


def test_interrupting_ddim_invert(env, comfy, capsys):
    if "SVDiffDDIMInvert" not in comfy["nodes"].NODE_CLASS_MAPPINGS:
        pytest.skip("DDIM Invert is not in this checkout yet")
    import folder_paths

    steps = 6
    p = {
        CKPT_NODE: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": env["ckpt"]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "robot_01.png"}},
        "4": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "bilinear", "width": 64, "height": 64,
                                                     "crop": "center"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": [CKPT_NODE, 2]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": [CKPT_NODE, 1], "text": "a photo of a robot"}},
        "7": {"class_type": "SVDiffDDIMInvert", "inputs": {"model": [CKPT_NODE, 0], "positive": ["6", 0], "latent": ["5", 0],
                                                           "steps": steps, "cfg": 1.0, "scheduler": "ddim_uniform", "start_at_step": 0,
                                                           "end_at_step": 10000, "refine_iterations": 0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "reliability_int/inverted"}},
    }
    ex, outputs, events, calls = run(env, p)
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    ref_lat = _latent(outputs, "8")
    model0, clip0 = checkpoint_objects(env)
    ref = fingerprint_outputs(model0, clip0)
    out_dir = os.path.join(folder_paths.get_output_directory(), "reliability_int")
    rng = random.Random(3)
    for rep in range(6):
        before = set(os.listdir(out_dir))
        q = W.patch_inputs(p, "SVDiffDDIMInvert", steps=steps + 1 + rep % 2)  # not cached: inverted again
        # throttled progress (0.33): only a bar's first and last update always arrive
        at = (ANY, rng.randint(1, min(2, len(calls)) if progress_is_throttled() else max(1, len(calls))))
        ex, _, events, _ = run(env, q, at=at)
        assert not ex.success and "execution_interrupted" in events, (at, events)
        assert set(os.listdir(out_dir)) == before, "an interrupted inversion left a file"
        model, clip = checkpoint_objects(env)
        assert not model.patches
        assert all(torch.equal(a, b) for a, b in zip(ref, fingerprint_outputs(model, clip)))
    ex, outputs, _, _ = run(env, W.patch_inputs(p, "SaveLatent", filename_prefix="reliability_int/inverted_again"))
    assert ex.success
    assert torch.equal(_latent(outputs, "8"), ref_lat)


def _latent(outputs, node):
    import folder_paths
    from safetensors.torch import load_file

    loc = outputs[node]["latents"][0]
    return load_file(os.path.join(folder_paths.get_output_directory(), loc["subfolder"], loc["filename"]))["latent_tensor"]
