"""SVDiff Train's memory plan: exact parts on the real SD1.5 architecture (meta device), the
activation profile re-measured, refusal before any work under a fake device limit, and the plan
on the node's text on the CPU (no limit known)."""

import re

import pytest
import torch

import svdiff.memory_plan as M
from svdiff.decompose import num_singular_values
from svdiff_testkit import meta_models

from svdiff_testkit.train_args import train_inputs

PARAMS_SD15_UNET = 859_520_964  # parameters of the SD1.5 UNet (diffusers' UNet2DConditionModel count)


class _Patcher:
    """What the plan reads of a ModelPatcher: ``model`` and ``load_device``."""

    def __init__(self, model):
        self.model = model
        self.load_device = torch.device("cpu")


@pytest.fixture(scope="module")
def sd15(comfy):
    return _Patcher(meta_models.build("SD15", torch.bfloat16))


def run(a):
    from svdiff_testkit.comfy_env import pack_module

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return pack_module("nodes.train").train(a)


def args(ckpt, **kw):
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return train_inputs(ckpt, **{"images": [image], "filename_prefix": "svdiff/test_memory_plan", **kw})


def P():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.train.plan")


def settings(**kw):
    from svdiff_testkit.comfy_env import pack_module

    base = dict(training_dtype="bf16", prior_weight=1.0, batch_size=1, resolution=512, optimizer="AdamW")
    return pack_module("nodes.train.settings").TrainSettings(**{**base, **kw})


def test_sd15_plan_parts_are_exact(sd15):
    p, subsets = P().plan_inputs(sd15, None, settings(subset="UNet"))
    pl = M.plan(p)
    unet = sd15.model.diffusion_model
    assert sum(t.numel() for t in unet.parameters()) == PARAMS_SD15_UNET
    # model: the bf16 UNet plus ComfyUI's float32 sampling tables, as loaded
    extra = sum(t.numel() * t.element_size() for k, t in sd15.model.state_dict().items() if not k.startswith("diffusion_model."))
    assert pl.model == 2 * PARAMS_SD15_UNET + extra
    mats = {k: s for k, s in p.trained_shapes.items() if len(s) >= 2}
    vecs = {k: s for k, s in p.trained_shapes.items() if len(s) == 1}
    assert len(mats) == 282 and len(vecs) == 109
    k_total = sum(num_singular_values(s) for s in mats.values())
    assert k_total == 222_696
    uv = sum((s[0] + int(torch.tensor(s[1:]).prod())) * num_singular_values(s) for s in mats.values())
    assert pl.factors == 2 * uv + 4 * k_total  # fp16 U, V^T; float32 sigma
    assert 2.1e9 < pl.factors < 2.3e9  # the "2.2 GB fp16 for SD1.5" of issue 16
    values = k_total + sum(s[0] for s in vecs.values())
    assert pl.deltas == 8 * values and pl.optimizer == 8 * values  # fp32 delta + grad; AdamW's two moments
    assert M.plan(M.PlanInputs(**{**p.__dict__, "optimizer": "SGD"})).optimizer == 0
    # rank 16: U[:, :16], V^T[:16] per matrix
    r16 = M.plan(M.PlanInputs(**{**p.__dict__, "rank": 16}))
    uv16 = sum((s[0] + int(torch.tensor(s[1:]).prod())) * min(16, num_singular_values(s)) for s in mats.values())
    assert r16.factors == 2 * uv16 + 4 * sum(min(16, num_singular_values(s)) for s in mats.values())
    # activations: linear in the samples and the dtype size, lower with checkpointing and smaller subsets
    one = M.plan(M.PlanInputs(**{**p.__dict__, "samples": 1})).activations
    assert abs(pl.activations - 2 * one) <= 1
    assert M.plan(M.PlanInputs(**{**p.__dict__, "compute_bytes": 4})).activations == pytest.approx(2 * pl.activations, abs=2)
    assert M.plan(M.PlanInputs(**{**p.__dict__, "checkpointing": True})).activations < pl.activations / 3
    ca = M.plan(M.PlanInputs(**{**p.__dict__, "trained_shapes": subsets["UNet-CA"]}))
    assert ca.activations < pl.activations and ca.factors < pl.factors / 10
    assert pl.total == pl.model + pl.factors + pl.deltas + pl.optimizer + pl.activations + pl.margin


def test_sd15_activation_profile_matches_a_fresh_measurement(sd15):
    """The table in svdiff.memory_plan is what the meta-device measurement gives on this ComfyUI."""
    got = meta_models.activation_profile("SD15", sd15.model)
    want = M.PROFILES["SD15"]
    for px in (512 * 512, 768 * 768):
        for share in (0.0, 1.0):
            for ck in (False, True):
                assert got.bytes(px, share, ck) == pytest.approx(want.bytes(px, share, ck), rel=0.02), (px, share, ck)
    # what the planned parts rest on: trained layers keep more than frozen ones, checkpointing much less
    assert got.bytes(512 * 512, 1.0, False) > got.bytes(512 * 512, 0.0, False) > 3 * got.bytes(512 * 512, 0.0, True)


def _fits(msg):
    """(subset, rank, planned bytes) of each setting the refusal names."""
    return [(m[0], int(m[1]), m[2]) for m in re.findall(r"subset (\S+) at rank (\d+)[^(]*\(([\d.]+ [GM]iB)\)", msg)]


def test_refusal_names_a_subset_and_rank_that_fit(sd15, monkeypatch):
    plan = P()
    s = settings(subset="UNet")
    p, subsets = plan.plan_inputs(sd15, None, s)
    full = M.plan(p).total
    ca = M.plan(M.PlanInputs(**{**p.__dict__, "trained_shapes": subsets["UNet-CA"]})).total
    limit = (full + ca) // 2  # the whole UNet does not fit, the cross-attention layers do
    monkeypatch.setattr(plan, "device_limit", lambda device: limit)
    with pytest.raises(Exception) as e:
        plan.check(sd15, None, s, [])
    msg = str(e.value)
    assert type(e.value).__name__ == "SVDiffNodeError"
    assert "SVDiff Train" in msg and "subset/rank" in msg
    assert M.gib(full) in msg and M.gib(limit) in msg
    named = _fits(msg)
    assert named, msg
    for subset, rank, _ in named:  # every named setting does fit
        q = M.PlanInputs(**{**p.__dict__, "trained_shapes": subsets[subset], "rank": rank})
        assert M.plan(q).total <= limit
    assert named[0][0] == "UNet" and named[0][1] > 0  # the same subset at a lower rank first
    # a limit nothing fits: said, with what to change instead
    monkeypatch.setattr(plan, "device_limit", lambda device: p.model_bytes // 2)
    with pytest.raises(Exception) as e:
        plan.check(sd15, None, s, [])
    assert "No subset or rank fits" in str(e.value)
    # a limit the plan fits: no refusal, the free memory is stated
    monkeypatch.setattr(plan, "device_limit", lambda device: full * 2)
    text = plan.check(sd15, None, s, [])
    assert text.startswith("memory plan: model ") and f"{M.gib(full * 2)} free" in text


def test_refusal_comes_before_any_work(tiny_checkpoint, monkeypatch):
    from svdiff_testkit.comfy_env import pack_module

    plan, runmod = P(), pack_module("nodes.train.run")
    monkeypatch.setattr(plan, "device_limit", lambda device: 1 << 20)

    def no_work(*a, **k):
        raise AssertionError("training data prepared although the plan does not fit")

    monkeypatch.setattr(runmod, "instance_data", no_work)
    with pytest.raises(Exception) as e:
        run(args(tiny_checkpoint, steps=1))
    assert type(e.value).__name__ == "SVDiffNodeError" and "but 1.0 MiB is free on the device" in str(e.value)


def test_cpu_run_states_the_plan_and_never_refuses(tiny_checkpoint):
    from svdiff_testkit.comfy_env import pack_module

    assert M.device_free_bytes(torch.device("cpu")) is None
    r = run(args(tiny_checkpoint, steps=1, save_every=0, preview_every=0, prior_weight=0.0, subset="UNet-CA"))
    text = r.report["memory_plan"]
    assert text.startswith("memory plan: model ") and "no device limit known (cpu)" in text
    status = pack_module("nodes.train.preview").StatusText(0, 2, text)
    lines = status.text(0, 0.5, 0).split("\n")
    assert lines[0] == text and lines[1].startswith("step 1/2")


def test_a_model_type_subclass_plans_with_its_familys_profile(comfy):
    """The tiny SD2 (a subclass of ComfyUI's SD20) plans with SD1.5's profile, not the fallback."""
    import comfy.model_patcher
    from svdiff_testkit import families
    from svdiff_testkit.comfy_env import pack_module

    plan = pack_module("nodes.train.plan")
    model, _clip = families.build("SD2")
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    assert plan._profile_architecture(mp) == "SD20"
    fam, _prof, note = plan.M.profile_for(plan._profile_architecture(mp))
    assert fam == "SD15" and note == ""
