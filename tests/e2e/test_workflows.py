"""The bundled workflows against the real node definitions, and the UI->API converter.

Every ``example_workflows/*.json`` must be valid (node types exist, link types match, widget values
allowed) and, converted to the API format with the checkpoint swapped for the demo model,
pass ComfyUI's own ``execution.validate_prompt``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os

import pytest
from svdiff_testkit import comfy_env, demo_model
from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import REPO

WF_DIR = os.path.join(REPO, "example_workflows")
WORKFLOWS = W.workflow_files(WF_DIR) if os.path.isdir(WF_DIR) else []
TEST_SHIFT = "svdiff_test_demo_shift.safetensors"  # stands in for every shift file


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


def replacements(demo):
    return {"ckpt_name": demo["checkpoint_name"], "shift_name": TEST_SHIFT}


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
    problems = W.validate_workflow(wf, defs, replace=replacements(demo))
    assert problems == []
    ckpts = [n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    assert all(n["widgets_values"][0] == demo_model.WORKFLOW_CKPT for n in ckpts), "loaders name the ordinary SD1.5 file"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_converted_prompt_passes_comfy_validate_prompt(path, defs, demo):
    import execution

    prompt = W.to_prompt(path, defs, replace=replacements(demo))
    assert prompt
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("wf", prompt, None))[:4]
    assert ok, (err, node_errors)
    assert outputs, "the workflow has an output node"
    # without the swap the SD1.5 checkpoint is (rightly) reported missing
    if any(e["class_type"] == "CheckpointLoaderSimple" for e in prompt.values()):
        raw = W.to_prompt(path, defs, replace={"shift_name": TEST_SHIFT})
        ok2, err2, outs2, errs2 = asyncio.run(execution.validate_prompt("wf2", raw, None))[:4]
        # every output fed by the checkpoint is refused (an output that does not need it,
        # e.g. the Cut-Mix preview, may still validate, and then ok2 is True)
        assert "ckpt_name" in json.dumps(errs2)
        assert len(outs2) < len(outputs), (outs2, outputs)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_committed_workflow_matches_generator(path, defs):
    """example_workflows/*.json are written by tools/make_workflows.py: the committed file is current."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_workflows", os.path.join(REPO, "tools", "make_workflows.py"))
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    gens = {name: fn for name, _, fn in mw.WORKFLOWS}
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
