"""DDIM Invert / DDIM Sampler (eta) / Slerp Noise inside a real ComfyUI, on the tiny model.

Reconstruction tests use the tiny random UNet behind ComfyUI's own ``model_function_wrapper``
that scales its noise prediction by ``DAMP`` (x - DAMP * (x - D)).  A random UNet's eps-hat is
far rougher in x than a trained one's (its Jacobian is ~5 / sqrt(1 + sigma^2) against
~1 / sigma); the damping gives it a trained-model-like Lipschitz constant, and it also shows
that the inversion goes through ComfyUI's model patches.  The undamped numbers are in
``bench/bench_inversion.py``.
"""

import math
import os

import pytest
import torch

SCALE = 0.18215  # SD1 latent scale factor (process_latent_in multiplies by it)
DAMP = 0.1


def _res(out):
    return out.result if hasattr(out, "result") else out


def editing():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.editing")


def encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def damped(mp, k=DAMP):
    m = mp.clone()

    def wrapper(apply_model, args):
        x = args["input"]
        return x - k * (x - apply_model(x, args["timestep"], **args["c"]))

    m.set_model_unet_function_wrapper(wrapper)
    return m


def unit_latent(seed, shape=(1, 4, 8, 8)):
    """A raw (VAE-scale) latent whose model-space values have unit std, like a real image's."""
    return {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / SCALE}


def invert(model, pos, latent, steps, refine, start=0, end=10000, cfg=1.0, neg=None, scheduler="ddim_uniform"):
    with torch.inference_mode():
        return _res(editing().SVDiffDDIMInvert.execute(model, pos, latent, steps, cfg, scheduler, start, end, refine, negative=neg))[:2]


def ksampler_back(model, pos, latent, steps, start=0, end=10000, scheduler="ddim_uniform"):
    import nodes

    with torch.inference_mode():
        return nodes.KSamplerAdvanced().sample(model, "disable", 0, steps, 1.0, "ddim", scheduler, pos, pos, latent, start, end, "disable")[0]


def model_err(a, b):
    return ((a["samples"] - b["samples"]) * SCALE).abs().mean().item()


def test_roundtrip_plain_vs_refined(tiny):
    import comfy.samplers

    mp, clip = tiny
    m = damped(mp)
    pos = encode(clip, "a photo of a red chair")
    lat = unit_latent(0)
    steps = 10
    inv0, sig0 = invert(m, pos, lat, steps, 0)
    inv4, sig4 = invert(m, pos, lat, steps, 4)
    expect = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "ddim_uniform", steps)
    assert torch.equal(sig0.cpu(), expect.float()) and len(sig0) == steps + 1
    # the inversion really moved the latent (by about sum(dsigma * eps_hat), eps_hat ~ DAMP * 0.7)
    assert model_err(inv0, lat) > 0.2
    e_plain = model_err(ksampler_back(m, pos, inv0, steps), lat)
    e_ref = model_err(ksampler_back(m, pos, inv4, steps), lat)
    print(f"\nround trip (model-space mean |err|, unit latent, {steps} steps): plain {e_plain:.3e}, refined(4) {e_ref:.3e}, ratio {e_plain / e_ref:.1f}")
    assert e_plain < 0.15
    assert e_ref * 10 <= e_plain
    # SamplerCustom with the SIGMAS output and ComfyUI's "ddim" gives the same reconstruction
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom

    with torch.inference_mode():
        sampler = _res(KSamplerSelect.execute("ddim"))[0]
        back = _res(SamplerCustom.execute(m, False, 0, 1.0, pos, pos, sampler, sig4, inv4))[0]
    assert model_err(back, lat) == pytest.approx(e_ref, rel=1e-4, abs=1e-6)


def test_partial_inversion_matches_ksampler_advanced_start_step(tiny):
    import comfy.samplers

    mp, clip = tiny
    m = damped(mp)
    pos = encode(clip, "a photo of a red chair")
    lat = unit_latent(1)
    steps, start = 8, 4
    inv_lat, sig = invert(m, pos, lat, steps, 4, start=start)
    full = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "ddim_uniform", steps)
    assert torch.equal(sig.cpu(), full[start:].float())
    back = ksampler_back(m, pos, inv_lat, steps, start=start)
    err = model_err(back, lat)
    assert err < 2e-3, err
    # a partial inversion stays much closer to the image than the full one
    assert (inv_lat["samples"] * SCALE).std().item() < 0.5 * math.sqrt(1 + float(full[0]) ** 2)


def test_eta0_equals_comfy_ddim_bit_for_bit(tiny):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, SamplerCustom

    mp, clip = tiny
    pos, neg = encode(clip, "a cat"), encode(clip, "blurry")
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        sig = _res(BasicScheduler.execute(mp, "ddim_uniform", 6, 1.0))[0]
        ours = _res(editing().SVDiffDDIMSampler.execute(0.0, 123))[0]
        ddim = _res(KSamplerSelect.execute("ddim"))[0]
        a = _res(SamplerCustom.execute(mp, True, 7, 3.0, pos, neg, ours, sig, lat))[0]["samples"]
        b = _res(SamplerCustom.execute(mp, True, 7, 3.0, pos, neg, ddim, sig, lat))[0]["samples"]
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b), (a - b).abs().max()


def _one_step(mp, pos, x, sigmas, eta, seed):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    with torch.inference_mode():
        s = _res(editing().SVDiffDDIMSampler.execute(eta, seed))[0]
        return _res(SamplerCustom.execute(mp, False, 0, 1.0, pos, pos, s, sigmas, {"samples": x}))[0]["samples"] * SCALE


def test_eta_reproducible_and_noise_variance_is_ddim(tiny):
    import comfy.samplers

    mp, clip = tiny
    pos = encode(clip, "a cat")
    ms = mp.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", 10)
    g = torch.Generator().manual_seed(5)
    eta = 0.5
    for i in (1, 6):  # a high-noise and a low-noise step
        sig = full[i : i + 2].clone()
        s, sn = float(sig[0]), float(sig[1])
        x = torch.randn(4, 4, 16, 16, generator=g) * math.sqrt(1 + s**2) / SCALE
        a1 = _one_step(mp, pos, x, sig, eta, 11)
        a2 = _one_step(mp, pos, x, sig, eta, 11)
        b = _one_step(mp, pos, x, sig, eta, 12)
        assert torch.equal(a1, a2)
        # two seeds differ only by sigma_up * (z1 - z2): var = 2 sigma_up^2
        # DDIM Eq. 16 in the VP latent, converted to ComfyUI's VE latent by 1 / sqrt(abar_prev)
        a_t, a_p = 1 / (1 + s**2), 1 / (1 + sn**2)
        vp_std = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        expected = vp_std / math.sqrt(a_p)
        measured = ((a1 - b).std() / math.sqrt(2)).item()
        assert measured == pytest.approx(expected, rel=0.05), (i, measured, expected)
        # eta = 0 from the same x: the eta step's mean is the deterministic step to sigma_down
        det = _one_step(mp, pos, x, sig, 0.0, 11)
        assert (a1 - det).abs().mean() > 0


def test_eta_sampler_is_seed_dependent_and_finite_over_a_run(tiny):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom

    mp, clip = tiny
    pos = encode(clip, "a cat")
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        sig = _res(BasicScheduler.execute(mp, "ddim_uniform", 4, 1.0))[0]
        outs = [
            _res(SamplerCustom.execute(mp, True, 3, 1.0, pos, pos, _res(editing().SVDiffDDIMSampler.execute(0.9, sd))[0], sig, lat))[0]["samples"]
            for sd in (1, 1, 2)
        ]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert all(torch.isfinite(o).all() for o in outs)


# ------------------------------- slerp -------------------------------------------------


def slerp(model, latent, alpha, seed, sigmas=None):
    with torch.inference_mode():
        return _res(editing().SVDiffSlerpNoise.execute(latent, model, alpha, seed, sigmas=sigmas))[0]


def test_slerp_node_end_points_norms_and_batch(tiny):
    import comfy.sample

    mp, _ = tiny
    sigma = 8.0
    s = math.sqrt(1 + sigma**2)
    g = torch.Generator().manual_seed(6)
    lat = {"samples": torch.randn(2, 4, 16, 16, generator=g) * s / SCALE}
    sig = torch.tensor([sigma, 1.0, 0.0])
    out0 = slerp(mp, lat, 0.0, 3, sig)
    assert torch.equal(out0["samples"], lat["samples"])
    out1 = slerp(mp, lat, 1.0, 3, sig)
    eps = comfy.sample.prepare_noise(lat["samples"], 3)
    assert torch.allclose(out1["samples"] * SCALE, eps * s, rtol=1e-6, atol=1e-5)
    half = slerp(mp, lat, 0.5, 3, sig)["samples"]
    n_in = lat["samples"].reshape(2, -1).norm(dim=1)
    n_half = half.reshape(2, -1).norm(dim=1)
    assert torch.allclose(n_half / n_in, torch.ones(2), atol=0.08), n_half / n_in
    # it is a real half-way point: equal angles to the input and to the fresh noise
    for i in range(2):
        a = torch.nn.functional.cosine_similarity(half[i].flatten(), lat["samples"][i].flatten(), dim=0)
        b = torch.nn.functional.cosine_similarity(half[i].flatten(), eps[i].flatten(), dim=0)
        assert a.item() == pytest.approx(b.item(), abs=0.03)
    # per-sample: changing sample 1 leaves sample 0 unchanged
    lat2 = {"samples": lat["samples"].clone()}
    lat2["samples"][1] *= -3
    half2 = slerp(mp, lat2, 0.5, 3, sig)["samples"]
    assert torch.equal(half2[0], half[0]) and not torch.equal(half2[1], half[1])
    # without sigmas, a latent that DDIM Invert did not record a noise level in is refused
    with pytest.raises(ValueError, match=r"\[Slerp Noise\] sigmas:"):
        slerp(mp, lat, 1.0, 3)


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_zero_or_nan_latent_gives_clear_errors(tiny, bad):
    from svdiff_testkit.comfy_env import pack_module

    common = pack_module("nodes.common")
    mp, clip = tiny
    lat = unit_latent(2, (2, 4, 8, 8))
    if bad == "zero":
        lat["samples"][1] = 0
    else:
        lat["samples"][0, 1, 2, 3] = float("nan")
    with pytest.raises(common.SVDiffNodeError, match=r"\[Slerp Noise\] latent: .*" + ("zeros" if bad == "zero" else "NaN")):
        slerp(mp, lat, 0.5, 0)
    with pytest.raises(common.SVDiffNodeError, match=r"\[DDIM Invert\] latent: .*" + ("zeros" if bad == "zero" else "NaN")):
        invert(mp, encode(clip, "x"), lat, 2, 0)


def test_cfg_without_negative_is_refused(tiny):
    from svdiff_testkit.comfy_env import pack_module

    common = pack_module("nodes.common")
    mp, clip = tiny
    with pytest.raises(common.SVDiffNodeError, match=r"\[DDIM Invert\] negative:"):
        invert(mp, encode(clip, "x"), unit_latent(3), 2, 0, cfg=3.0)


def test_cfg_inversion_uses_the_negative(tiny):
    mp, clip = tiny
    m = damped(mp)
    pos, neg = encode(clip, "a red chair"), encode(clip, "a green lamp")
    lat = unit_latent(4)
    a, _ = invert(m, pos, lat, 3, 0, cfg=1.0)
    b, _ = invert(m, pos, lat, 3, 0, cfg=4.0, neg=neg)
    assert torch.isfinite(b["samples"]).all() and not torch.equal(a["samples"], b["samples"])


def test_refuses_non_eps_v_models_and_accepts_v_prediction(tiny):
    """x0 prediction is refused by all three nodes (flow matching is supported since
    tests/nodes/test_editing_flow.py; LCM and 0.33's IMG_TO_IMG_FLOW are refused there too)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom
    from svdiff_testkit.comfy_env import pack_module

    common = pack_module("nodes.common")
    mp, clip = tiny
    pos = encode(clip, "x")
    lat = unit_latent(5)
    x0 = ModelSamplingDiscrete().patch(mp, "x0", False)[0]
    vpred = ModelSamplingDiscrete().patch(mp, "v_prediction", False)[0]
    for m, kind in ((x0, "x0 prediction"),):
        with pytest.raises(common.SVDiffNodeError, match=r"\[DDIM Invert\] model: .*ε- or v-prediction.*" + kind):
            invert(m, pos, lat, 2, 0)
        with pytest.raises(common.SVDiffNodeError, match=r"\[Slerp Noise\] model: .*" + kind):
            slerp(m, invert(mp, pos, lat, 2, 0)[0], 0.5, 0)
    with torch.inference_mode():
        sig = _res(BasicScheduler.execute(x0, "simple", 2, 1.0))[0]
        sampler = _res(editing().SVDiffDDIMSampler.execute(0.5, 0))[0]
        with pytest.raises(common.SVDiffNodeError, match=r"\[DDIM Sampler \(η\)\] model: .*x0 prediction"):
            SamplerCustom.execute(x0, True, 0, 1.0, pos, pos, sampler, sig, {"samples": torch.zeros(1, 4, 8, 8)})
    # v-prediction inverts and samples back
    vm = damped(vpred)
    inv_lat, _ = invert(vm, pos, lat, 6, 4)
    assert model_err(ksampler_back(vm, pos, inv_lat, 6), lat) < 0.01


def test_editing_graph_end_to_end(comfy, shift_dir):
    """VAE Encode -> Load Spectral Shift (random, standing in for training) -> DDIM Invert
    (edited prompt) -> Slerp Noise -> KSamplerAdvanced (add_noise disable) -> VAE Decode."""
    import folder_paths
    from PIL import Image

    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import pack_module, run_prompt
    from svdiff.shift import SpectralShift, delta_length

    tiny_mod.install_checkpoint("tiny_editing.safetensors", seed=0)
    mp, _ = tiny_mod.build(0)
    shapes = pack_module("nodes.adapter").shiftable_shapes(mp, "diffusion_model.")
    g = torch.Generator().manual_seed(9)
    keys = sorted(shapes)[:6]
    shift = SpectralShift({k: torch.randn(delta_length(shapes[k]), generator=g) * 0.05 for k in keys}, {k: shapes[k] for k in keys}, {"architecture": "TinySD"})
    path = pack_module("nodes.shifts").save_shift_numbered("test", shift, "editing/test_edit", "float32")
    shift_name = os.path.relpath(path, shift_dir)

    steps = 4
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_editing.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x8040C0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SVDiffLoadShift", "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": shift_name, "strength_model": 1.0, "strength_clip": 1.0}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a photo of a purple chair lying down"}},
        "6": {"class_type": "SVDiffDDIMInvert", "inputs": {"model": ["4", 0], "positive": ["5", 0], "latent": ["3", 0], "steps": steps, "cfg": 1.0,
                                                          "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000, "refine_iterations": 1}},
        "7": {"class_type": "SVDiffSlerpNoise", "inputs": {"latent": ["6", 0], "model": ["4", 0], "alpha": 0.3, "seed": 1, "sigmas": ["6", 1]}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["4", 0], "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 1.0,
                                                          "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["5", 0], "negative": ["5", 0],
                                                          "latent_image": ["7", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    ex, outputs = run_prompt(prompt, "edit-1")
    assert ex.success, ex.status_messages
    imgs = outputs["10"]["images"]
    assert len(imgs) == 1
    info = imgs[0]
    base = folder_paths.get_temp_directory() if info["type"] == "temp" else folder_paths.get_output_directory()
    with Image.open(os.path.join(base, info.get("subfolder", ""), info["filename"])) as im:
        assert im.size == (64, 48)


def test_editing_graph_with_svdiff_train(comfy):
    """The paper's editing pipeline (Fig. 4): SVDiff Train on ONE image-prompt pair without
    prior (lambda = 0), DDIM Invert with the edited prompt, Slerp Noise, KSamplerAdvanced."""
    import folder_paths
    from PIL import Image

    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import run_prompt

    tiny_mod.install_checkpoint("tiny_editing.safetensors", seed=0)
    steps = 4
    train_inputs = {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
        "prompt": "photo of a purple chair standing", "train_text_encoder": False,
        "class_prompt": "", "prior_weight": 0.0, "num_prior_images": 1, "prior_steps": 1,
        "subset": "UNet", "rank": 0, "steps": 3, "batch_size": 1, "learning_rate": 1e-3,
        "learning_rate_1d": 1e-6, "optimizer": "AdamW", "seed": 0, "resolution": 64,
        "gradient_checkpointing": False, "training_dtype": "auto", "side_path": "auto",
        "save_every": 0, "filename_prefix": "editing/train", "resume_from": "[none]",
    }
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_editing.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x8040C0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SVDiffTrain", "inputs": train_inputs},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "photo of a purple chair lying down"}},
        "6": {"class_type": "SVDiffDDIMInvert", "inputs": {"model": ["4", 0], "positive": ["5", 0], "latent": ["3", 0], "steps": steps, "cfg": 1.0,
                                                          "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000, "refine_iterations": 0}},
        "7": {"class_type": "SVDiffSlerpNoise", "inputs": {"latent": ["6", 0], "model": ["4", 0], "alpha": 0.5, "seed": 1, "sigmas": ["6", 1]}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["4", 0], "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 1.0,
                                                          "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["5", 0], "negative": ["5", 0],
                                                          "latent_image": ["7", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    from svdiff_testkit.comfy_env import pack_module

    none = pack_module("nodes.train").NONE
    train_inputs["resume_from"] = none
    ex, outputs = run_prompt(prompt, "edit-train-1")
    assert ex.success, ex.status_messages
    info = outputs["10"]["images"][0]
    base = folder_paths.get_temp_directory() if info["type"] == "temp" else folder_paths.get_output_directory()
    with Image.open(os.path.join(base, info.get("subfolder", ""), info["filename"])) as im:
        assert im.size == (64, 64)
