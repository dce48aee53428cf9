"""Paper audit, single-image editing (Sec. 3.4, Eq. 6-7).

- Slerp Noise without SIGMAS takes the sigma DDIM Invert recorded in its LATENT (not the
  model's sigma_max), and refuses a latent that carries none.
- sigma_data != 1 (EDM-type models): the inversion's evaluation point and the slerp's unit
  scale use sqrt(sigma^2 + sigma_data^2).
"""

import math

import pytest
import torch

import svdiff.inversion as inv

SCALE = 0.18215  # SD1 latent scale factor (process_latent_in multiplies by it)
KEY = "svdiff_sigma"


def _res(out):
    return out.result if hasattr(out, "result") else out


def editing():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.editing")


def node_error():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.common").SVDiffNodeError


def encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def unit_latent(seed, shape=(1, 4, 8, 8), std=1.0):
    """A raw (VAE-scale) latent whose model-space values have standard deviation ``std``."""
    return {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std / SCALE}


def invert(model, pos, latent, steps=20, refine=0, start=0, end=10000, scheduler="ddim_uniform"):
    """DDIM Invert with its defaults (steps 20, cfg 1, ddim_uniform, all steps, no refinement)."""
    with torch.inference_mode():
        return _res(editing().SVDiffDDIMInvert.execute(model, pos, latent, steps, 1.0, scheduler, start, end, refine))[:2]


def slerp(model, latent, alpha, seed, sigmas=None):
    with torch.inference_mode():
        return _res(editing().SVDiffSlerpNoise.execute(latent, model, alpha, seed, sigmas=sigmas))[0]


# ---------------------------------------------------------------------------------------
# Item 2: Slerp Noise without SIGMAS
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_slerp_without_sigmas_uses_the_sigma_the_inversion_recorded(tiny, alpha):
    mp, clip = tiny
    lat, sig = invert(mp, encode(clip, "a photo of a red chair"), unit_latent(0))
    a = slerp(mp, lat, alpha, 3)
    b = slerp(mp, lat, alpha, 3, sig)
    assert torch.equal(a["samples"], b["samples"])
    # SD1.5's schedule at the defaults (20 steps of ddim_uniform) ends at sigma(t=951), not sigma_max
    assert float(sig[0]) == pytest.approx(11.03, abs=0.01)
    assert float(mp.get_model_object("model_sampling").sigma_max) == pytest.approx(14.61, abs=0.01)
    assert lat[KEY] == float(sig[0])


def test_partial_inversion_records_the_sigma_it_ended_at(tiny):
    import comfy.samplers

    mp, clip = tiny
    lat, sig = invert(mp, encode(clip, "a photo of a red chair"), unit_latent(1), steps=20, start=12, end=18)
    assert torch.equal(slerp(mp, lat, 0.7, 5)["samples"], slerp(mp, lat, 0.7, 5, sig)["samples"])
    full = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "ddim_uniform", 20)
    assert lat[KEY] == float(sig[0]) == float(full[12])


def test_slerp_refuses_a_latent_without_a_recorded_sigma(tiny):
    mp, _ = tiny
    with pytest.raises(node_error(), match=r"\[Slerp Noise\] sigmas: "):
        slerp(mp, unit_latent(2), 0.5, 0)
    with pytest.raises(node_error(), match=r"\[Slerp Noise\] sigmas: "):
        slerp(mp, unit_latent(2), 0.5, 0, torch.zeros(0))


def test_slerp_refuses_a_recorded_sigma_whose_latent_was_changed(tiny):
    """A node that copies the LATENT dict and replaces the samples (KSampler, Multiply, ...)
    carries the key along; the sigma then no longer describes the samples."""
    mp, clip = tiny
    lat, sig = invert(mp, encode(clip, "a photo of a red chair"), unit_latent(3), steps=4)
    changed = {**lat, "samples": lat["samples"] * 0.5}
    with pytest.raises(node_error(), match=r"\[Slerp Noise\] sigmas: .*changed"):
        slerp(mp, changed, 0.5, 0)
    # connecting SIGMAS still works, and the slerp's own output records its sigma again
    out = slerp(mp, changed, 0.5, 0, sig)
    assert out[KEY] == float(sig[0])
    assert torch.equal(slerp(mp, out, 0.5, 1)["samples"], slerp(mp, out, 0.5, 1, sig)["samples"])


def test_inverted_latent_flows_through_comfyui_latent_nodes(comfy):
    """ComfyUI's nodes that copy LATENT dicts accept the extra key; batch copies of the
    inverted samples keep the recorded sigma usable."""
    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import run_prompt

    tiny_mod.install_checkpoint("tiny_editing.safetensors", seed=0)
    steps = 3
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_editing.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x8040C0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a purple chair"}},
        "6": {"class_type": "SVDiffDDIMInvert", "inputs": {"model": ["1", 0], "positive": ["5", 0], "latent": ["3", 0], "steps": steps, "cfg": 1.0,
                                                          "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000, "refine_iterations": 0}},
        "7": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["6", 0], "amount": 2}},
        "8": {"class_type": "LatentBatch", "inputs": {"samples1": ["7", 0], "samples2": ["6", 0]}},
        "9": {"class_type": "LatentFromBatch", "inputs": {"samples": ["8", 0], "batch_index": 1, "length": 2}},
        "10": {"class_type": "SVDiffSlerpNoise", "inputs": {"latent": ["9", 0], "model": ["1", 0], "alpha": 0.3, "seed": 1}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["1", 0], "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 1.0,
                                                           "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["5", 0], "negative": ["5", 0],
                                                           "latent_image": ["10", 0], "start_at_step": 0, "end_at_step": 10000,
                                                           "return_with_leftover_noise": "disable"}},
        "12": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["11", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
        "15": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "svdiff_test/inverted"}},
    }
    ex, outputs = run_prompt(prompt, "edit-latent-nodes")
    assert ex.success, ex.status_messages
    assert len(outputs["14"]["images"]) == 2


# ---------------------------------------------------------------------------------------
# Item 3: sigma_data != 1 (EDM-type models), plain PyTorch
# ---------------------------------------------------------------------------------------


def gaussian_denoiser(s2, calls=None):
    """Exact denoiser for data x0 ~ N(0, s2 I): D(x, sigma) = s2 / (s2 + sigma^2) x."""

    def D(x, sigma):
        if calls is not None:
            calls.append((x.clone(), float(sigma)))
        return s2 / (s2 + float(sigma) ** 2) * x

    return D


def karras(n, smin=0.002, smax=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def test_plain_inversion_evaluates_where_the_network_sees_the_same_input():
    """Plain DDIM inversion's z_hi ~ z_lo in the model's unit-variance input x / sqrt(sigma^2 + sigma_data^2)."""
    d = 0.5
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * d
    calls = []
    inv.inverse_step(gaussian_denoiser(d**2, calls), x0, torch.tensor(0.0), torch.tensor(0.7), sigma_data=d)
    x_eval, s = calls[0]
    assert s == pytest.approx(0.7)
    assert torch.allclose(x_eval / math.sqrt(s**2 + d**2), x0 / d, rtol=1e-6, atol=1e-6)


def test_plain_inversion_with_sigma_data_round_trips_gaussian_data_far_closer():
    """For data N(0, sigma_data^2) the flow is x(sigma) = x0 sqrt(sigma^2 + sigma_data^2) / sigma_data, so
    evaluating at the sigma_data-aware point leaves only Euler's own error: the round trip's
    error falls like 1/steps^2 (sigma_data 1 assumed: like 1/steps)."""
    d = 0.5
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * d
    D = gaussian_denoiser(d**2)

    def err(sd, steps):
        sig = karras(steps)
        xT = inv.ddim_invert(D, x0, sig, 0, sigma_data=sd)
        return (inv.ddim_sample(D, xT, sig) - x0).abs().mean().item()

    right, wrong = err(d, 30), err(1.0, 30)
    assert right * 5 < wrong, (right, wrong)
    assert err(d, 12) / right > 5 and err(1.0, 12) / wrong < 3  # (30/12)^2 = 6.25, 30/12 = 2.5


def test_slerp_scale_uses_sigma_data():
    d, s = 0.5, 1.0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = inv.slerp_noise(z, eps, 1.0, s, sigma_data=d)
    assert torch.allclose(out, eps * math.sqrt(s**2 + d**2))
    half = inv.slerp_noise(z, eps, 0.5, s, sigma_data=d)
    assert torch.allclose(half, inv.slerp(0.5, z / math.sqrt(s**2 + d**2), eps) * math.sqrt(s**2 + d**2))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(inv.InversionError, match="sigma_data"):
            inv.slerp_noise(z, eps, 0.5, s, sigma_data=bad)
        with pytest.raises(inv.InversionError, match="sigma_data"):
            inv.inverse_step(gaussian_denoiser(0.25), z, torch.tensor(0.0), torch.tensor(0.7), sigma_data=bad)


# ---------------------------------------------------------------------------------------
# Item 3 in ComfyUI: the tiny model as an EDM-type model (sigma_data 0.5)
# ---------------------------------------------------------------------------------------

SIGMA_DATA = 0.5
SIGMA_MAX = 120.0


def edm_model(mp, k=0.1, calls=None):
    """The tiny model with ComfyUI's own ModelSamplingContinuousEDM ("edm": sigma_data 0.5) and
    its network output F damped by ``k``: D = c_skip x + k c_out F.  A random network's F is
    far rougher than a trained one's; with k small the denoiser is close to the optimal one for
    data N(0, sigma_data^2), as a trained EDM model is at high noise.  ``calls`` records the
    (x, sigma) of every evaluation."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    m = ModelSamplingContinuousEDM().patch(mp, "edm", SIGMA_MAX, 0.002)[0]
    d = SIGMA_DATA

    def wrapper(apply_model, args):
        x, t = args["input"], args["timestep"]
        if calls is not None:
            calls.append((x.clone(), t.clone()))
        c_skip = d**2 / (t.reshape(-1, *[1] * (x.ndim - 1)) ** 2 + d**2)
        return c_skip * x + k * (apply_model(x, t, **args["c"]) - c_skip * x)

    m.set_model_unet_function_wrapper(wrapper)
    return m


def model_err(a, b):
    return ((a["samples"] - b["samples"]) * SCALE).abs().mean().item()


def test_compat_reads_sigma_data(tiny):
    from svdiff_testkit.comfy_env import pack_module

    compat = pack_module("nodes.comfy_compat")
    mp, _ = tiny
    assert compat.sigma_data(mp.get_model_object("model_sampling")) == 1.0
    assert compat.sigma_data(edm_model(mp).get_model_object("model_sampling")) == SIGMA_DATA


def test_edm_inversion_evaluates_at_the_sigma_data_point_and_round_trips(tiny):
    import nodes

    mp, clip = tiny
    pos = encode(clip, "a photo of a red chair")
    lat = unit_latent(4, std=SIGMA_DATA)
    # one step 0 -> sigma_max: the network's input c_in * x is x0 / sigma_data, as at sigma 0
    calls = []
    _, one_sig = invert(edm_model(mp, calls=calls), pos, lat, 1, 0, scheduler="karras")
    x_eval, t = calls[0]
    s = float(t[0])
    assert len(one_sig) == 2 and s == pytest.approx(SIGMA_MAX, rel=1e-5)
    x0 = lat["samples"] * SCALE
    assert torch.allclose(x_eval / math.sqrt(s**2 + SIGMA_DATA**2), x0 / SIGMA_DATA, rtol=1e-5, atol=1e-5)
    m = edm_model(mp)
    steps = 20
    inv_lat, sig = invert(m, pos, lat, steps, 0, scheduler="karras")
    assert inv_lat[KEY] == float(sig[0]) == pytest.approx(SIGMA_MAX, rel=1e-5)

    def back(x):
        with torch.inference_mode():
            return nodes.KSamplerAdvanced().sample(m, "disable", 0, steps, 1.0, "ddim", "karras", pos, pos, x, 0, 10000, "disable")[0]

    e_plain = model_err(back(inv_lat), lat)
    e_ref = model_err(back(invert(m, pos, lat, steps, 4, scheduler="karras")[0]), lat)
    print(f"\nEDM round trip (model-space mean |err|, data std {SIGMA_DATA}): plain {e_plain:.3e}, refined(4) {e_ref:.3e}")
    # sigma_data taken as 1 instead: plain 0.089, refined 1.6e-3
    assert e_plain < 0.04 and e_ref < 1e-3


def test_edm_slerp_endpoint_has_the_models_starting_scale(tiny):
    import comfy.sample

    mp, clip = tiny
    m = edm_model(mp)
    ms = m.get_model_object("model_sampling")
    lat, sig = invert(m, encode(clip, "a photo of a red chair"), unit_latent(5, std=SIGMA_DATA), 3, 0, scheduler="karras")
    eps = comfy.sample.prepare_noise(lat["samples"], 7)
    s = torch.tensor(float(sig[0]))
    z1 = slerp(m, lat, 1.0, 7)["samples"] * SCALE
    # what KSampler starts from at sigma_max (ComfyUI writes sqrt(1 + sigma^2) there; at sigma 120
    # that is sqrt(sigma^2 + sigma_data^2) to 3e-5)
    start = ms.noise_scaling(s, eps, torch.zeros_like(eps), max_denoise=True)
    assert torch.allclose(z1, start, rtol=1e-4, atol=1e-5)
    # exactly: the network sees unit noise, c_in * z = eps
    assert torch.allclose(ms.calculate_input(s, z1), eps, rtol=1e-6, atol=1e-6)
    # and at a low sigma (a partial inversion), where sigma_data matters
    low = torch.tensor([1.0, 0.5, 0.0])
    z_low = slerp(m, lat, 1.0, 7, low)["samples"] * SCALE
    assert torch.allclose(ms.calculate_input(low[0], z_low), eps, rtol=1e-5, atol=1e-5)
