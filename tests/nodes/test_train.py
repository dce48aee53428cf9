"""SVDiff Train on the tiny model in real ComfyUI (weights loaded by CheckpointLoaderSimple
under inference mode, as in the executor)."""

import os

import pytest
import torch

from svdiff_testkit.probes import unet_forward
from svdiff_testkit.train_args import NONE, train_inputs


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def subject_images(n=3, size=64, w=None):
    w = w or size
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, w), indexing="ij")
    out = []
    for i in range(n):
        r = ((xs - 0.2 * i) ** 2 + ys**2).sqrt()
        out.append(torch.stack([(r < 0.5).float() * 0.9, (xs + 1) / 4, torch.full_like(xs, 0.2 + 0.2 * i)], -1)[None])
    return torch.cat(out)


def T():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.train")


def args(ckpt, **kw):
    return train_inputs(ckpt, **{"images": [subject_images()], "filename_prefix": "svdiff/test_train", **kw})


def run(a):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return T().train(a)


def unet_out(mp, seed=0):
    return unet_forward(mp, seed, sigma=3.0, grad_mode=torch.inference_mode)


EVAL_T = [50, 200, 400, 600, 800, 950]


def held_out(mp, latents, entry):
    with torch.inference_mode():
        return T().evaluate_denoising_loss(mp, latents, entry, seed=777, draws=6, timesteps=EVAL_T)


def test_loss_falls_prior_preserves_and_base_untouched(ckpt):
    model = ckpt[0]
    before = unet_out(model)
    w_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w0 = model.model.state_dict()[w_key].clone()
    steps = 14
    m0, _, s0, loss0, done0, rep0 = run(args(ckpt, steps=steps, learning_rate=3e-2, prior_weight=0.0))
    m1, _, s1, loss1, done1, rep1 = run(args(ckpt, steps=steps, learning_rate=3e-2, prior_weight=1.0))
    assert done0 == steps and len(loss0["loss"]) == steps
    inst, entry = rep0["instance_latents"], rep0["instance_entry"]
    base_inst = held_out(model, inst, entry)
    after_inst = held_out(m0, inst, entry)
    assert after_inst < 0.8 * base_inst, (base_inst, after_inst)
    first, last = sum(loss0["loss"][:4]) / 4, sum(loss0["loss"][-4:]) / 4
    assert last < 0.85 * first, loss0["loss"]
    # prior preservation: the lambda-weighted prior term of Eq. 3 is in the objective, so the run with
    # prior_weight > 0 denoises the (generated) prior images better than the run without it.  (On a
    # random-weight base, "closer to the base's loss" is ill-posed: the base is no denoiser, and any
    # training lowers the loss on every image; see the report.)
    pl, pe = rep1["prior_latents"], rep1["prior_entry"]
    assert pl is not None and pl.shape[0] == 2  # generated with the base model and ComfyUI's sampler
    base_prior = held_out(model, pl, pe)
    p0, p1 = held_out(m0, pl, pe), held_out(m1, pl, pe)
    assert p1 < p0 < base_prior, (base_prior, p0, p1)
    # the MODEL that went in: same weights, bit-identical outputs
    assert torch.equal(unet_out(model), before)
    assert torch.equal(model.model.state_dict()[w_key], w0)  # while the base is loaded, its weights are the originals
    assert not torch.equal(unet_out(m0), before)
    assert torch.equal(unet_out(model), before)
    assert rep0["routes"].get("side", 0) > 0 and rep0["routes"].get("recompose", 0) > 0


def test_only_subset_and_rank_change_and_file_size(ckpt, shift_dir):
    import svdiff.shiftfile as SF
    from svdiff.shift import delta_length

    m, _, shift, _, done, rep = run(args(ckpt, steps=2, subset="UNet-CA-KV", rank=2, save_every=2,
                                         filename_prefix="svdiff/test_subset", learning_rate=5e-2))
    assert done == 2
    keys = list(shift.deltas)
    assert keys and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys)
    assert all(shift.deltas[k].shape[0] == 2 for k in keys)
    assert all(shift.deltas[k].abs().sum() > 0 for k in keys)
    # every other weight of the model is untouched by the output model's patches
    patched = set(k for k in m.patches)
    assert patched == set(keys)
    assert len(rep["saved"]) == 1
    path = rep["saved"][0]
    n_values = sum(delta_length(shift.shapes[k], 2) for k in keys)
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert os.path.getsize(path) == 8 + header + 2 * n_values  # float16 values
    loaded = SF.load_shift(path)
    assert set(loaded.deltas) == set(keys)
    assert loaded.metadata.get("subset") == "UNet-CA-KV" and int(loaded.metadata.get("rank")) == 2
    assert os.path.isfile(path[: -len(".safetensors")] + ".train-state")


def test_resume_gives_the_same_delta(ckpt, shift_dir):
    kw = dict(subset="UNet-CA", steps=4, learning_rate=2e-2, prior_weight=0.0, seed=3)
    _, _, full, _, done, _ = run(args(ckpt, **kw))
    assert done == 4
    _, _, half, _, d1, rep = run(args(ckpt, **{**kw, "steps": 2, "save_every": 2, "filename_prefix": "svdiff/test_resume"}))
    rel = os.path.relpath(rep["saved"][-1], shift_dir)
    _, _, resumed, lm, d2, _ = run(args(ckpt, **{**kw, "steps": 2, "resume_from": rel}))
    assert d1 == 2 and d2 == 4 and len(lm["loss"]) == 2
    assert set(full.deltas) == set(resumed.deltas)
    for k in full.deltas:
        assert torch.equal(full.deltas[k], resumed.deltas[k]), k
    # deterministic: the same run twice gives the same bits
    _, _, again, _, _, _ = run(args(ckpt, **kw))
    assert all(torch.equal(full.deltas[k], again.deltas[k]) for k in full.deltas)


def test_bad_inputs(ckpt, shift_dir):
    import comfy.model_management as mm
    from svdiff_testkit import tiny

    SVDiffNodeError = __import__(T().__name__.rsplit(".", 1)[0] + ".common", fromlist=["x"]).SVDiffNodeError
    with pytest.raises(SVDiffNodeError, match=r"\[SVDiff Train\] images: no training images"):
        run(args(ckpt, images=[]))
    for lr in (0.0, float("nan")):
        with pytest.raises(SVDiffNodeError, match="learning_rate: must be a positive finite number"):
            run(args(ckpt, learning_rate=lr))
    # steps 0: no training, an all-zero shift, the model's outputs unchanged
    m, _, sh, lm, done, _ = run(args(ckpt, steps=0))
    assert done == 0 and lm["loss"] == [] and all(float(d.abs().sum()) == 0 for d in sh.deltas.values())
    assert torch.equal(unet_out(m), unet_out(ckpt[0]))
    # a CLIP of another model: its embeddings have another width
    import comfy.sd
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models_base

    class WideClip(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            cfg = dict(tiny.TINY_CLIP, hidden_size=64, projection_dim=64)
            super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": cfg}, **kw)

    with torch.inference_mode():
        wide = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, WideClip))
    with pytest.raises(SVDiffNodeError, match=r"clip: this CLIP gives 64-wide embeddings but the MODEL expects 32"):
        run(args(ckpt, clip=wide))
    # images of different sizes are resized (with a note); a prompt without identifier warns
    _, _, _, _, _, rep = run(args(ckpt, images=[subject_images(1), subject_images(1, 64, 128)], steps=1,
                                  prompt="photo of a dog", prior_weight=1.0, image_fit="centre-crop"))
    notes = " ".join(rep["notes"])
    assert "different sizes" in notes and "far from square" in notes and "no word that the class prompt lacks" in notes
    # interrupt at step 1: an interruption, no file, base untouched
    before = unet_out(ckpt[0])
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(args(ckpt, steps=3, save_every=1, filename_prefix="svdiff/test_interrupt"))
    finally:
        mm.interrupt_current_processing(False)
    import glob

    assert not glob.glob(os.path.join(shift_dir, "**", "test_interrupt*"), recursive=True)
    assert torch.equal(unet_out(ckpt[0]), before)


def test_text_encoder_training_shifts_clip_and_leaves_base_clip(ckpt):
    model, clip, vae = ckpt
    with torch.inference_mode():
        base_cond = clip.encode_from_tokens(clip.tokenize("photo of a sks dog")).clone()
    m, c, shift, _, done, _ = run(args(ckpt, steps=2, subset="UNet-CA-KV", train_text_encoder=True, learning_rate=5e-2))
    clip_keys = [k for k in shift.deltas if not k.startswith("diffusion_model.")]
    assert clip_keys and all(".encoder." in k or "final_layer_norm" in k for k in clip_keys)
    assert any(float(shift.deltas[k].abs().sum()) > 0 for k in clip_keys if len(shift.shapes[k]) == 2)
    with torch.inference_mode():
        new_cond = c.encode_from_tokens(c.tokenize("photo of a sks dog"))
        again = clip.encode_from_tokens(clip.tokenize("photo of a sks dog"))
    assert not torch.equal(new_cond, base_cond)
    assert torch.equal(again, base_cond)


def test_graph_through_comfy_executor(ckpt, comfy):
    from svdiff_testkit.comfy_env import run_prompt

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_train.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x884422}},
        "3": {"class_type": "SVDiffTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "prompt": "photo of a sks dog",
            "train_text_encoder": False, "class_prompt": "photo of a dog", "prior_weight": 0.0, "num_prior_images": 1,
            "prior_steps": 2, "subset": "UNet-CA", "rank": 0, "steps": 2, "batch_size": 1, "learning_rate": 0.01,
            "learning_rate_1d": 0.000001, "optimizer": "AdamW", "seed": 1, "resolution": 64, "gradient_checkpointing": True,
            "training_dtype": "auto", "side_path": "auto", "save_every": 0, "filename_prefix": "svdiff/graph",
            "resume_from": NONE}},
        "4": {"class_type": "LossGraphNode", "inputs": {"loss": ["3", 3], "filename_prefix": "svdiff_loss"}},
        "5": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["3", 2], "filename_prefix": "svdiff/graph", "dtype": "float16"}},
    }
    ex, outputs = run_prompt(prompt)
    assert ex.success, ex.status_messages
    assert "5" in outputs and "4" in outputs
