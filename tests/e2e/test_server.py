"""The pack in ComfyUI's real server (``main.py`` on a free loopback port, --cpu).

One server for the module: /object_info lists every pack node with inputs and tooltips,
/api/workflow_templates lists and serves the bundled workflows with their thumbnails,
/extensions/ComfyUI-SVDiff/docs/ serves every node's help page, and bundled workflows
POSTed to /prompt (converted, demo checkpoint, few steps, tiny latents) finish and write
their outputs.  The server is stopped with Ctrl-C and must exit by itself.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile

import pytest
from svdiff_testkit import demo_model
from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import REPO
from svdiff_testkit.server import ComfyServer

WF_DIR = os.path.join(REPO, "example_workflows")
PACK_MODULE = "custom_nodes.ComfyUI-SVDiff"


def pack_node_ids_from_source() -> set:
    """Node ids declared under nodes/ (independent of what the server reports)."""
    ids = set()
    for p in glob.glob(os.path.join(REPO, "nodes", "**", "*.py"), recursive=True):
        with open(p, encoding="utf-8") as f:
            ids |= set(re.findall(r'node_id\s*=\s*"([A-Za-z0-9_]+)"', f.read()))
    return ids


@pytest.fixture(scope="module")
def server(comfy):
    base = tempfile.mkdtemp(prefix="svdiff-server-")
    s = ComfyServer(base, start_timeout=240)
    s.start()
    try:
        # spectral shifts for the demo model (written by the demo nodes at start-up) where
        # workflows 02, 05-07 look for them
        ckpt = os.path.join(base, "models", "checkpoints", demo_model.demo_checkpoint_name())
        for seed, name in ((5, "my_subject_00001_.safetensors"), (6, "my_second_subject_00001_.safetensors")):
            demo_model.write_random_shift(ckpt, os.path.join(base, "models", "svdiff", name), seed)
        yield s
    finally:
        s.stop(timeout=30)


def test_server_loads_pack_and_demo_nodes_without_import_failure(server):
    bad = [line for line in server.log_text().splitlines()
           if ("IMPORT FAILED" in line or "Cannot import" in line or "Skip " in line)
           and ("ComfyUI-SVDiff" in line or demo_model.DEMO_NODES_LINK in line)]
    assert not bad, bad
    assert "[svdiff demo] demo model" in server.log_text() or os.path.isdir(os.path.join(server.base, "models"))
    assert os.path.isfile(os.path.join(server.base, "models", "checkpoints", demo_model.demo_checkpoint_name()))
    assert os.path.isfile(os.path.join(server.base, "input", "robot_01.png"))


def test_object_info_lists_every_pack_node_with_tooltips(server):
    info = server.get_json("/object_info")
    ours = {k for k, v in info.items() if str(v.get("python_module", "")).startswith(PACK_MODULE)}
    declared = pack_node_ids_from_source()
    assert declared and ours == declared, (sorted(ours), sorted(declared))
    for nid in ours:
        d = info[nid]
        assert d["category"].startswith("SVDiff"), nid
        assert d["display_name"] and d["description"], nid
        n_inputs = 0
        for section in ("required", "optional"):
            for name, spec in (d["input"].get(section) or {}).items():
                n_inputs += 1
                opts = spec[1] if len(spec) > 1 else {}
                assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{nid}.{name} has no tooltip"
        assert n_inputs > 0, nid
    # the demo checkpoint is listed for the loader, the demo nodes add no node
    assert demo_model.demo_checkpoint_name() in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert not any(str(v.get("python_module", "")).endswith(demo_model.DEMO_NODES_LINK) for v in info.values())


def test_workflow_templates_list_and_serve_the_bundled_workflows(server):
    """The editor's Templates browser lists GET /api/workflow_templates (pack folder -> names)
    and loads ``/api/workflow_templates/<pack>/<name>.json``, with ``<name>.jpg`` as the card's
    picture (both frontends: mediaSubtype "jpg" for a custom node's template)."""
    listing = server.get_json("/api/workflow_templates")
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in W.workflow_files(WF_DIR))
    assert len(names) == 9 and os.path.basename(WF_DIR) == "example_workflows"
    assert sorted(listing.get("ComfyUI-SVDiff", [])) == names, listing
    for name in names:
        served = server.get_json(f"/api/workflow_templates/ComfyUI-SVDiff/{name}.json")
        assert served == W.load(os.path.join(WF_DIR, name + ".json"))
        status, ctype, body = server.get(f"/api/workflow_templates/ComfyUI-SVDiff/{name}.jpg")
        assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff", (name, status, ctype)
        with open(os.path.join(WF_DIR, name + ".jpg"), "rb") as f:
            assert body == f.read()


def test_node_help_pages_are_served_where_the_editor_looks(server):
    """The editor fetches a custom node's help from /extensions/<pack folder>/docs/<node id>.md
    (after docs/<node id>/<locale>.md), /extensions/<pack folder>/ serving the pack's
    WEB_DIRECTORY; relative pictures resolve against .../docs/."""
    info = server.get_json("/object_info")
    ours = sorted(k for k, v in info.items() if str(v.get("python_module", "")).startswith(PACK_MODULE))
    assert len(ours) == 14, ours
    for nid in ours:
        status, _ctype, body = server.get(f"/extensions/ComfyUI-SVDiff/docs/{nid}.md")
        assert status == 200, (nid, status)
        with open(os.path.join(REPO, "web", "docs", nid + ".md"), "rb") as f:
            assert body == f.read(), nid
        for pic in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body.decode()):
            status, ctype, data = server.get(f"/extensions/ComfyUI-SVDiff/docs/{pic}")
            assert status == 200 and ctype == "image/png" and data[:4] == b"\x89PNG", (nid, pic, status, ctype)
    # no JavaScript in the web folder: /extensions lists none of the pack's
    assert not [e for e in server.get_json("/extensions") if "ComfyUI-SVDiff" in e]


def run_workflow(server, name: str, timeout: float = 420.0):  # a loaded 2-core CI machine can be slow
    defs = server.get_json("/object_info")  # the converter works from the server's own definitions
    prompt = W.to_prompt(os.path.join(WF_DIR, name), defs, replace={"ckpt_name": demo_model.demo_checkpoint_name()})
    prompt = demo_model.shrink_prompt(prompt)
    pid = server.queue(prompt)
    entry = server.wait(pid, timeout=timeout)
    files = server.output_files(entry)
    return entry, files


RUNNABLE = [n for n in ("01_single_subject.json", "02_load_shift.json", "03_multi_subject.json",
                        "04_single_image_editing.json", "05_combine_interpolate.json")
            if os.path.isfile(os.path.join(WF_DIR, n))]


@pytest.mark.parametrize("name", RUNNABLE)
def test_workflow_runs_through_prompt_endpoint(server, name):
    entry, files = run_workflow(server, name)
    assert entry["status"]["completed"], entry["status"]
    images = [f for f in files if f.endswith(".png")]
    assert images, entry["outputs"]
    for f in images:
        assert os.path.isfile(f) and os.path.getsize(f) > 100, f
    if name == "01_single_subject.json":  # the trained shift was saved next to the pre-made one
        saved = glob.glob(os.path.join(server.base, "models", "svdiff", "my_subject_000*_.safetensors"))
        assert len(saved) >= 2, saved
    if name == "03_multi_subject.json":  # one shift for both subjects, with the Cut-Mix settings in it
        saved = glob.glob(os.path.join(server.base, "models", "svdiff", "my_two_subjects_000*_.safetensors"))
        assert len(saved) == 1, saved
        from safetensors import safe_open

        with safe_open(saved[0], framework="pt") as f:
            meta = json.dumps(f.metadata())
        assert "sks" in meta and "hta" in meta, meta[:2000]


def test_missing_shift_file_is_refused_at_queue_time_with_node_and_field_named(server):
    """ComfyUI 0.3.75's validate_prompt does not check V3 combo values (0.33 does); Load
    Spectral Shift's validate_inputs refuses a missing file on both, so /prompt answers 400
    naming the node and the field, and our workflow validator catches it too."""
    defs = server.get_json("/object_info")
    rep = {"ckpt_name": demo_model.demo_checkpoint_name(), "shift_name": "no_such_shift.safetensors"}
    path = os.path.join(WF_DIR, "02_load_shift.json")
    problems = W.validate_workflow(path, defs, replace=rep)
    assert any("shift_name" in p and "no_such_shift" in p for p in problems), problems
    prompt = demo_model.shrink_prompt(W.to_prompt(path, defs, replace=rep))
    status, body = server.post_json("/prompt", {"prompt": prompt})
    assert status == 400, body
    errors = [e for v in body["node_errors"].values() if v["class_type"] == "SVDiffLoadShift" for e in v["errors"]]
    assert errors and all(e["extra_info"]["input_name"] == "shift_name" for e in errors), body["node_errors"]
    assert any("[Load Spectral Shift] shift_name: file 'no_such_shift.safetensors' not found" in e["details"] for e in errors)


def test_server_stops_cleanly_on_ctrl_c(server):
    """Last test of the module: Ctrl-C stops the shared server by itself, in time."""
    import time

    t0 = time.monotonic()
    rc = server.stop(timeout=30)
    assert server.proc.poll() is not None
    assert time.monotonic() - t0 < 30, "needed SIGTERM/SIGKILL"
    assert rc in (0, -2, 130), (rc, server.log_tail())
