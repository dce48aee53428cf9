"""Shared fixtures: a real ComfyUI booted in-process, the pack loaded as ComfyUI loads it.

At import, the pack's package is registered under the very module name ComfyUI will give
it, and ``svdiff`` is aliased to the pack's core package, so ``import svdiff.shift`` in a
test yields the same module objects the nodes use (and needs no ComfyUI).
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)  # the harness only; never the pack root

from svdiff_testkit import comfy_env  # noqa: E402

# The tests use tiny models: one intra-op thread is faster than two (thread overhead dominates)
# and keeps a busy 2-core machine responsive.  SVDIFF_TEST_THREADS overrides.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("SVDIFF_TEST_THREADS", "1")))

_OWN_BASE = not os.environ.get("SVDIFF_TEST_BASE")
BASE = os.environ.get("SVDIFF_TEST_BASE") or tempfile.mkdtemp(prefix="svdiff-comfy-")
comfy_env.prepare_base_dir(BASE)
comfy_env.register_pack_package(comfy_env.pack_module_name(BASE))


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI booted on the CPU with a private base directory and the pack loaded."""
    state = comfy_env.boot(BASE)
    assert not state["import_failed"], f"ComfyUI reported import failures: {state['import_failed']}"
    return state


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy_env.pack_module


@pytest.fixture()
def tiny(comfy):
    """A fresh tiny SD1-style (MODEL, CLIP) pair with fixed random weights."""
    from svdiff_testkit import tiny as tiny_mod

    return tiny_mod.build(seed=0)


@pytest.fixture(scope="module")
def tiny_checkpoint(comfy):
    """(MODEL, CLIP, VAE) of the tiny model loaded by CheckpointLoaderSimple under inference
    mode, as ComfyUI's executor loads a checkpoint (weights are inference tensors)."""
    import nodes
    from svdiff_testkit import tiny as tiny_mod

    name = tiny_mod.install_checkpoint("tiny_train.safetensors", seed=0)
    with torch.inference_mode():
        return tuple(nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3])


@pytest.fixture()
def shift_dir(comfy):
    """models/svdiff of the test ComfyUI (created on demand)."""
    import folder_paths

    d = os.path.join(folder_paths.models_dir, "svdiff")
    os.makedirs(d, exist_ok=True)
    return d


def pytest_report_header(config):
    return f"svdiff test ComfyUI base directory: {BASE}"


def pytest_sessionfinish(session, exitstatus):
    """Remove the private base directory (the model families' test files take ~0.4 GB) unless
    SVDIFF_TEST_BASE named one to keep."""
    if _OWN_BASE:
        import shutil

        shutil.rmtree(BASE, ignore_errors=True)
