"""SVDiff Train with a Cut-Mix training set, the unmix loss (Sec. 3.3) and Eq. 10 (appendix D.1),
on the tiny model loaded by CheckpointLoaderSimple under inference mode (as in the executor)."""

import os

import pytest
import torch

from svdiff_testkit.train_args import NONE, train_inputs


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def pack(name):
    from svdiff_testkit.comfy_env import pack_module

    return pack_module(name)


def T():
    return pack("nodes.train")


def NodeError():
    return pack("nodes.common").SVDiffNodeError


def subject(kind: str, n=2, size=64):
    """Two visibly different subjects: a red disc on dark, a blue bar on light (n views each)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        if kind == "disc":
            on = (((xs - 0.15 * i) ** 2 + ys**2).sqrt() < 0.55).float()
            img = torch.stack([0.1 + 0.8 * on, 0.1 + 0.0 * on, 0.15 + 0.0 * on], -1)
        else:
            on = ((xs.abs() < 0.25 + 0.1 * i) & (ys.abs() < 0.7)).float()
            img = torch.stack([0.85 - 0.7 * on, 0.85 - 0.5 * on, 0.9 + 0.0 * on], -1)
        out.append(img[None])
    return torch.cat(out)


def training_set(tokens=("sks", "hta"), probability=0.6, layout="left-right", seed=0, resolution=64, prior=False):
    slots = {}
    for n, (tok, cls, kind) in enumerate(zip(tokens, ("dog", "sculpture"), ("disc", "bar")), start=1):
        slots[f"images_{n}"] = subject(kind)
        slots[f"token_{n}"] = tok
        slots[f"class_word_{n}"] = cls
        if prior:
            slots[f"prior_images_{n}"] = subject(kind, 1) * 0.5 + 0.25
    with torch.inference_mode():  # as the executor runs the Builder
        return pack("nodes.cutmix").build_training_set(slots, probability, layout, 0.5, seed, resolution)


def args(ckpt, **kw):
    return train_inputs(ckpt, **{"num_prior_images": 1, "prior_steps": 2, "subset": "UNet-CA", "steps": 3,
                                 "learning_rate": 2e-2, "filename_prefix": "svdiff/test_cutmix", **kw})


def run(a):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return T().train(a)


def same_deltas(a, b) -> bool:
    return set(a.deltas) == set(b.deltas) and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)


def max_diff(a, b) -> float:
    return max(float((a.deltas[k] - b.deltas[k]).abs().max()) for k in a.deltas)


def held_out(mp, data, steps):
    """Mean denoising loss of ``mp`` on the samples of ``steps`` (their own latent and prompt)."""
    tot = 0.0
    with torch.inference_mode():
        for st in steps:
            s = data.samples(st)[0]
            tot += T().evaluate_denoising_loss(mp, data.latent(s), data.cond(s.prompt), seed=777, draws=4,
                                               timesteps=[100, 300, 500, 700, 900])
    return tot / len(steps)


# --------------------------------------------------------------------------------------
def test_cutmix_training_set_trains_and_its_loss_falls(ckpt):
    ts = training_set()
    steps = 12
    m, _, shift, lm, done, rep = run(args(ckpt, training_set=ts, steps=steps, learning_rate=3e-2, subset="UNet"))
    assert done == steps and len(lm["loss"]) == steps
    data = rep["cutmix"]
    drawn = [data.samples(s)[0] for s in range(steps)]
    assert any(s.mixed for s in drawn) and any(not s.mixed for s in drawn), [s.prompt for s in drawn]
    assert {s.subjects[0] for s in drawn if not s.mixed} == {0, 1}
    # each sample's own prompt and latent: the model learns them
    eval_steps = [i for i in range(steps) if drawn[i].mixed][:2] + [i for i in range(steps) if not drawn[i].mixed][:2]
    before, after = held_out(ckpt[0], data, eval_steps), held_out(m, data, eval_steps)
    assert after < 0.8 * before, (before, after)
    first, last = sum(lm["loss"][:4]) / 4, sum(lm["loss"][-4:]) / 4
    assert last < first, lm["loss"]
    # no attention capture when both weights are 0; Cut-Mix settings recorded
    assert rep["attention_capture"] is False and "unmix" not in lm and "denoise" not in lm
    cm = shift.metadata["training"]["cutmix"]
    assert cm["probability"] == 0.6 and cm["layout"] == "left-right" and cm["seed"] == 0
    assert [(s["token"], s["class_word"], s["images"]) for s in cm["subjects"]] == [("sks", "dog", 2), ("hta", "sculpture", 2)]
    assert shift.metadata["trigger_words"] == "sks hta"


def test_prior_samples_come_from_the_set_and_are_mixed_too(ckpt, shift_dir):
    import svdiff.shiftfile as SF

    ts = training_set(prior=True, resolution=96)  # built at another resolution than the training one
    _, _, shift, lm, done, rep = run(args(ckpt, training_set=ts, steps=2, prior_weight=1.0, save_every=2,
                                          filename_prefix="svdiff/test_cutmix_prior"))
    assert any("built at 96 px, resized to the training resolution 64" in n for n in rep["notes"]), rep["notes"]
    data = rep["cutmix"]
    s0 = data.samples(0)[0]
    assert s0.image.shape == (64, 64, 3) and s0.masks.shape[-2:] == (64, 64)
    assert torch.allclose(s0.masks.sum(0), torch.ones(64, 64))
    assert data.ts is ts  # every subject brought its prior images: nothing generated
    priors = [data.samples(s, prior=True)[0] for s in range(20)]
    assert any(p.mixed for p in priors) and any(not p.mixed for p in priors)
    assert all("sks" not in p.prompt and "hta" not in p.prompt for p in priors)
    loaded = SF.load_shift(rep["saved"][-1])
    subs = loaded.metadata["training"]["cutmix"]["subjects"]
    assert [s["prior_images"] for s in subs] == [1, 1] and not any(s["prior_generated"] for s in subs)
    assert loaded.metadata["training"]["prior_weight"] == 1.0


def test_unmix_weight_changes_delta_and_zero_changes_nothing(ckpt):
    ts = training_set(probability=0.9)
    base = args(ckpt, training_set=ts, steps=3)
    _, _, plain, lm_plain, _, rep_plain = run(base)  # no attention inputs at all
    _, _, off, lm_off, _, rep_off = run(dict(base, unmix_weight=0.0, attention_reg_weight=0.0, attention_resolutions="8"))
    assert not rep_off["attention_capture"] and same_deltas(plain, off), "weight 0: bit-identical, capture not installed"
    assert lm_off["loss"] == lm_plain["loss"]
    _, _, on, lm_on, _, rep_on = run(dict(base, unmix_weight=200.0))
    assert rep_on["attention_capture"]
    assert max(lm_on["unmix"]) > 0
    # the capture's own attention gives the same forward: the first step's denoising loss is the plain one
    assert lm_on["denoise"][0] == pytest.approx(lm_plain["loss"][0], rel=1e-4)
    assert max_diff(on, plain) > 1e-6, "the unmix term changes training"
    # with gradient checkpointing (non-reentrant: the capture runs again in backward) the same result
    _, _, on_ck, lm_ck, _, _ = run(dict(base, unmix_weight=200.0, gradient_checkpointing=True))
    assert lm_ck["unmix"] == pytest.approx(lm_on["unmix"], rel=1e-4)
    assert max_diff(on_ck, on) < 1e-2 * max_diff(on, plain)
    # only the 8x8 maps: another (still nonzero) term
    _, _, on8, lm8, _, _ = run(dict(base, unmix_weight=200.0, attention_resolutions="8"))
    assert max(lm8["unmix"]) > 0 and lm8["unmix"] != lm_on["unmix"]
    assert max_diff(on8, plain) > 1e-6
    # special tokens that the CLIP tokenizer splits into several tokens: every piece is used
    multi = training_set(tokens=("sksqzv", "htaxwj"), probability=0.9)
    _, _, _, lm_m, _, rep_m = run(dict(base, training_set=multi, unmix_weight=200.0, steps=1))
    s0 = rep_m["cutmix"].samples(0)[0]
    pos = [rep_m["cutmix"].positions(s0.prompt, w) for w in s0.words]
    assert s0.mixed and all(len(p) > 1 for p in pos), pos
    assert lm_m["unmix"][0] > 0


def test_attention_reg_eq10_changes_delta_and_zero_changes_nothing(ckpt):
    # single subject (images route): Eq. 10 on 'sks' masked by 'dog'
    base = args(ckpt, images=[subject("disc", 3)], steps=3)
    _, _, plain, _, _, _ = run(base)
    _, _, off, _, _, rep_off = run(dict(base, attention_reg_weight=0.0, attention_threshold=0.3))
    assert not rep_off["attention_capture"] and same_deltas(plain, off)
    _, _, on, lm_on, _, _ = run(dict(base, attention_reg_weight=500.0))
    assert max(lm_on["attention_reg"]) > 0 and "unmix" not in lm_on
    assert max_diff(on, plain) > 1e-6
    _, _, on_ck, lm_ck, _, _ = run(dict(base, attention_reg_weight=500.0, gradient_checkpointing=True))
    assert lm_ck["attention_reg"] == pytest.approx(lm_on["attention_reg"], rel=1e-4)
    assert max_diff(on_ck, on) < 1e-2 * max_diff(on, plain)
    # the threshold matters: a lower one gives a larger mask M, so less to push down
    _, _, _, lm_lo, _, _ = run(dict(base, attention_reg_weight=500.0, attention_threshold=0.05, steps=1))
    assert lm_lo["attention_reg"][0] < lm_on["attention_reg"][0]
    # with a Cut-Mix set: applied to its single-subject samples, together with unmix
    ts = training_set(probability=0.5)
    _, _, both, lm_both, _, _ = run(args(ckpt, training_set=ts, steps=4, attention_reg_weight=500.0, unmix_weight=50.0,
                                         gradient_checkpointing=True))
    data = T().CutMixData(ts, ckpt[0], ckpt[2], ckpt[1], 64, 1)
    singles = [not data.samples(s)[0].mixed for s in range(4)]
    assert [v > 0 for v in lm_both["attention_reg"]] == singles
    assert [v > 0 for v in lm_both["unmix"]] == [not s for s in singles]


def test_resume_and_text_encoder_with_cutmix_and_attention_losses(ckpt, shift_dir):
    ts = training_set(probability=0.6)
    kw = dict(training_set=ts, unmix_weight=50.0, attention_reg_weight=50.0, seed=2)
    _, _, full, _, _, _ = run(args(ckpt, steps=4, **kw))
    _, _, _, _, _, rep = run(args(ckpt, steps=2, save_every=2, filename_prefix="svdiff/test_cutmix_resume", **kw))
    rel = os.path.relpath(rep["saved"][-1], shift_dir)
    _, _, resumed, lm, done, rep2 = run(args(ckpt, steps=2, resume_from=rel, **kw))
    assert done == 4 and len(lm["loss"]) == 2
    assert not any("settings differ" in n for n in rep2["notes"]), rep2["notes"]
    assert same_deltas(full, resumed), "2 + 2 steps with resume_from = 4 steps (same Cut-Mix samples, same noise)"
    # text encoder trained too: the per-step prompts are encoded with gradient
    _, c, sh, lm_te, _, _ = run(args(ckpt, steps=2, training_set=ts, train_text_encoder=True, unmix_weight=50.0,
                                     subset="UNet-CA-KV", learning_rate=5e-2))
    clip_keys = [k for k in sh.deltas if not k.startswith("diffusion_model.")]
    assert clip_keys and any(float(sh.deltas[k].abs().sum()) > 0 for k in clip_keys if len(sh.shapes[k]) == 2)
    assert len(lm_te["unmix"]) == 2


def test_bad_inputs_name_the_node_and_field(ckpt):
    import comfy.model_management as mm

    E = NodeError()
    ts = training_set()
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    with torch.inference_mode():
        cond = ckpt[1].encode_from_tokens_scheduled(ckpt[1].tokenize("photo of a sks dog"))
    with pytest.raises(E, match=r"\[SVDiff Train\] training_set: Cut-Mix is unavailable with pre-encoded latents"):
        run(args(ckpt, training_set=ts, latents=[latent], positive=[cond]))
    bad = training_set(tokens=("embedding:nosuchthing", "hta"))
    with pytest.raises(E, match=r"\[SVDiff Train\] training_set: subject 1's token 'embedding:nosuchthing' is not found by the CLIP tokenizer"):
        run(args(ckpt, training_set=bad, unmix_weight=1.0))
    with pytest.raises(E, match=r"\[SVDiff Train\] unmix_weight: the unmix regularisation needs a Cut-Mix training_set"):
        run(args(ckpt, images=[subject("disc")], unmix_weight=1.0))
    with pytest.raises(E, match=r"\[SVDiff Train\] attention_resolutions: no cross-attention map of side \[16\] .* sides \[4, 8\]"):
        run(args(ckpt, training_set=ts, unmix_weight=1.0, attention_resolutions="16", steps=1))
    with pytest.raises(E, match=r"\[SVDiff Train\] attention_resolutions: 'big' is not 'all'"):
        run(args(ckpt, training_set=ts, unmix_weight=1.0, attention_resolutions="big"))
    with pytest.raises(E, match=r"\[SVDiff Train\] attention_threshold: must be in \[0, 1\)"):
        run(args(ckpt, images=[subject("disc")], attention_reg_weight=1.0, attention_threshold=1.0))
    with pytest.raises(E, match=r"\[SVDiff Train\] prompt: attention_reg_weight needs a special token"):
        run(args(ckpt, images=[subject("disc")], prompt="photo of a dog", attention_reg_weight=1.0))
    with pytest.raises(E, match=r"\[SVDiff Train\] clip: a CLIP is needed to encode the prompts of the Cut-Mix"):
        run(args(ckpt, training_set=ts, clip=None))
    # after the errors: the base model is not left with a capture or a loaded training clone
    assert ckpt[0].model_options["transformer_options"].get("patches_replace", {}).get("attn2") is None
    assert not any(getattr(lm.model, "injections", {}).get("svdiff_train") for lm in mm.current_loaded_models
                   if lm.model is not None and lm.model.model is ckpt[0].model)


def test_graph_builder_to_train_to_save(ckpt, comfy, shift_dir):
    import svdiff.shiftfile as SF
    from svdiff_testkit.comfy_env import run_prompt

    train_inputs = {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "training_set": ["4", 0], "prompt": "photo of a sks dog",
        "train_text_encoder": False, "class_prompt": "photo of a dog", "prior_weight": 1.0, "num_prior_images": 1,
        "prior_steps": 2, "subset": "UNet-CA", "rank": 0, "steps": 2, "batch_size": 1, "learning_rate": 0.01,
        "learning_rate_1d": 0.000001, "optimizer": "AdamW", "seed": 1, "resolution": 64, "gradient_checkpointing": True,
        "training_dtype": "auto", "side_path": "auto", "save_every": 0, "filename_prefix": "svdiff/cutmix_graph",
        "resume_from": NONE, "unmix_weight": 1.0, "attention_reg_weight": 1.0, "attention_threshold": 0.5,
        "attention_resolutions": "all"}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_train.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xAA2211}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 64, "batch_size": 1, "color": 0x1133CC}},
        "4": {"class_type": "SVDiffCutMixBuilder", "inputs": {
            "images_1": ["2", 0], "token_1": "sks", "class_word_1": "dog", "images_2": ["3", 0], "token_2": "hta",
            "class_word_2": "sculpture", "token_3": "zwx", "class_word_3": "cat", "token_4": "qtx", "class_word_4": "toy",
            "probability": 0.6, "layout": "random", "and_prompt_probability": 0.5, "seed": 3, "resolution": 64,
            "preview_count": 4}},
        "5": {"class_type": "SVDiffTrain", "inputs": train_inputs},
        "6": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["5", 2], "filename_prefix": "svdiff/cutmix_graph",
                                                          "dtype": "float16"}},
    }
    before = set(os.listdir(os.path.join(shift_dir)))
    ex, outputs = run_prompt(prompt)
    assert ex.success, ex.status_messages
    assert "6" in outputs
    new = [f for f in os.listdir(shift_dir) if f not in before]
    files = [os.path.join(shift_dir, f) for f in new if f.endswith(".safetensors")]
    if not files:  # saved in the svdiff/ sub-folder of models/svdiff
        sub = os.path.join(shift_dir, "svdiff")
        files = [os.path.join(sub, f) for f in os.listdir(sub) if f.startswith("cutmix_graph") and f.endswith(".safetensors")]
    assert files
    sh = SF.load_shift(sorted(files)[-1])
    tr = sh.metadata["training"]
    assert tr["cutmix"]["layout"] == "random" and tr["cutmix"]["seed"] == 3
    assert [s["prior_generated"] for s in tr["cutmix"]["subjects"]] == [True, True]  # generated per class prompt
    assert tr["unmix_weight"] == 1.0 and tr["attention_reg_weight"] == 1.0 and tr["attention_resolutions"] == "all"
    assert any(float(d.abs().sum()) > 0 for d in sh.deltas.values())
