"""The bundled workflows against the real node definitions, and the UI->API converter.

Every ``example_workflows/*.json`` must be valid (node types exist, link types match, widget values
allowed) and, converted to the API format with the model files swapped for tiny stand-ins (the
demo model for SD1.5, ``svdiff_testkit.families`` for SDXL and Flux), pass ComfyUI's own
``execution.validate_prompt``.  The SDXL and Flux workflows also run as a user runs them
(shrunk to a few steps at 64 px): queued once, the training row trains and saves while the
sampling row reports the missing shift file; queued again, the sampling row loads the saved
file and samples while training comes from the cache.
"""

from __future__ import annotations

import asyncio
import copy
import glob
import importlib.util
import json
import os

import pytest
from svdiff_testkit import comfy_env, demo_model
from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import REPO

WF_DIR = os.path.join(REPO, "example_workflows")
WORKFLOWS = W.workflow_files(WF_DIR) if os.path.isdir(WF_DIR) else []
TEST_SHIFT = "svdiff_test_demo_shift.safetensors"  # stands in for every shift file


def _generator():
    spec = importlib.util.spec_from_file_location("make_workflows", os.path.join(REPO, "tools", "make_workflows.py"))
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    return mw


MW = _generator()
#: the model files each family's workflow names, as downloaded (README, Bundled workflows)
STOCK_FILES = {"SD1.5": {"ckpt_name": demo_model.WORKFLOW_CKPT}, "SDXL": {"ckpt_name": MW.SDXL_CKPT},
               "Flux": dict(MW.FLUX_FILES)}
FAMILY_WORKFLOWS = {"08_sdxl_single_subject.json": "SDXL", "09_flux_single_subject.json": "Flux"}


def family_of(path) -> str:
    return FAMILY_WORKFLOWS.get(os.path.basename(path), "SD1.5")


def tiny_files(family: str, demo) -> dict:
    """The stand-ins of a family's model files, by loader widget (written into the test's model folders)."""
    from svdiff_testkit import families

    if family == "SD1.5":
        return {"ckpt_name": demo["checkpoint_name"]}
    f = families.install(family)
    if "ckpt_name" in f:
        return {"ckpt_name": f["ckpt_name"]}
    assert f["clip_type"] == "flux" and len(f["clip_names"]) == 2
    return {"unet_name": f["unet_name"], "clip_name1": f["clip_names"][0], "clip_name2": f["clip_names"][1],
            "vae_name": f["vae_name"]}


@pytest.fixture(scope="module")
def demo(comfy):
    """The demo model registered, its checkpoint in models/checkpoints, assets in input/,
    and a spectral-shift file for it in models/svdiff."""
    import folder_paths

    info = demo_model.install()
    path = os.path.join(folder_paths.models_dir, "svdiff", TEST_SHIFT)
    if not os.path.exists(path):
        demo_model.write_random_shift(info["checkpoint"], path, seed=3, scale=0.01)
    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
    return info


@pytest.fixture(scope="module")
def defs(demo):
    return W.object_info()


def replacements(demo, path=None):
    return {**tiny_files(family_of(path) if path else "SD1.5", demo), "shift_name": TEST_SHIFT}


def test_there_are_workflows():
    assert WORKFLOWS, "example_workflows/ holds no .json"
    for p in WORKFLOWS:
        assert os.path.basename(p)[:2].isdigit(), p


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_valid_and_has_note(path, defs, demo):
    wf = W.load(path)
    assert wf.get("version") == 0.4
    texts = W.notes(wf)
    assert texts and all(len(t) > 80 for t in texts), "each workflow explains itself in a Note"
    rep = replacements(demo, path)  # writes the tiny files, then the definitions list them
    problems = W.validate_workflow(wf, W.object_info(), replace=rep)
    assert problems == []
    named = {widget: name for widget, _, name in W.model_files(wf)}
    assert named == STOCK_FILES[family_of(path)], "the loaders name the family's ordinary files"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_converted_prompt_passes_comfy_validate_prompt(path, defs, demo):
    import execution

    prompt = W.to_prompt(path, defs, replace=replacements(demo, path))
    assert prompt
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("wf", prompt, None))[:4]
    assert ok, (err, node_errors)
    assert node_errors == {}, node_errors
    assert outputs, "the workflow has an output node"
    # without the swap the real model files are (rightly) reported missing
    widgets = [w for w, _, _ in W.model_files(path)]
    if widgets:
        raw = W.to_prompt(path, defs, replace={"shift_name": TEST_SHIFT})
        ok2, err2, outs2, errs2 = asyncio.run(execution.validate_prompt("wf2", raw, None))[:4]
        # every output fed by a loader is refused (an output that does not need one,
        # e.g. the Cut-Mix preview, may still validate, and then ok2 is True)
        assert all(w in json.dumps(errs2) for w in widgets), (widgets, errs2)
        assert len(outs2) < len(outputs), (outs2, outputs)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_committed_workflow_matches_generator(path, defs):
    """example_workflows/*.json are written by tools/make_workflows.py: the committed file is current."""
    gens = {name: fn for name, _, fn in MW.WORKFLOWS}
    name = os.path.basename(path)
    made_with = W.load(path).get("extra", {}).get("svdiff", {}).get("generated_with_comfyui")
    running = comfy_env.comfy_version()
    if made_with != running:
        pytest.skip(f"{name} was generated against ComfyUI {made_with} (its core node definitions lay out the widgets); "
                    f"this run is ComfyUI {running}, where the other tests load, validate, convert and run it instead")
    assert name in gens, f"{name} is not produced by tools/make_workflows.py"
    assert json.loads(json.dumps(gens[name](defs))) == W.load(path)


# ----------------------------------------------------------------------------- converter


def _ksampler_graph(defs):
    b = W.WorkflowBuilder(defs)
    b.note("a note that the converter must skip")
    ck = b.node("CheckpointLoaderSimple", ckpt_name="x.safetensors")
    pos = b.node("CLIPTextEncode", text="a photo")
    neg = b.node("CLIPTextEncode", text="")
    lat = b.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = b.node("KSampler", seed=123, steps=3, cfg=2.5, sampler_name="euler", scheduler="normal", denoise=1.0,
                seed__control="randomize")
    b.link(ck, 1, pos, "clip")
    b.link(ck, 1, neg, "clip")
    b.link(ck, 0, ks, "model")
    b.link(pos, 0, ks, "positive")
    b.link(neg, 0, ks, "negative")
    b.link(lat, 0, ks, "latent_image")
    return b, ks


def test_seed_widget_carries_control_value(defs):
    b, ks = _ksampler_graph(defs)
    wf = b.build()
    node = next(n for n in wf["nodes"] if n["id"] == ks["id"])
    assert node["widgets_values"] == [123, "randomize", 3, 2.5, "euler", "normal", 1.0]
    prompt = W.to_prompt(wf, defs)
    inp = prompt[str(ks["id"])]["inputs"]
    assert {k: v for k, v in inp.items() if not isinstance(v, list)} == {
        "seed": 123, "steps": 3, "cfg": 2.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    assert inp["model"] == ["2", 0] and inp["latent_image"] == [str(ks["id"] - 1), 0]
    assert all(e["class_type"] != "Note" for e in prompt.values()) and len(prompt) == 5


def test_reroute_primitive_and_muted_nodes(defs, demo):
    b, ks = _ksampler_graph(defs)
    wf = b.build()
    ks_node = next(n for n in wf["nodes"] if n["id"] == ks["id"])
    # put a Reroute on the model link: CheckpointLoader -> Reroute -> KSampler.model
    model_link = next(l for l in wf["links"] if l[3] == ks["id"] and l[4] == 0)
    rid, pid = 100, 101
    wf["nodes"].append({"id": rid, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 900}],
                        "outputs": [{"name": "", "type": "MODEL", "links": [model_link[0]]}], "mode": 0})
    wf["links"].append([900, model_link[1], model_link[2], rid, 0, "MODEL"])
    model_link[1], model_link[2] = rid, 0
    # a PrimitiveNode drives the steps widget
    ks_node["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 901})
    wf["nodes"].append({"id": pid, "type": "PrimitiveNode", "inputs": [], "mode": 0, "widgets_values": [17, "fixed"],
                        "outputs": [{"name": "INT", "type": "INT", "links": [901], "widget": {"name": "steps"}}]})
    wf["links"].append([901, pid, 0, ks["id"], len(ks_node["inputs"]) - 1, "INT"])
    prompt = W.to_prompt(wf, defs)
    assert prompt[str(ks["id"])]["inputs"]["model"] == ["2", 0]
    assert prompt[str(ks["id"])]["inputs"]["steps"] == 17
    assert str(rid) not in prompt and str(pid) not in prompt
    probs = W.validate_workflow(wf, defs, replace={"ckpt_name": demo["checkpoint_name"]})
    assert probs == [], probs
    # muting the latent node drops it and the link to it, as the editor does
    lat = next(n for n in wf["nodes"] if n["type"] == "EmptyLatentImage")
    lat["mode"] = 2
    prompt = W.to_prompt(wf, defs)
    assert str(lat["id"]) not in prompt and "latent_image" not in prompt[str(ks["id"])]["inputs"]


def test_validator_finds_each_kind_of_problem(defs, demo):
    b, ks = _ksampler_graph(defs)
    good = b.build()
    rep = {"ckpt_name": demo["checkpoint_name"]}
    assert W.validate_workflow(good, defs, replace=rep) == []

    bad = copy.deepcopy(good)
    bad["nodes"].append({"id": 50, "type": "NoSuchNode", "inputs": [], "outputs": [], "mode": 0})
    assert any("NoSuchNode" in p and "does not exist" in p for p in W.validate_workflow(bad, defs, replace=rep))

    bad = copy.deepcopy(good)
    n = next(n for n in bad["nodes"] if n["id"] == ks["id"])
    n["widgets_values"][4] = "no-such-sampler"
    n["widgets_values"][2] = 0  # steps below min 1
    probs = W.validate_workflow(bad, defs, replace=rep)
    assert any("sampler_name" in p and "no-such-sampler" in p for p in probs)
    assert any("steps" in p and "minimum" in p for p in probs)

    bad = copy.deepcopy(good)
    n = next(n for n in bad["nodes"] if n["id"] == ks["id"])
    n["widgets_values"][1] = "sometimes"
    assert any("control value" in p for p in W.validate_workflow(bad, defs, replace=rep))

    bad = copy.deepcopy(good)  # feed CLIP into KSampler.model
    link = next(l for l in bad["links"] if l[3] == ks["id"] and l[4] == 0)
    link[2], link[5] = 1, "CLIP"
    probs = W.validate_workflow(bad, defs, replace=rep)
    assert any("model" in p and "CLIP" in p for p in probs)

    bad = copy.deepcopy(good)  # disconnect a required socket
    n = next(n for n in bad["nodes"] if n["id"] == ks["id"])
    n["inputs"][1]["link"] = None
    assert any("required input positive" in p for p in W.validate_workflow(bad, defs, replace=rep))


def test_converted_graph_runs_in_comfy_executor(defs, demo):
    """A converted tiny graph runs through ComfyUI's real executor on the demo checkpoint."""
    from svdiff_testkit.comfy_env import run_prompt

    b, ks = _ksampler_graph(defs)
    dec = b.node("VAEDecode")
    b.link(ks, 0, dec, "samples")
    b.link(b.nodes[1], 2, dec, "vae")
    save = b.node("SaveImage", filename_prefix="wf_test/run")
    b.link(dec, 0, save, "images")
    prompt = W.to_prompt(b.build(), defs, replace={"ckpt_name": demo["checkpoint_name"]})
    prompt = W.patch_inputs(prompt, "EmptyLatentImage", width=64, height=64)
    ex, outputs = run_prompt(prompt, "wf-run")
    assert ex.success
    imgs = outputs[str(save["id"])]["images"]
    import folder_paths

    assert os.path.isfile(os.path.join(folder_paths.get_output_directory(), imgs[0]["subfolder"], imgs[0]["filename"]))


# ----------------------------------------------------------------------------- SDXL and Flux


def _shrunk_family_prompt(path, defs, files: dict) -> dict:
    """The workflow as the editor queues it, on the family's tiny files, with few steps at 64 px;
    the shift file name stays the workflow's own (the one its training row saves)."""
    prompt = W.fill_defaults(W.to_prompt(path, defs, replace=files), defs)
    prompt = demo_model.shrink_prompt(prompt, caps={"steps": 2, "num_prior_images": 1, "prior_steps": 2}, size=64,
                                      class_caps={"SVDiffTrain": {"steps": 3}})
    return W.patch_inputs(prompt, "EmptySD3LatentImage", width=64, height=64)


def _errors_by_class(prompt: dict, node_errors: dict) -> dict:
    return {prompt[nid]["class_type"]: [e["extra_info"].get("input_name") for e in v["errors"]]
            for nid, v in node_errors.items()}


@pytest.mark.parametrize("name", sorted(FAMILY_WORKFLOWS))
def test_family_workflow_trains_saves_then_loads_and_samples(name, demo):
    """Queue 1: the training row trains (both CLIPs on SDXL; CLIP-L but not T5 on Flux; the DiT
    subset on Flux) and saves the shift under the name the sampling row loads, which is reported
    missing meanwhile.  Queue 2 (same executor, as in a running ComfyUI): the whole graph validates,
    the training comes from the cache, the sampling row loads that file and writes its image."""
    import execution
    import folder_paths
    from svdiff.shiftfile import load_shift
    from svdiff_testkit.comfy_env import new_executor, run_prompt

    path = os.path.join(WF_DIR, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} is not in this checkout")
    family = FAMILY_WORKFLOWS[name]
    files = tiny_files(family, demo)
    defs = W.object_info()
    prompt = _shrunk_family_prompt(path, defs, files)
    train = next(k for k, v in prompt.items() if v["class_type"] == "SVDiffTrain")
    load = next(k for k, v in prompt.items() if v["class_type"] == "SVDiffLoadShift")
    shift_name = prompt[load]["inputs"]["shift_name"]
    shift_dir = os.path.join(folder_paths.models_dir, "svdiff")
    for old in glob.glob(os.path.join(shift_dir, shift_name.split("_00001_")[0] + "_*")):
        os.remove(old)  # a rerun of the test: the saver numbers from 00001 again
    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)

    ok, err, outputs, errs = asyncio.run(execution.validate_prompt("fam1", prompt, None))[:4]
    assert ok, err
    assert _errors_by_class(prompt, errs) == {"SVDiffLoadShift": ["shift_name"]}, errs
    ex = new_executor()
    ex, out = run_prompt(prompt, "fam1", executor=ex)
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    saved = os.path.join(shift_dir, shift_name)
    assert os.path.isfile(saved), os.listdir(shift_dir)
    shift = load_shift(saved)
    encoders = {k.split(".", 1)[0] for k in shift.deltas if not k.startswith("diffusion_model.")}
    blocks = {k.split(".")[1] for k in shift.deltas if k.startswith("diffusion_model.")}
    if family == "SDXL":
        assert encoders == {"clip_l", "clip_g"}, encoders
        assert {"input_blocks", "middle_block", "output_blocks"} <= blocks, blocks
    else:
        assert encoders == {"clip_l"}, encoders  # T5 stays frozen (train_t5 off)
        assert blocks == {"double_blocks", "single_blocks"}, blocks  # DiT-Attn: attention of both block kinds
        assert shift.metadata["training"]["subset"] == "DiT-Attn" and shift.metadata["training"]["rank"] == 64

    getattr(folder_paths, "filename_list_cache", {}).pop("svdiff", None)
    ok, err, outputs2, errs = asyncio.run(execution.validate_prompt("fam2", prompt, None))[:4]
    assert ok and errs == {}, (err, errs)
    assert len(outputs2) > len(outputs)
    ex, out = run_prompt(prompt, "fam2", executor=ex)
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    cached = next((d["nodes"] for ev, d in ex.status_messages if ev == "execution_cached"), [])
    assert train in cached, "queued again, the training row was not taken from the cache"
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    img = out[save]["images"][0]
    assert os.path.isfile(os.path.join(folder_paths.get_output_directory(), img["subfolder"], img["filename"]))
