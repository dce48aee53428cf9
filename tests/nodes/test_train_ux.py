"""SVDiff Train for users: learning-rate schedules and gradient accumulation (resumed exactly)."""

from __future__ import annotations

import os

import pytest
import torch

from svdiff_testkit.comfy_env import pack_module
from svdiff_testkit.train_args import train_inputs


def _inputs(ckpt, **kw):
    g = torch.Generator().manual_seed(0)
    return train_inputs(ckpt, **{"images": [torch.rand(3, 64, 64, 3, generator=g)], "subset": "UNet-CA", "steps": 4,
                                 "learning_rate": 2e-2, "seed": 3, **kw})


def _train(a):
    with torch.inference_mode():
        return pack_module("nodes.train").train(a)


def _same(a, b) -> bool:
    return set(a.deltas) == set(b.deltas) and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)


def test_lr_factor_shapes():
    import svdiff.training as T

    assert [T.lr_factor("constant", s, 10, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [T.lr_factor("linear", s, 4, 2) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    c = [T.lr_factor("cosine", s, 6, 0) for s in range(6)]
    assert c[0] == 1.0 and all(a > b for a, b in zip(c, c[1:])) and c[-1] > 0
    with pytest.raises(ValueError):
        T.lr_factor("step", 0, 4, 0)


def test_schedule_and_accumulation_change_training_and_resume_bit_exactly(tiny_checkpoint, shift_dir):
    kw = dict(lr_schedule="cosine", warmup_steps=1, grad_accumulation=2)
    full = _train(_inputs(tiny_checkpoint, **kw))
    plain = _train(_inputs(tiny_checkpoint))
    acc_only = _train(_inputs(tiny_checkpoint, grad_accumulation=2))
    cos_only = _train(_inputs(tiny_checkpoint, lr_schedule="cosine"))
    assert not _same(full.shift, plain.shift) and not _same(acc_only.shift, plain.shift) and not _same(cos_only.shift, plain.shift)
    assert len(full.loss_map["loss"]) == 4  # one value per optimizer step
    assert full.shift.metadata["training"]["lr_schedule"] == "cosine"
    assert full.shift.metadata["training"]["grad_accumulation"] == 2
    half = _train(_inputs(tiny_checkpoint, steps=2, save_every=2, filename_prefix="svdiff/test_sched", **kw))
    rel = os.path.relpath(half.report["saved"][-1], shift_dir)
    # the first half of the schedule's horizon: resume for the other half
    resumed = _train(_inputs(tiny_checkpoint, steps=2, resume_from=rel, **kw))
    assert resumed.steps == 4
    assert not _same(half.shift, full.shift)  # a 2-step run has its own (shorter) cosine horizon...
    half4 = _train(_inputs(tiny_checkpoint, steps=4, save_every=2, filename_prefix="svdiff/test_sched4", **kw))
    rel2 = os.path.relpath(half4.report["saved"][0], shift_dir)  # ...so resume from the step-2 save of a 4-step run
    resumed2 = _train(_inputs(tiny_checkpoint, steps=2, resume_from=rel2, **kw))
    assert _same(resumed2.shift, full.shift)
    assert resumed2.loss_map["loss"] == full.loss_map["loss"][2:]
    assert any("planned 2 steps" in n for n in resumed.report["notes"])  # the horizon changed: said


def test_schedule_settings_that_cannot_work_are_refused(tiny_checkpoint):
    err = pack_module("nodes.common").SVDiffNodeError
    with pytest.raises(err, match=r"\[SVDiff Train\] warmup_steps: 4 warmup steps leave no step"):
        _train(_inputs(tiny_checkpoint, warmup_steps=4))
    with pytest.raises(err, match=r"\[SVDiff Train\] grad_accumulation: must be >= 1"):
        _train(_inputs(tiny_checkpoint, grad_accumulation=0))
    with pytest.raises(err, match=r"\[SVDiff Train\] lr_schedule: unknown schedule 'step'"):
        _train(_inputs(tiny_checkpoint, lr_schedule="step"))


CAPTIONS = "photo of a sks dog on grass\nphoto of a sks dog, red background\nphoto of a sks dog at night"


def test_captions_reach_the_loss_with_text_encoder_training_and_eq10(tiny_checkpoint):
    plain = _train(_inputs(tiny_checkpoint, steps=2))
    capt = _train(_inputs(tiny_checkpoint, steps=2, captions=CAPTIONS))
    assert not _same(plain.shift, capt.shift)
    same_as_prompt = "\n".join(["photo of a sks dog"] * 3)
    assert _same(_train(_inputs(tiny_checkpoint, steps=2, captions=same_as_prompt)).shift, plain.shift)
    assert capt.shift.metadata["training"]["captions"] == CAPTIONS
    full = _train(_inputs(tiny_checkpoint, steps=2, captions=CAPTIONS, train_text_encoder=True, attention_reg_weight=50.0,
                          batch_size=2, prior_weight=1.0, num_prior_images=2, prior_steps=2))
    assert any(k.startswith("clip_l.") for k in full.shift.deltas)
    assert len(full.loss_map["attention_reg"]) == 2 and all(v > 0 for v in full.loss_map["attention_reg"])


def test_bad_captions_name_the_field(tiny_checkpoint):
    err = pack_module("nodes.common").SVDiffNodeError
    with pytest.raises(err, match=r"\[SVDiff Train\] captions: 2 caption lines for 3 images"):
        _train(_inputs(tiny_checkpoint, captions="photo of a sks dog\nphoto of a sks dog"))
    with pytest.raises(err, match=r"\[SVDiff Train\] captions: line 2 is empty"):
        _train(_inputs(tiny_checkpoint, captions="photo of a sks dog\n\nphoto of a sks dog"))
    with pytest.raises(err, match=r"\[SVDiff Train\] captions: line 3 \('a dog'\) lacks the instance token 'sks'"):
        _train(_inputs(tiny_checkpoint, captions="photo of a sks dog\na sks dog\na dog"))


def test_previews_at_the_requested_steps_and_they_never_change_training(tiny_checkpoint):
    with_prev = _train(_inputs(tiny_checkpoint, steps=4, preview_every=2, validation_prompt="a sks dog"))
    assert with_prev.report["preview_steps"] == [0, 2, 4]
    prev = with_prev.report["previews"]
    assert prev.shape == (3, 64, 64, 3) and float(prev.min()) >= 0 and float(prev.max()) <= 1
    assert not torch.equal(prev[0], prev[2])  # the shift changed what the model draws
    without = _train(_inputs(tiny_checkpoint, steps=4, preview_every=0))
    assert without.report["preview_steps"] == [] and without.report["previews"].shape == (1, 64, 64, 3)
    assert _same(with_prev.shift, without.shift)  # previews run without gradients and their own noise
    # the first preview is the reference: the model before any step, whatever the learning rate
    other_lr = _train(_inputs(tiny_checkpoint, steps=2, preview_every=2, validation_prompt="a sks dog", learning_rate=5e-2))
    assert torch.equal(other_lr.report["previews"][0], prev[0])
    assert not torch.equal(other_lr.report["previews"][1], prev[1])


def test_graph_with_previews_captions_and_schedule_through_the_executor(tiny_checkpoint):
    """SVDiff Train in a ComfyUI graph: previews reach ComfyUI's progress bar and the IMAGE
    output, captions and the schedule come from the node's inputs."""
    import comfy.utils
    from svdiff_testkit import tiny
    from svdiff_testkit import workflow as W
    from svdiff_testkit.comfy_env import run_prompt

    name = tiny.install_checkpoint("tiny_train.safetensors", seed=0)
    previews = []

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            previews.append((value, total, preview[1].size))

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x3366CC}},
        "3": {"class_type": "SVDiffTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "prompt": "photo of a sks dog",
            "captions": "photo of a sks dog on grass\nphoto of a sks dog at night", "class_prompt": "photo of a dog",
            "prior_weight": 0.0, "steps": 3, "resolution": 64, "learning_rate": 0.01, "lr_schedule": "cosine",
            "warmup_steps": 1, "grad_accumulation": 2, "preview_every": 1, "validation_prompt": "a sks dog",
            "subset": "UNet-CA", "save_every": 0}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 5]}},
    }
    prompt = W.fill_defaults(prompt, W.object_info())
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        ex, outputs = run_prompt(prompt, prompt_id="train_ux")
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    assert len(outputs["4"]["images"]) == 4  # steps 0, 1, 2, 3
    shown = [p for p in previews if p[1] == 3]
    assert [p[0] for p in shown] == [0, 1, 2, 3] and all(p[2] == (64, 64) for p in shown)
    text = outputs["3"]["text"][0] if "text" in outputs.get("3", {}) else ""
    assert "previews at steps 0, 1, 2, 3" in text


def test_two_aspect_buckets_train_in_one_run_with_prior_preservation(tiny_checkpoint):
    import svdiff.buckets as B

    sizes = B.bucket_sizes(64)
    assert (64, 64) in sizes and all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)
    assert B.nearest_bucket(64, 128, sizes) == (64, 128) and B.nearest_bucket(100, 100, sizes) == (64, 64)
    g = torch.Generator().manual_seed(1)
    square, wide = torch.rand(2, 64, 64, 3, generator=g), torch.rand(2, 64, 128, 3, generator=g)
    r = _train(_inputs(tiny_checkpoint, images=[square, wide], steps=6, prior_weight=1.0, num_prior_images=2, prior_steps=2,
                       captions="photo of a sks dog\nphoto of a sks dog\nphoto of a sks dog, wide\nphoto of a sks dog, wide",
                       attention_reg_weight=10.0))
    assert any("aspect buckets 64x64 (2), 128x64 (2)" in n for n in r.report["notes"])
    assert len(r.loss_map["loss"]) == 6 and all(v == v for v in r.loss_map["loss"])
    # the steps drew from both buckets: the run differs from one on the square images alone
    sq = _train(_inputs(tiny_checkpoint, images=[square], steps=6, prior_weight=1.0, num_prior_images=2, prior_steps=2,
                        captions="photo of a sks dog\nphoto of a sks dog", attention_reg_weight=10.0))
    assert not _same(r.shift, sq.shift)
    # centre-crop stays an option: everything square, as before
    cc = _train(_inputs(tiny_checkpoint, images=[square, wide], steps=1, image_fit="centre-crop"))
    assert cc.report["instance_latents"].shape[-2:] == (8, 8)


def test_bucket_inputs_that_cannot_work_are_refused(tiny_checkpoint):
    err = pack_module("nodes.common").SVDiffNodeError
    with pytest.raises(err, match=r"\[SVDiff Train\] images: image 1 is 320x64, more than 4:1"):
        _train(_inputs(tiny_checkpoint, images=[torch.rand(1, 64, 320, 3)], resolution=64))
    with pytest.raises(err, match=r"\[SVDiff Train\] images: image 1 is 40x40, less than half of its 128x128 bucket"):
        _train(_inputs(tiny_checkpoint, images=[torch.rand(1, 40, 40, 3)], resolution=128))


def test_latents_of_different_sizes_train_together(tiny_checkpoint):
    model, clip, vae = tiny_checkpoint
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a sks dog"))
    lat = [{"samples": torch.randn(2, 4, 8, 8, generator=g)}, {"samples": torch.randn(1, 4, 8, 16, generator=g)}]
    r = _train(_inputs(tiny_checkpoint, images=None, latents=lat, positive=[cond], steps=4, batch_size=1))
    assert any("2 of 64x64, 1 of 128x64" in n for n in r.report["notes"])
    assert len(r.loss_map["loss"]) == 4


def test_buckets_and_exact_resume_of_schedule_and_accumulation_through_the_executor(tiny_checkpoint):
    """Through ComfyUI's executor: images of two shapes from ComfyUI's own Load Image Dataset
    from Folder train in two buckets in one run, and a cosine + accumulation run resumed from
    its step-2 save equals the uninterrupted run bit for bit."""
    import folder_paths
    from PIL import Image

    import svdiff.shiftfile as F
    from svdiff_testkit import tiny
    from svdiff_testkit import workflow as W
    from svdiff_testkit.comfy_env import run_prompt

    name = tiny.install_checkpoint("tiny_train.safetensors", seed=0)
    folder = os.path.join(folder_paths.get_input_directory(), "svdiff_buckets")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    for i, (w, h) in enumerate(((64, 64), (64, 64), (128, 64), (128, 64))):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i}.png"))
    defs = W.object_info()
    shift_dir = folder_paths.get_folder_paths("svdiff")[0]

    def graph(prefix, **train):
        inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "prompt": "photo of a sks dog",
                  "class_prompt": "photo of a dog", "prior_weight": 1.0, "num_prior_images": 2, "prior_steps": 2,
                  "steps": 4, "resolution": 64, "learning_rate": 0.01, "subset": "UNet-CA", "seed": 3, "preview_every": 0,
                  "lr_schedule": "cosine", "warmup_steps": 1, "grad_accumulation": 2, "save_every": 0, **train}
        return W.fill_defaults({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            "2": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "svdiff_buckets"}},
            "3": {"class_type": "SVDiffTrain", "inputs": inputs},
            "4": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["3", 2], "filename_prefix": prefix, "dtype": "float32"}},
        }, defs)

    def saved(outputs):  # Save Spectral Shift's text: "saved <name> (...) in <folder>"
        text = outputs["4"]["text"][0]
        return F.load_shift(os.path.join(text.rsplit(" in ", 1)[1], text.split()[1]))

    ex, full = run_prompt(graph("svdiff/ux_full"), prompt_id="ux-full")
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    text = full["3"]["text"][0]
    assert "aspect buckets" in text and "64x64 (2)" in text and "128x64 (2)" in text, text
    ex, _ = run_prompt(graph("svdiff/ux_half", save_every=2, filename_prefix="svdiff/ux_state"), prompt_id="ux-half")
    assert ex.success
    states = sorted(f for f in os.listdir(os.path.join(shift_dir, "svdiff")) if f.startswith("ux_state_") and f.endswith(".safetensors"))
    assert len(states) == 2  # steps 2 and 4
    ex, resumed = run_prompt(graph("svdiff/ux_resumed", steps=2, resume_from="svdiff/" + states[0]), prompt_id="ux-resumed")
    assert ex.success, [m for m in ex.status_messages if m[0] == "execution_error"]
    a, b = saved(full), saved(resumed)
    assert set(a.deltas) == set(b.deltas) and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
