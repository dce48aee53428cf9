"""Negative-prompt guidance (appendix C.3, Eq. 9) against ComfyUI's own CFGGuider."""


import pytest
import torch

import svdiff.guidance as G
from svdiff_testkit.sampling import encode, guider_graph, neg_guider, node, record_post_cfg, sample



# --------------------------------------------------------------------------------------
# Eq. 9 in plain PyTorch
# --------------------------------------------------------------------------------------
def test_blend_limits_and_formula():
    g = torch.Generator().manual_seed(0)
    e, n, c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    assert G.blended_unconditional(e, n, 1.0) is e and G.blended_unconditional(e, None, 1.0) is e
    assert G.blended_unconditional(e, n, 0.0) is n and G.blended_unconditional(None, n, 0.0) is n
    assert torch.allclose(G.blended_unconditional(e, n, 0.3), 0.3 * e + 0.7 * n, atol=1e-6)
    out = G.negative_prompt_guidance(c, e, n, 7.5, 0.3)
    u = 0.3 * e + 0.7 * n
    assert torch.allclose(out, 7.5 * c + (1 - 7.5) * u, atol=1e-5)  # Eq. 8 with Eq. 9
    with pytest.raises(ValueError):
        G.blended_unconditional(e, n, 1.5)
    with pytest.raises(ValueError):
        G.blended_unconditional(e, None, 0.5)


# --------------------------------------------------------------------------------------
# In ComfyUI
# --------------------------------------------------------------------------------------


def cfg_guider(model, pos, neg, cfg):
    return node("CFGGuider").execute(model, pos, neg, cfg).result[0]



@pytest.fixture()
def setup(tiny):
    mp, clip = tiny
    return mp, encode(clip, "photo of a sks dog and a hta sculpture"), encode(clip, "photo of a dog and a sculpture"), encode(clip, "")


def test_beta_limits_equal_comfyui_cfg(comfy, setup):
    mp, pos, neg, empty = setup
    cfg = 5.0
    with torch.inference_mode():
        ref_empty = sample(mp, cfg_guider(mp, pos, empty, cfg))
        ref_neg = sample(mp, cfg_guider(mp, pos, neg, cfg))
        b1 = sample(mp, neg_guider(mp, pos, neg, empty, cfg, 1.0))
        b0 = sample(mp, neg_guider(mp, pos, neg, empty, cfg, 0.0))
        mid = sample(mp, neg_guider(mp, pos, neg, empty, cfg, 0.5))
    assert not torch.allclose(ref_empty, ref_neg, atol=1e-3), "the negative prompt must matter on this model"
    assert torch.allclose(b1, ref_empty, atol=1e-5, rtol=1e-5), (b1 - ref_empty).abs().max()
    assert torch.allclose(b0, ref_neg, atol=1e-5, rtol=1e-5), (b0 - ref_neg).abs().max()
    assert not torch.allclose(mid, ref_empty, atol=1e-4) and not torch.allclose(mid, ref_neg, atol=1e-4)




def test_midway_beta_blends_the_unconditional_branch_as_eq9(comfy, setup):
    mp, pos, neg, empty = setup
    cfg, beta = 4.0, 0.3
    with torch.inference_mode():
        m_e, calls_e = record_post_cfg(mp)
        sample(m_e, cfg_guider(m_e, pos, empty, cfg), steps=1)
        m_n, calls_n = record_post_cfg(mp)
        sample(m_n, cfg_guider(m_n, pos, neg, cfg), steps=1)
        m_b, calls_b = record_post_cfg(mp)
        sample(m_b, neg_guider(m_b, pos, neg, empty, cfg, beta), steps=1)
    first_e, first_n, first_b = calls_e[0], calls_n[0], calls_b[0]  # same x at the first step
    expect_u = beta * first_e["uncond_denoised"] + (1 - beta) * first_n["uncond_denoised"]
    assert torch.allclose(first_b["cond_denoised"], first_e["cond_denoised"], atol=1e-5)
    assert torch.allclose(first_b["uncond_denoised"], expect_u, atol=1e-5)
    expect = expect_u + cfg * (first_b["cond_denoised"] - expect_u)
    assert torch.allclose(first_b["denoised"], expect, atol=1e-5)


@pytest.mark.parametrize("hook", ["RescaleCFG", "TCFG", "post"])
def test_hooks_are_honoured_like_cfgguider(comfy, setup, hook):
    """ComfyUI's own sampler_cfg_function (RescaleCFG), pre-CFG (TCFG) and a post-CFG hook."""
    mp, pos, neg, empty = setup
    cfg = 6.0
    if hook == "RescaleCFG":
        patched = node("RescaleCFG")().patch(mp, 0.7)[0]
    elif hook == "TCFG":
        patched = node("TCFG").execute(mp).result[0]
    else:
        patched = mp.clone()
        patched.set_model_sampler_post_cfg_function(lambda a: a["denoised"] * 0.5 + a["cond_denoised"] * 0.5)
    with torch.inference_mode():
        plain = sample(mp, neg_guider(mp, pos, neg, empty, cfg, 1.0))
        ours1 = sample(patched, neg_guider(patched, pos, neg, empty, cfg, 1.0))
        ref1 = sample(patched, cfg_guider(patched, pos, empty, cfg))
        ours0 = sample(patched, neg_guider(patched, pos, neg, empty, cfg, 0.0))
        ref0 = sample(patched, cfg_guider(patched, pos, neg, cfg))
    assert not torch.allclose(ours1, plain, atol=1e-4), "the hook must change the result"
    assert torch.allclose(ours1, ref1, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours0, ref0, atol=1e-5, rtol=1e-5)


def test_cfg_one_skips_the_unconditional_branch_like_cfgguider(comfy, setup):
    mp, pos, neg, empty = setup
    with torch.inference_mode():
        ref = sample(mp, cfg_guider(mp, pos, empty, 1.0))
        ours = sample(mp, neg_guider(mp, pos, neg, empty, 1.0, 0.5))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_node_schema_and_errors(comfy, setup):
    mp, pos, neg, empty = setup
    N = node("SVDiffNegativeGuider")
    schema = N.define_schema()
    assert all(i.tooltip for i in schema.inputs)
    assert schema.outputs[0].io_type == "GUIDER"
    with pytest.raises(Exception, match=r"\[Negative-Prompt Guider \(Eq. 9\)\] beta"):
        N.execute(mp, pos, neg, empty, 5.0, 1.5)
    with pytest.raises(Exception, match=r"\[Negative-Prompt Guider \(Eq. 9\)\] negative"):
        N.execute(mp, pos, [], empty, 5.0, 0.5)


def test_guider_runs_in_a_comfyui_graph(comfy):
    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import run_prompt

    tiny_mod.install_checkpoint("tiny_sd.safetensors")
    prompt = guider_graph("tiny_sd.safetensors")
    ex, outputs = run_prompt(prompt, prompt_id="guider")
    assert ex.success, ex.status_messages
    assert outputs["12"]["images"]
