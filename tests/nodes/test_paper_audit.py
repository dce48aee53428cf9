"""Paper-audit fixes in SVDiff Train, Cut-Mix and shift stacking (each failed before its fix)."""

from __future__ import annotations

import torch

from svdiff_testkit.comfy_env import pack_module
from svdiff_testkit.train_args import train_inputs


def _inputs(ckpt, **kw):
    g = torch.Generator().manual_seed(0)
    return train_inputs(ckpt, **{"images": [torch.rand(2, 64, 64, 3, generator=g)], "steps": 3, "learning_rate": 1e-3,
                                 "learning_rate_1d": 1e-6, **kw})


def _train(a):
    with torch.inference_mode():
        return pack_module("nodes.train").train(a)


def test_unet_1d_subset_trains_its_1d_shifts_at_learning_rate(tiny_checkpoint):
    """Item 1: with only 1-D weights trained, learning_rate applies (learning_rate_1d = 1e-6 would
    move a norm scale by about 1e-6 per Adam step)."""
    r = _train(_inputs(tiny_checkpoint, subset="UNet-1D"))
    moved = max(float(d.abs().max()) for d in r.shift.deltas.values())
    assert all(len(s) == 1 for s in r.shift.shapes.values())
    assert moved > 1e-3, moved  # Adam: about learning_rate per step for 3 steps
    assert any("learning_rate_1d is not used" in n for n in r.report["notes"])
    # beside spectral shifts the 1-D shifts keep learning_rate_1d
    r2 = _train(_inputs(tiny_checkpoint, subset="UNet"))
    one_d = [d for k, d in r2.shift.deltas.items() if len(r2.shift.shapes[k]) == 1]
    assert one_d and max(float(d.abs().max()) for d in one_d) < 1e-5


def test_training_on_a_shifted_model_says_it_stacks(tiny_checkpoint):
    """Item 4: a MODEL that already carries a spectral shift is named in the notes."""
    model, clip, vae = tiny_checkpoint
    first = _train(_inputs(tiny_checkpoint, steps=1))
    shifted = first.model
    r = _train(_inputs((shifted, clip, vae), steps=1))
    assert any("already carries a spectral shift" in n and "Combine/Scale Shifts" in n for n in r.report["notes"])
    plain = _train(_inputs(tiny_checkpoint, steps=1))
    assert not any("already carries" in n for n in plain.report["notes"])


def test_cutmix_prior_sample_is_paired_with_the_instance_sample():
    """Item 6: the prior sample of a step repeats the instance sample's plan (mixed <-> mixed,
    same subjects in the same regions, same layout and split), from the prior images."""
    import svdiff.cutmix as C

    g = torch.Generator().manual_seed(0)
    subs = [C.Subject(torch.rand(2, 24, 24, 3, generator=g), t, c, torch.rand(3, 24, 24, 3, generator=g))
            for t, c in (("sks", "dog"), ("hta", "cat"), ("olis", "bird"))]
    for layout in ("left-right", "random"):
        ts = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, layout, seed=1), resolution=32)
        for step in range(60):
            inst, prior = ts.sample(step), ts.sample(step, prior=True)
            assert prior.prior and not inst.prior
            assert (prior.subjects, prior.layout, prior.split) == (inst.subjects, inst.layout, inst.split)
            assert prior.words == [subs[i].class_word for i in inst.subjects]
            assert prior.prompt == inst.prompt.replace("sks ", "").replace("hta ", "").replace("olis ", "")
    # a subject without prior images: its steps fall back to the subjects that have some
    subs2 = subs[:2] + [C.Subject(subs[2].images, "olis", "bird", None)]
    ts2 = C.CutMixTrainingSet(subs2, C.CutMixConfig(0.6, "left-right", seed=1), resolution=32)
    for step in range(60):
        inst, prior = ts2.sample(step), ts2.sample(step, prior=True)
        assert 2 not in prior.subjects
        if 2 not in inst.subjects:
            assert prior.subjects == inst.subjects
