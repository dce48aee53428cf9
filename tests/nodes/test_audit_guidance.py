"""Paper audit: several weighted negative prompts in the Negative-Prompt Guider (appendix C.3, Eq. 9).

The unconditional branch is beta * eps(empty) + (1 - beta) * sum_i w_i eps(c_neg_i) / sum_i w_i.
"""

import pytest
import torch

import svdiff.guidance as G
from svdiff_testkit.sampling import encode, guider_graph, neg_guider, node, record_post_cfg, sample

NODE = r"\[Negative-Prompt Guider \(Eq. 9\)\] "


# --------------------------------------------------------------------------------------
# Plain PyTorch
# --------------------------------------------------------------------------------------
def test_weighted_negative_formula_and_limits():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    assert G.weighted_negative([a], [0.7]) is a
    assert G.weighted_negative([a, b], [3.0, 0.0]) is a
    assert G.weighted_negative([a, None], [3.0, 0.0]) is a  # a left-out negative need not be evaluated
    assert G.weighted_negative([None, b], [0.0, 2.0]) is b
    assert torch.allclose(G.weighted_negative([a, b], [1.0, 1.0]), (a + b) / 2, atol=1e-6)
    assert torch.allclose(G.weighted_negative([a, b, c], [2.0, 1.0, 1.0]), (2 * a + b + c) / 4, atol=1e-6)
    for bad in ([0.0, 0.0], [1.0, -1.0], [1.0, float("nan")], [1.0, float("inf")]):
        with pytest.raises(ValueError):
            G.weighted_negative([a, b], bad)
    with pytest.raises(ValueError):
        G.weighted_negative([a, b], [1.0])
    with pytest.raises(ValueError):
        G.weighted_negative([a, None], [1.0, 1.0])


# --------------------------------------------------------------------------------------
# In ComfyUI
# --------------------------------------------------------------------------------------





@pytest.fixture()
def setup(tiny):
    mp, clip = tiny
    texts = ("photo of a sks dog and a hta sculpture", "photo of a dog and a sculpture", "blurry, stitched", "")
    return (mp, *(encode(clip, t) for t in texts))


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_a_zero_weight_negative_changes_nothing(comfy, setup, beta):
    mp, pos, neg_a, neg_b, empty = setup
    cfg = 5.0
    with torch.inference_mode():
        one_a = sample(mp, neg_guider(mp, pos, neg_a, empty, cfg, beta))
        one_b = sample(mp, neg_guider(mp, pos, neg_b, empty, cfg, beta))
        a_0 = sample(mp, neg_guider(mp, pos, neg_a, empty, cfg, beta, negative_2=neg_b, weight_1=0.6, weight_2=0.0))
        o_b = sample(mp, neg_guider(mp, pos, neg_a, empty, cfg, beta, negative_2=neg_b, weight_1=0.0, weight_2=2.0))
    assert not torch.allclose(one_a, one_b, atol=1e-3), "the two negatives must differ on this model"
    assert torch.equal(a_0, one_a)
    assert torch.equal(o_b, one_b)


@pytest.mark.parametrize(("beta", "w"), [(0.0, (1.0, 1.0)), (0.3, (1.0, 1.0)), (0.3, (2.0, 1.0))])
def test_two_negatives_blend_as_the_weighted_mean(comfy, setup, beta, w):
    mp, pos, neg_a, neg_b, empty = setup
    cfg = 4.0
    with torch.inference_mode():
        m_a, calls_a = record_post_cfg(mp)
        sample(m_a, neg_guider(m_a, pos, neg_a, empty, cfg, beta), steps=1)
        m_b, calls_b = record_post_cfg(mp)
        sample(m_b, neg_guider(m_b, pos, neg_b, empty, cfg, beta), steps=1)
        m_2, calls_2 = record_post_cfg(mp)
        sample(m_2, neg_guider(m_2, pos, neg_a, empty, cfg, beta, negative_2=neg_b, weight_1=w[0], weight_2=w[1]), steps=1)
    ua, ub, u2 = calls_a[0]["uncond_denoised"], calls_b[0]["uncond_denoised"], calls_2[0]["uncond_denoised"]
    assert (ua - ub).abs().max() > 0.1, "the two negatives must differ far beyond the tolerance below"
    # beta e + (1 - beta) (w_a n_a + w_b n_b) / (w_a + w_b) is the same weighted mean of the one-negative blends
    expect = (w[0] * ua + w[1] * ub) / (w[0] + w[1])
    # float tolerance: a larger batch in calc_cond_batch changes eps-hat's last bits (~2e-6), and the
    # denoised x - sigma * eps-hat scales that by sigma (14.6 at the first step)
    assert torch.allclose(u2, expect, atol=1e-4, rtol=1e-5), (u2 - expect).abs().max()
    c2 = calls_2[0]["cond_denoised"]
    assert torch.allclose(c2, calls_a[0]["cond_denoised"], atol=1e-4, rtol=1e-5), (c2 - calls_a[0]["cond_denoised"]).abs().max()
    assert torch.allclose(calls_2[0]["denoised"], expect + cfg * (c2 - expect), atol=1e-4, rtol=1e-5)


def test_all_negatives_in_one_batched_call(comfy, setup, monkeypatch):
    import comfy.samplers

    mp, pos, neg_a, neg_b, empty = setup
    seen = []
    real = comfy.samplers.calc_cond_batch

    def counting(model, conds, *args, **kwargs):
        seen.append(len(conds))
        return real(model, conds, *args, **kwargs)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", counting)
    with torch.inference_mode():
        sample(mp, neg_guider(mp, pos, neg_a, empty, 5.0, 0.5, negative_2=neg_b, negative_3=neg_a, weight_3=0.5), steps=2)
    assert seen == [5, 5]  # positive, three negatives, empty: one call per step


def test_node_schema_and_weight_errors(comfy, setup):
    mp, pos, neg_a, neg_b, empty = setup
    N = node("SVDiffNegativeGuider")
    schema = N.define_schema()
    by_id = {i.id: i for i in schema.inputs}
    for name in ("negative_2", "negative_3", "negative_4", "weight_1", "weight_2", "weight_3", "weight_4"):
        assert by_id[name].optional and by_id[name].tooltip
    assert "sum" in by_id["weight_1"].tooltip.lower()
    assert [i.id for i in schema.inputs][:6] == ["model", "positive", "negative", "empty", "cfg", "beta"]
    with pytest.raises(Exception, match=NODE + r"weight_1, weight_2: .*zero"):
        N.execute(mp, pos, neg_a, empty, 5.0, 0.5, negative_2=neg_b, weight_1=0.0, weight_2=0.0)
    with pytest.raises(Exception, match=NODE + r"weight_1: .*zero"):
        N.execute(mp, pos, neg_a, empty, 5.0, 0.5, weight_1=0.0, weight_2=1.0)  # negative_2 not connected
    with pytest.raises(Exception, match=NODE + r"weight_2: "):
        N.execute(mp, pos, neg_a, empty, 5.0, 0.5, negative_2=neg_b, weight_2=-1.0)
    with pytest.raises(Exception, match=NODE + r"negative_3: .*empty"):
        N.execute(mp, pos, neg_a, empty, 5.0, 0.5, negative_3=[])


def test_several_negatives_in_a_comfyui_graph(comfy):
    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import run_prompt

    tiny_mod.install_checkpoint("tiny_sd.safetensors")
    prompt = guider_graph("tiny_sd.safetensors", negative_2=["13", 0], weight_1=1.0, weight_2=0.5)
    ex, outputs = run_prompt(prompt, prompt_id="guider-several")
    assert ex.success, ex.status_messages
    assert outputs["12"]["images"]
