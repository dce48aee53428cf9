"""DDIM Invert / DDIM Sampler (η) / Slerp Noise on flow-matching models: the tiny SD3.5 and Flux
built in ComfyUI's own classes (``svdiff_testkit.families``), ModelSamplingDiscreteFlow /
ModelSamplingFlux with their shifts, 16-channel latents.

ComfyUI starts a flow model from ``sigma0 * noise + (1 - sigma0) * latent``, so an inverted
latent goes back in through SamplerCustomAdvanced with DDIM Invert's NOISE (which makes the
sampler start at its latent_image), its SIGMAS and its LATENT.  Unlike the SD1 tests no
damping wrapper is needed: the tiny DiTs' velocities are smooth enough for the fixed point.
"""

import math

import pytest
import torch

FAMS = ["Flux", "SD3"]
STEPS = 8


def _res(out):
    return out.result if hasattr(out, "result") else out


def inversion():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("svdiff.inversion")


def editing():
    from svdiff_testkit.comfy_env import pack_module

    return pack_module("nodes.editing")


@pytest.fixture(scope="module", params=FAMS)
def flow(comfy, request):
    """(family name, MODEL, CONDITIONING of a prompt) of a tiny flow-matching family."""
    import comfy.model_patcher
    import nodes
    from svdiff_testkit import families

    model, clip = families.build(request.param)
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    pos = nodes.CLIPTextEncode().encode(clip, "a photo of a red chair")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    assert families.FAMILIES[request.param].latent_channels == 16
    return request.param, mp, pos, neg


def unit_latent(mp, seed, shape=(1, 16, 8, 8)):
    """A raw LATENT whose model-space values (after the family's process_latent_in) are unit Gaussian."""
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return {"samples": mp.model.process_latent_out(z)}, z


def model_space(mp, latent):
    return mp.model.process_latent_in(latent["samples"])


def invert(mp, pos, latent, refine, start=0, steps=STEPS, scheduler="simple"):
    with torch.inference_mode():
        return _res(editing().SVDiffDDIMInvert.execute(mp, pos, latent, steps, 1.0, scheduler, start, 10000, refine))


def sample_back(mp, pos, noise, sigmas, latent, sampler="euler", eta=None):
    """SamplerCustomAdvanced(noise, BasicGuider(pos), sampler, sigmas, latent)."""
    from comfy_extras.nodes_custom_sampler import BasicGuider, KSamplerSelect, SamplerCustomAdvanced

    with torch.inference_mode():
        guider = _res(BasicGuider.execute(mp, pos))[0]
        s = _res(KSamplerSelect.execute(sampler))[0] if eta is None else _res(editing().SVDiffDDIMSampler.execute(eta, 3))[0]
        return _res(SamplerCustomAdvanced.execute(noise, guider, s, sigmas, latent))[0]


def test_flow_invert_then_sample_reconstructs(flow):
    import comfy.samplers

    name, mp, pos, _ = flow
    lat, z = unit_latent(mp, 0)
    inv0, sig0, noise0 = invert(mp, pos, lat, 0)
    inv3, sig3, noise3 = invert(mp, pos, lat, 3)
    expect = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "simple", STEPS).float()
    assert torch.equal(sig3.cpu(), expect) and float(sig3[0]) == 1.0 and float(sig3[-1]) == 0.0
    assert inv3["svdiff_sigma"] == 1.0
    # the inversion really went to noise: far from the image, at about the noise's unit scale
    x1 = model_space(mp, inv3)
    assert (x1 - z).abs().mean() > 0.3 and 0.7 < x1.std().item() < 2.0
    e_plain = (model_space(mp, sample_back(mp, pos, noise0, sig0, inv0)) - z).abs().mean().item()
    back = sample_back(mp, pos, noise3, sig3, inv3)
    e_ref = (model_space(mp, back) - z).abs().mean().item()
    # a mismatched start: the refined inversion's latent sampled with another prompt's path
    # (fresh noise at alpha 1 is the extreme; the half-way slerp is a milder mismatch)
    half = _res(editing().SVDiffSlerpNoise.execute(inv3, mp, 0.5, 1, sigmas=sig3))[0]
    e_mis = (model_space(mp, sample_back(mp, pos, noise3, sig3, half)) - z).abs().mean().item()
    print(f"\n{name} round trip (model-space mean |err|, {STEPS} steps): plain {e_plain:.3e}, refined(3) {e_ref:.3e}, "
          f"ratio {e_plain / e_ref:.1f}; slerp 0.5 start {e_mis:.3e}")
    assert e_ref < 0.01
    assert e_ref * 10 <= e_plain < 0.5
    assert e_mis > 3 * e_plain and e_mis > 100 * e_ref
    # the η sampler at η = 0 takes the same Euler steps: the same reconstruction, bit for bit
    assert torch.equal(sample_back(mp, pos, noise3, sig3, inv3, eta=0.0)["samples"], back["samples"])


def test_flow_partial_inversion(flow):
    name, mp, pos, _ = flow
    lat, z = unit_latent(mp, 1)
    start = 6
    inv, sig, noise = invert(mp, pos, lat, 3, start=start)
    t0 = float(sig[0])
    assert 0.1 < t0 < 0.6 and len(sig) == STEPS - start + 1 and inv["svdiff_sigma"] == t0
    back = sample_back(mp, pos, noise, sig, inv)
    err = (model_space(mp, back) - z).abs().mean().item()
    assert err < 0.01, (name, err)
    # a partial inversion stays much closer to the image than a full one
    x_t = model_space(mp, inv)
    assert (x_t - z).abs().mean() < 0.6 * (model_space(mp, invert(mp, pos, lat, 3)[0]) - z).abs().mean()


def test_flow_eta0_equals_comfy_euler_bit_for_bit(flow):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, SamplerCustom

    name, mp, pos, neg = flow
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        sig = _res(BasicScheduler.execute(mp, "simple", 5, 1.0))[0]
        ours = _res(editing().SVDiffDDIMSampler.execute(0.0, 123))[0]
        euler = _res(KSamplerSelect.execute("euler"))[0]
        a = _res(SamplerCustom.execute(mp, True, 7, 3.0, pos, neg, ours, sig, lat))[0]["samples"]
        b = _res(SamplerCustom.execute(mp, True, 7, 3.0, pos, neg, euler, sig, lat))[0]["samples"]
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b), (name, (a - b).abs().max())


def test_flow_eta_is_seeded_and_adds_the_ddim_noise(flow):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    name, mp, pos, _ = flow
    full = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "simple", STEPS)
    i = 2
    sig = full[i: i + 2].clone()
    t, tp = float(sig[0]), float(sig[1])
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))  # model space, at t

    def one_step(eta, seed):
        # SamplerCustom without noise starts a flow model at (1 - t) * latent and divides the
        # result by (1 - t'): feed x / (1 - t) and read back times (1 - t')
        raw = {"samples": mp.model.process_latent_out(x / (1 - t))}
        with torch.inference_mode():
            s = _res(editing().SVDiffDDIMSampler.execute(eta, seed))[0]
            out = _res(SamplerCustom.execute(mp, False, 0, 1.0, pos, pos, s, sig, raw))[0]
        return model_space(mp, out) * (1 - tp)

    eta = 0.7
    a1, a2, b, det = one_step(eta, 11), one_step(eta, 11), one_step(eta, 12), one_step(0.0, 11)
    assert torch.equal(a1, a2) and not torch.equal(a1, b)
    # two seeds differ by u * (z1 - z2): std sqrt(2) u, u = eta t' sqrt(1 - q^2) (DDIM Eq. 16 in the flow latent)
    q = tp * (1 - t) / (t * (1 - tp))
    u = eta * tp * math.sqrt(1 - q * q)
    measured = ((a1 - b).std() / math.sqrt(2)).item()
    assert measured == pytest.approx(u, rel=0.05), (name, measured, u)
    # the mean of the η step is (1-t') x0_hat + d eps_hat: not the η = 0 step, and the same x0_hat
    assert (a1 - det).abs().mean() > 0.1 * u


def test_flow_slerp_end_points_and_scale(flow):
    import comfy.sample

    name, mp, pos, _ = flow
    lat, z = unit_latent(mp, 2, (2, 16, 8, 8))
    inv, sig, noise = invert(mp, pos, lat, 1)
    slerp = editing().SVDiffSlerpNoise.execute
    with torch.inference_mode():
        out0 = _res(slerp(inv, mp, 0.0, 3))[0]
        out1 = _res(slerp(inv, mp, 1.0, 3))[0]
        half = _res(slerp(inv, mp, 0.5, 3, sigmas=sig))[0]
    assert torch.equal(out0["samples"], inv["samples"])
    eps = comfy.sample.prepare_noise(inv["samples"], 3)
    # at t = 1 fresh noise is the unit Gaussian itself, no sigma factor
    assert torch.allclose(model_space(mp, out1), eps, atol=1e-5)
    x1, xh = model_space(mp, inv), model_space(mp, half)
    n_in, n_half = x1.reshape(2, -1).norm(dim=1), xh.reshape(2, -1).norm(dim=1)
    n_eps = eps.reshape(2, -1).norm(dim=1)
    assert ((n_half > 0.9 * torch.minimum(n_in, n_eps)) & (n_half < 1.1 * torch.maximum(n_in, n_eps))).all()
    # at t = 1 it is Eq. 7 itself on the model-space latent and the noise (c(1) = 1: no rescaling)
    assert torch.allclose(xh, inversion().slerp(0.5, x1, eps), atol=1e-4)
    # a partial inversion at t < 1: alpha 1 is fresh noise at the latent's scale c(t)
    inv_p, sig_p, _ = invert(mp, pos, lat, 1, start=4)
    t = float(sig_p[0])
    with torch.inference_mode():
        outp = _res(slerp(inv_p, mp, 1.0, 3))[0]
    c = math.hypot(1 - t, t)
    assert torch.allclose(model_space(mp, outp), eps * c, atol=1e-5)
    # an eps-model sigma (> 1) is refused for a flow model, naming the sigmas
    from svdiff_testkit.comfy_env import pack_module

    with pytest.raises(pack_module("nodes.common").SVDiffNodeError, match=r"\[Slerp Noise\] sigmas: .*\[0, 1\]"):
        slerp(inv, mp, 0.5, 3, sigmas=torch.tensor([14.6, 0.0]))


def test_flow_edit_pipeline_with_slerp_and_eta(flow):
    """Invert -> Slerp Noise (0.3) -> SamplerCustomAdvanced with the η sampler (0.5): finite, seeded,
    and closer to the image than sampling from fresh noise."""
    name, mp, pos, _ = flow
    lat, z = unit_latent(mp, 3)
    inv, sig, noise = invert(mp, pos, lat, 2)
    with torch.inference_mode():
        mixed = _res(editing().SVDiffSlerpNoise.execute(inv, mp, 0.3, 4))[0]
        fresh = _res(editing().SVDiffSlerpNoise.execute(inv, mp, 1.0, 4))[0]
    a = sample_back(mp, pos, noise, sig, mixed, eta=0.5)["samples"]
    b = sample_back(mp, pos, noise, sig, mixed, eta=0.5)["samples"]
    f = sample_back(mp, pos, noise, sig, fresh, eta=0.5)["samples"]
    assert torch.isfinite(a).all() and torch.equal(a, b)
    da = (mp.model.process_latent_in(a) - z).abs().mean()
    df = (mp.model.process_latent_in(f) - z).abs().mean()
    assert da < df, (name, da.item(), df.item())


def test_start_at_latent_noise_is_zero_for_eps_models(tiny):
    import nodes

    mp, clip = tiny
    pos = nodes.CLIPTextEncode().encode(clip, "x")[0]
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / 0.18215}
    with torch.inference_mode():
        _, _, noise = _res(editing().SVDiffDDIMInvert.execute(mp, pos, lat, 2, 1.0, "normal", 0, 10000, 0))
    n = noise.generate_noise(lat)
    assert n.shape == lat["samples"].shape and not n.any() and noise.seed == 0


def _refusal_models(mp):
    """(model, what the error must name) for every prediction type the editing nodes refuse."""
    import comfy.model_sampling as cms
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    out = [(ModelSamplingDiscrete().patch(mp, "x0", False)[0], "x0 prediction"),
           (ModelSamplingDiscrete().patch(mp, "lcm", False)[0], "LCM")]
    if hasattr(cms, "IMG_TO_IMG_FLOW"):  # ComfyUI 0.33: output = result, noise_scaling = latent
        class ImgToImgFlow(cms.ModelSamplingDiscreteFlow, cms.IMG_TO_IMG_FLOW):
            pass

        m = mp.clone()
        m.add_object_patch("model_sampling", ImgToImgFlow())
        out.append((m, "IMG_TO_IMG_FLOW"))
    return out


def test_unsupported_kinds_are_refused_by_all_three_nodes(tiny):
    import comfy.model_sampling as cms
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom
    from svdiff_testkit.comfy_env import pack_module

    import nodes

    if not hasattr(cms, "IMG_TO_IMG_FLOW"):
        print("IMG_TO_IMG_FLOW: this ComfyUI has no such model sampling (0.33 adds it); x0 and LCM are checked")
    err = pack_module("nodes.common").SVDiffNodeError
    mp, clip = tiny
    pos = nodes.CLIPTextEncode().encode(clip, "x")[0]
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) / 0.18215}
    good, _, _ = invert(mp, pos, lat, 0, steps=2, scheduler="normal")
    for m, kind in _refusal_models(mp):
        with pytest.raises(err, match=r"\[DDIM Invert\] model: .*ε- or v-prediction.*flow-matching.*" + kind):
            invert(m, pos, lat, 0, steps=2, scheduler="normal")
        with pytest.raises(err, match=r"\[Slerp Noise\] model: .*" + kind):
            editing().SVDiffSlerpNoise.execute(good, m, 0.5, 0)
        with torch.inference_mode():
            sig = _res(BasicScheduler.execute(m, "simple", 2, 1.0))[0]
            sampler = _res(editing().SVDiffDDIMSampler.execute(0.5, 0))[0]
            with pytest.raises(err, match=r"\[DDIM Sampler \(η\)\] model: .*" + kind):
                SamplerCustom.execute(m, True, 0, 1.0, pos, pos, sampler, sig, {"samples": torch.zeros(1, 4, 8, 8)})
