"""The toy world: committed weights load through ComfyUI's checkpoint loader, the attribute
classifier is accurate, the base model follows prompts of its world and does not know the
held-out concept, and a short SVDiff run teaches it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from svdiff_testkit.train_args import train_inputs
from toyworld import classifier, world
from toyworld import model as toy

pytestmark = pytest.mark.skipif(not os.path.isfile(toy.WEIGHTS), reason="toy weights not built (make toyworld)")


def test_world_is_deterministic_and_holds_out_concepts():
    a, ca = world.dataset(16, seed=3)
    b, cb = world.dataset(16, seed=3)
    c, _ = world.dataset(16, seed=4)
    assert np.array_equal(a, b) and ca == cb and not np.array_equal(a, c)
    _, caps = world.dataset(400, seed=5, empty=0.0, drop=0.0)
    words = set(" ".join(caps).split())
    assert not words & set(world.HELD_OUT), "held-out tokens leak into pretraining captions"
    assert not words & set(world.HELD_OUT.values())
    assert world.parse_prompt("a red circle and a blue sks thing on a gray background") == {
        "objects": [("circle", "red"), ("ring", "blue")], "background": "gray"}


def test_classifier_accuracy_on_fresh_images():
    acc = classifier.accuracy(n=300, seed=777)
    assert all(v >= 0.95 for v in acc.values()), acc  # issue 9's bar; measured 1.000 per head on 1,000 images
    # whole-scene scoring (two objects read half by half) agrees with the true captions
    rng = np.random.default_rng(99)
    ok = 0
    for _ in range(40):
        sc = world.random_scene(rng, world.ALL_SHAPES, two_prob=0.5)
        img = torch.from_numpy(world.render(sc).copy()).float() / 255
        ok += classifier.score(img, world.caption(sc))
    assert ok >= 38


@pytest.fixture(scope="module")
def toy_ckpt(comfy):
    import folder_paths

    toy.register()
    toy.install_checkpoint(os.path.join(folder_paths.models_dir, "checkpoints"))
    loader = comfy["nodes"].NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
    return loader.load_checkpoint(toy.CHECKPOINT_NAME)


def test_weights_load_through_checkpoint_loader(toy_ckpt):
    import comfy.taesd.taesd
    from safetensors import safe_open

    model, clip, vae = toy_ckpt
    assert os.path.getsize(toy.WEIGHTS) < 20e6
    _, sd_cls = toy.classes()
    assert isinstance(model.model.model_config, sd_cls)
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    # every stored tensor reached the loaded modules (ComfyUI layers skip init: a missed key is garbage)
    with safe_open(toy.WEIGHTS, "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    unet_sd = model.model.diffusion_model.state_dict()
    for k, v in stored.items():
        if k.startswith("model.diffusion_model."):
            assert torch.equal(unet_sd[k[len("model.diffusion_model."):]].to(v.dtype), v), k
    emb = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight
    assert emb.shape == (49408, toy.CONTEXT_DIM)
    assert torch.equal(emb.to(torch.float16), stored["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])
    cond = clip.encode_from_tokens(clip.tokenize("a red circle"))
    assert cond.shape == (1, 77, toy.CONTEXT_DIM)
    # the VAE is a working codec of the world: 64x64 image <-> 8x8x4 latent
    imgs, _ = world.dataset(8, seed=21)
    x = torch.from_numpy(imgs).float() / 255
    lat = vae.encode(x)
    assert lat.shape == (8, 4, 8, 8)
    rec = vae.decode(lat)
    psnr = -10 * torch.log10((rec - x).pow(2).mean())
    # an untrained TAESD gives about 4 dB, the committed one about 30 dB (README)
    assert psnr > 26, f"VAE round trip PSNR {psnr:.1f} dB"


def test_base_model_follows_prompts_and_lacks_held_out_concept(toy_ckpt):
    from toyworld import evaluate

    model, clip, vae = toy_ckpt
    prompts = evaluate.world_prompts(12, seed=1)  # a quarter of them two-object prompts
    acc, hits = evaluate.prompt_accuracy(model, clip, vae, prompts, n=2, seed=0, steps=15, cfg=5.0)
    assert acc >= 0.8, hits  # issue 9's bar; README: 0.966 on 88 samples at 20 steps
    for token in world.HELD_OUT:  # the held-out shapes are not produced before fine-tuning
        assert evaluate.concept_rate(model, clip, vae, token, n=8, seed=0, steps=15) <= 0.125, token


SVDIFF_STEPS = 300
SVDIFF_LR = 3e-2


def test_short_svdiff_run_moves_concept_accuracy_up(toy_ckpt):
    """SVDiff Train (UNet subset, 4 images of the held-out ring, fixed seed) teaches "a sks thing"."""
    from svdiff_testkit.comfy_env import pack_module

    from toyworld import evaluate

    model, clip, vae = toy_ckpt
    imgs, caps = world.concept_images("sks", 4, seed=0)
    images = torch.from_numpy(imgs.copy()).float() / 255
    before = evaluate.concept_rate(model, clip, vae, "sks", n=6, seed=5, steps=12)
    a = train_inputs(toy_ckpt, images=[images], prompt=caps[0], class_prompt="a thing", steps=SVDIFF_STEPS, batch_size=4,
                     learning_rate=SVDIFF_LR, filename_prefix="svdiff/test_toyworld")
    with torch.inference_mode():
        tuned = pack_module("nodes.train").train(a)[0]
    after = evaluate.concept_rate(tuned, clip, vae, "sks", n=6, seed=5, steps=12)
    print(f"\"a sks thing\" read as {world.HELD_OUT['sks']}: {before:.2f} -> {after:.2f}")
    assert after >= before + 0.3, (before, after)  # measured: see tools/toyworld/README.md


def test_prior_preservation_keeps_the_model_near_the_base_on_its_world(toy_ckpt):
    """Eq. 3 on a pretrained base: fine-tuning on 4 images of the held-out concept moves the
    denoising loss on held-out images of the model's own world (their own captions, never
    trained on) less with the prior term (lambda = 1) than without it (lambda = 0)."""
    from svdiff_testkit.comfy_env import pack_module

    T = pack_module("nodes.train")
    model, clip, vae = toy_ckpt
    imgs, caps = world.concept_images("sks", 4, seed=0)
    images = torch.from_numpy(imgs.copy()).float() / 255

    def args(prior_weight):
        return train_inputs(toy_ckpt, images=[images], prompt=caps[0], class_prompt="a red circle on a blue background",
                            prior_weight=prior_weight, num_prior_images=4, prior_steps=12, steps=PRIOR_TEST_STEPS,
                            batch_size=2, learning_rate=SVDIFF_LR, filename_prefix="svdiff/test_toyworld_prior")

    with torch.inference_mode():
        m0 = T.train(args(0.0))[0]
        m1 = T.train(args(1.0))[0]
        held, held_caps = world.dataset(8, seed=21, drop=0.0, empty=0.0)
        px = torch.from_numpy(held.copy()).float() / 255
        pairs = [(model.model.process_latent_in(vae.encode(px[i : i + 1])).float(), T.encode_prompt(clip, c)) for i, c in enumerate(held_caps)]
        ts = [50, 200, 400, 600, 800, 950]

        def world_loss(m):
            return sum(T.evaluate_denoising_loss(m, lat, e, seed=777, draws=6, timesteps=ts) for lat, e in pairs) / len(pairs)

        base, l0, l1 = world_loss(model), world_loss(m0), world_loss(m1)
    print(f"held-out world denoising loss: base {base:.4f}, lambda=0 {l0:.4f}, lambda=1 {l1:.4f}")
    assert abs(l1 - base) < abs(l0 - base), (base, l0, l1)


PRIOR_TEST_STEPS = 60
