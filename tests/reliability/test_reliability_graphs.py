"""Whole graphs in one ComfyUI process: the checkpoint's MODEL and CLIP stay bit-identical
after every bundled workflow ran, and prompts using different shifts on the same cached
checkpoint never see each other's patches.

All prompts run through ONE ``execution.PromptExecutor`` (ComfyUI's classic output cache,
as the server uses), so the checkpoint loader's MODEL/CLIP objects are shared between
prompts exactly as in a running ComfyUI.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from svdiff_testkit import comfy_env, demo_model
from svdiff_testkit.probes import fingerprint_outputs
from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import REPO

# every bundled workflow whose model comes from a checkpoint loader runs here on the demo
# checkpoint (SD1.5's and SDXL's graphs); 09 (Flux: UNETLoader, DualCLIPLoader, VAELoader) runs on
# the tiny Flux in tests/e2e/test_workflows.py, and tests/e2e/test_families.py checks that the
# Flux base model stays bit-identical
WORKFLOWS = [p for p in W.workflow_files(os.path.join(REPO, "example_workflows"))
             if {w for w, _, _ in W.model_files(p)} == {"ckpt_name"}]
CKPT_NODE = "2"  # the checkpoint loader's id in every bundled workflow and in the prompts below
SHIFTS = ("reliability_A.safetensors", "reliability_B.safetensors")


@pytest.fixture(scope="module")
def env(comfy):
    import comfy.sd
    import folder_paths
    from svdiff.shift import SpectralShift, delta_length
    from svdiff import shiftfile
    from svdiff_testkit.comfy_env import pack_module

    info = demo_model.install()
    # shift files shaped for the demo checkpoint itself (tiny model or toy world)
    mp, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(info["checkpoint"], output_vae=False, output_clipvision=False)
    adapter = pack_module("nodes.adapter")
    shapes = adapter.shiftable_shapes(mp, "diffusion_model.")
    cshapes = {k: v for k, v in adapter.shiftable_shapes(clip.patcher).items() if k.endswith("proj.weight")}
    d = os.path.join(folder_paths.models_dir, "svdiff")
    os.makedirs(d, exist_ok=True)
    for i, name in enumerate(SHIFTS):
        g = torch.Generator().manual_seed(100 + i)
        allshapes = {**shapes, **cshapes}
        deltas = {k: torch.randn(delta_length(s), generator=g) * 0.3 for k, s in allshapes.items()}
        shiftfile.save_shift(SpectralShift(deltas, allshapes, {"architecture": adapter.architecture_of(mp)}), os.path.join(d, name), overwrite=True)
    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
    ex = comfy_env.new_executor()
    return {"info": info, "ckpt": info["checkpoint_name"], "executor": ex, "defs": W.object_info(), "counter": [0]}


def run(env, prompt):
    from svdiff_testkit.comfy_env import run_prompt

    env["counter"][0] += 1
    ex, outputs = run_prompt(prompt, prompt_id=f"rel{env['counter'][0]}", executor=env["executor"])
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    cached = next((d["nodes"] for ev, d in ex.status_messages if ev == "execution_cached"), [])
    return outputs, cached


def checkpoint_objects(env):
    return comfy_env.cached_checkpoint(env["executor"], CKPT_NODE)


def base_prompt(ckpt):
    return {CKPT_NODE: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}


def sampling_branch(prompt, model_ref, clip_ref, tag, seed=7):
    """CLIPTextEncode x2 -> KSampler (2 steps, 8x8 latent) -> SaveLatent (exact tensors)."""
    n = len(prompt) + 10
    ids = [str(n + i) for i in range(5)]
    prompt[ids[0]] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": "a photo of a sks robot"}}
    prompt[ids[1]] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": ""}}
    prompt[ids[2]] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt[ids[3]] = {"class_type": "KSampler", "inputs": {"model": model_ref, "positive": [ids[0], 0], "negative": [ids[1], 0],
                                                         "latent_image": [ids[2], 0], "seed": seed, "steps": 2, "cfg": 3.0,
                                                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt[ids[4]] = {"class_type": "SaveLatent", "inputs": {"samples": [ids[3], 0], "filename_prefix": f"reliability/{tag}"}}
    return ids[4]


def read_latent(outputs, node):
    import folder_paths
    from safetensors.torch import load_file

    loc = outputs[node]["latents"][0]
    return load_file(os.path.join(folder_paths.get_output_directory(), loc["subfolder"], loc["filename"]))["latent_tensor"]


def with_shift(env, shift_name, tag, seed=7):
    p = base_prompt(env["ckpt"])
    p["3"] = {"class_type": "SVDiffLoadShift", "inputs": {"model": [CKPT_NODE, 0], "clip": [CKPT_NODE, 1], "shift_name": shift_name,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    out = sampling_branch(p, ["3", 0], ["3", 1], tag, seed)
    return p, out


def shrink(prompt):
    """The bundled workflows, made small enough for a CPU test (same graph, fewer steps/pixels):
    every unlinked steps/size input of every node is overridden."""
    small = {"steps": 2, "prior_steps": 2, "num_prior_images": 1, "resolution": 64, "width": 64, "height": 64}
    for entry in prompt.values():
        for k, v in small.items():
            if k in entry["inputs"] and not isinstance(entry["inputs"][k], list):
                entry["inputs"][k] = v
    return prompt


# --------------------------------------------------------------------------------------
def test_bundled_workflows_leave_the_checkpoint_bit_identical(env):
    """Run every bundled workflow; after each, the cached checkpoint MODEL/CLIP (the very
    objects the next prompt's nodes receive) give bit-identical outputs."""
    assert WORKFLOWS
    ref_prompt = base_prompt(env["ckpt"])
    sampling_branch(ref_prompt, [CKPT_NODE, 0], [CKPT_NODE, 1], "base")
    run(env, ref_prompt)
    model0, clip0 = checkpoint_objects(env)
    ref = fingerprint_outputs(model0, clip0)
    ran, seconds = [], {}
    for path in WORKFLOWS:
        prompt = shrink(W.fill_defaults(W.to_prompt(path, env["defs"], replace={"ckpt_name": env["ckpt"], "shift_name": SHIFTS[0]}),
                                         env["defs"]))
        assert prompt[CKPT_NODE]["class_type"] == "CheckpointLoaderSimple", path
        pack_nodes = sorted({e["class_type"] for e in prompt.values() if e["class_type"].startswith("SVDiff")})
        t0 = time.perf_counter()
        _, cached = run(env, prompt)
        seconds[os.path.basename(path)] = round(time.perf_counter() - t0, 2)
        assert CKPT_NODE in cached, f"{os.path.basename(path)}: the checkpoint was not shared from the cache"
        model, clip = checkpoint_objects(env)
        assert model is model0 and clip is clip0
        assert not model.patches and not clip.patcher.patches, os.path.basename(path)
        got = fingerprint_outputs(model, clip)
        for a, b, what in zip(ref, got, ("UNet output", "CLIP cond", "CLIP pooled")):
            assert torch.equal(a, b), f"{os.path.basename(path)} changed the checkpoint's {what}"
        ran.append((os.path.basename(path), pack_nodes))
    print("workflow seconds:", seconds)
    assert {n for _, ns in ran for n in ns} >= {"SVDiffLoadShift", "SVDiffApplyShift", "SVDiffCombineShifts", "SVDiffTrain",
                                               "SVDiffSaveShift", "SVDiffInspectShift"}, ran


def test_pack_nodes_outside_workflows_leave_the_checkpoint_bit_identical(env):
    """Nodes no bundled workflow uses yet (LoRA export/import, inversion, guidance): same check."""
    import folder_paths

    p = base_prompt(env["ckpt"])
    sampling_branch(p, [CKPT_NODE, 0], [CKPT_NODE, 1], "ref2")
    run(env, p)
    model0, clip0 = checkpoint_objects(env)
    ref = fingerprint_outputs(model0, clip0)
    p = base_prompt(env["ckpt"])
    p["3"] = {"class_type": "SVDiffLoadShift", "inputs": {"model": [CKPT_NODE, 0], "clip": [CKPT_NODE, 1], "shift_name": SHIFTS[1],
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    p["4"] = {"class_type": "SVDiffToLoRA", "inputs": {"shift": ["3", 2], "model": [CKPT_NODE, 0], "clip": [CKPT_NODE, 1], "rank": 0,
                                                       "filename_prefix": "reliability/lora", "folder": "output/loras"}}
    # the Eq. 9 guider on the shifted model, through SamplerCustomAdvanced
    p["5"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "a photo of a sks robot"}}
    p["6"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "a photo of a robot"}}
    p["7"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": ""}}
    p["8"] = {"class_type": "SVDiffNegativeGuider", "inputs": {"model": ["3", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                               "empty": ["7", 0], "cfg": 3.0, "beta": 0.5}}
    p["9"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    p["10"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["11"] = {"class_type": "BasicScheduler", "inputs": {"model": ["3", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}}
    p["12"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["13"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["8", 0], "sampler": ["10", 0],
                                                                 "sigmas": ["11", 0], "latent_image": ["12", 0]}}
    p["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "reliability/guided"}}
    _, cached = run(env, p)
    assert CKPT_NODE in cached
    model, clip = checkpoint_objects(env)
    assert model is model0 and clip is clip0
    for a, b in zip(ref, fingerprint_outputs(model, clip)):
        assert torch.equal(a, b)
    assert os.listdir(os.path.join(folder_paths.get_output_directory(), "loras", "reliability"))


def test_two_prompts_with_different_shifts_never_see_each_others_patches(env):
    """A, B, A, B through one executor on one cached checkpoint: each result equals a
    fresh executor's, A != B, and a single prompt with both branches agrees too."""
    from svdiff_testkit.comfy_env import run_prompt

    results = {}
    order = ["A", "B", "A", "B"]
    for i, tag in enumerate(order):
        name = SHIFTS[0] if tag == "A" else SHIFTS[1]
        p, out = with_shift(env, name, f"{tag}{i}")
        outputs, cached = run(env, p)
        if i:
            assert CKPT_NODE in cached  # the same MODEL/CLIP objects served both shifts
        if i >= 2:
            assert "3" not in cached  # the shift really was applied again, not replayed
        results.setdefault(tag, []).append(read_latent(outputs, out))
    assert torch.equal(results["A"][0], results["A"][1])
    assert torch.equal(results["B"][0], results["B"][1])
    assert not torch.allclose(results["A"][0], results["B"][0], atol=1e-3), "the shifts do not change the result"
    # a fresh process-like executor (nothing cached) agrees with the shared one
    for tag, name in (("A", SHIFTS[0]), ("B", SHIFTS[1])):
        p, out = with_shift(env, name, f"fresh{tag}")
        fresh = comfy_env.new_executor()
        ex, outputs = run_prompt(p, prompt_id=f"fresh{tag}", executor=fresh)
        assert ex.success
        assert torch.equal(read_latent(outputs, out), results[tag][0])
    # both shifts in ONE graph, sharing the checkpoint: each branch equals its own prompt
    p = base_prompt(env["ckpt"])
    for nid, name in (("3", SHIFTS[0]), ("4", SHIFTS[1])):
        p[nid] = {"class_type": "SVDiffLoadShift", "inputs": {"model": [CKPT_NODE, 0], "clip": [CKPT_NODE, 1], "shift_name": name,
                                                              "strength_model": 1.0, "strength_clip": 1.0}}
    out_a = sampling_branch(p, ["3", 0], ["3", 1], "bothA")
    out_b = sampling_branch(p, ["4", 0], ["4", 1], "bothB")
    outputs, _ = run(env, p)
    assert torch.equal(read_latent(outputs, out_a), results["A"][0])
    assert torch.equal(read_latent(outputs, out_b), results["B"][0])
    # and the checkpoint itself is still the unshifted model
    base = base_prompt(env["ckpt"])
    out0 = sampling_branch(base, [CKPT_NODE, 0], [CKPT_NODE, 1], "base_after")
    outputs, _ = run(env, base)
    fresh = comfy_env.new_executor()
    base2 = base_prompt(env["ckpt"])
    out1 = sampling_branch(base2, [CKPT_NODE, 0], [CKPT_NODE, 1], "base_fresh")
    ex, outputs2 = run_prompt(base2, prompt_id="base_fresh", executor=fresh)
    assert torch.equal(read_latent(outputs, out0), read_latent(outputs2, out1))
