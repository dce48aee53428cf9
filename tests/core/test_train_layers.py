"""svdiff.layers / losses / training: the shifted-layer math against explicit references (no ComfyUI)."""

import math

import pytest
import torch
import torch.nn.functional as F

import svdiff.decompose as D
import svdiff.layers as L
import svdiff.losses as LS
import svdiff.training as T


def _layer(w, kind, rank=0, geo=None, route=None, seed=0):
    dec = D.decompose(w, "svd", storage_dtype=torch.float32)
    k = dec.S.shape[0]
    r = rank or k
    g = torch.Generator().manual_seed(seed)
    delta = torch.nn.Parameter(torch.randn(r, generator=g) * dec.S[:r].mean())
    with torch.no_grad():
        delta[0] = -2 * dec.S[0]  # one value clipped by the ReLU: its gradient must be 0
    return L.ShiftedLayer(delta=delta, S=dec.S[:r], U=dec.U[:, :r], Vh=dec.Vh[:r], shape=tuple(w.shape),
                          kind=kind, geo=geo, force_route=route), dec


def _reference_weight(w, dec, delta):
    r = delta.shape[0]
    S = dec.S.clone()
    S2 = S.clone()
    S2[:r] = torch.relu(S[:r] + delta)
    return (dec.U * S2) @ dec.Vh if w.ndim == 2 else ((dec.U * S2) @ dec.Vh).reshape(w.shape)


@pytest.mark.parametrize("route", ["side", "recompose"])
@pytest.mark.parametrize("rank", [0, 3])
def test_linear_routes_match_eq2(route, rank):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 9, generator=g)
    b = torch.randn(12, generator=g)
    x = torch.randn(2, 5, 9, generator=g, requires_grad=True)
    layer, dec = _layer(w, "linear", rank, route=route)
    y = layer.forward(x, w, b)
    # reference: Eq. 2 with plain autograd on a fresh delta
    d2 = layer.delta.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w_res = w + (dec.U[:, : d2.shape[0]] * (torch.relu(dec.S[: d2.shape[0]] + d2) - dec.S[: d2.shape[0]])) @ dec.Vh[: d2.shape[0]]
    y2 = F.linear(x2, w_res, b)
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(w_res, _reference_weight(w, dec, d2.detach()), atol=1e-5)
    gout = torch.randn(y.shape, generator=g)
    (y * gout).sum().backward()
    (y2 * gout).sum().backward()
    assert torch.allclose(layer.delta.grad, d2.grad, atol=1e-4)
    assert layer.delta.grad[0] == 0  # masked by the ReLU
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert layer.route == route


@pytest.mark.parametrize("route", ["side", "recompose"])
def test_conv_routes_match_eq2(route):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    geo = L.ConvGeometry((2, 2), (1, 1), (1, 1), 1)
    x = torch.randn(2, 4, 7, 7, generator=g, requires_grad=True)
    layer, dec = _layer(w, "conv2d", geo=geo, route=route)
    y = layer.forward(x, w, b)
    d2 = layer.delta.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w_res = w + ((dec.U * (torch.relu(dec.S + d2) - dec.S)) @ dec.Vh).reshape(w.shape)
    y2 = F.conv2d(x2, w_res, b, 2, 1)
    assert torch.allclose(y, y2, atol=1e-4)
    gout = torch.randn(y.shape, generator=g)
    (y * gout).sum().backward()
    (y2 * gout).sum().backward()
    assert torch.allclose(layer.delta.grad, d2.grad, rtol=1e-4, atol=1e-3)
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    assert layer.tokens == 2 * 4 * 4


def test_frozen_layers_accept_inference_weights_and_give_input_grads():
    with torch.inference_mode():
        w = torch.randn(5, 3)
        wc = torch.randn(4, 2, 3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    L.frozen_forward("linear", x, w, None).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(2, 3))
    xc = torch.randn(1, 2, 5, 5, requires_grad=True)
    geo = L.ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    y = L.frozen_forward("conv2d", xc, wc, None, geo)
    y.sum().backward()
    xr = xc.detach().clone().requires_grad_(True)
    F.conv2d(xr, wc.clone(), None, 1, 1).sum().backward()
    assert torch.allclose(xc.grad, xr.grad, atol=1e-5)


def test_zero_delta_is_exactly_the_base_layer():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 8, generator=g)
    x = torch.randn(4, 8, generator=g)
    for route in ("side", "recompose"):
        layer, _ = _layer(w, "linear", route=route)
        with torch.no_grad():
            layer.delta.zero_()
        assert torch.equal(layer.forward(x, w, None), F.linear(x, w))


def test_cost_model_prefers_side_path_for_few_tokens_and_big_matrices():
    assert L.choose_route(1280, 11520, 1280, 128) == "side"  # deep conv at 8x8 latents
    assert L.choose_route(320, 768, 320, 154) == "side"  # cross-attention K/V on 77-token text
    assert L.choose_route(320, 320, 320, 8192) == "recompose"  # square 320 layer on 4096 tokens x 2
    c = L.route_costs(10, 20, 5, 7)
    assert c == {"recompose": 2 * 10 * 20 * 5 + 10 * 20 * 7, "side": 2 * 30 * 5 * 7}


def test_losses_targets():
    x0 = torch.randn(2, 4, 3, 3)
    eps = torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.5, 2.0])
    # eps-model: x0_hat = x - sigma*eps_hat with x = x0 + sigma*eps; a perfect eps_hat gives zero loss
    xt = x0 + sigma[:, None, None, None] * eps
    eps_hat = eps + 0.1
    x0_hat = xt - sigma[:, None, None, None] * eps_hat
    assert math.isclose(float(LS.denoising_loss(x0_hat, x0, sigma, "eps")), 0.01, rel_tol=1e-4)
    # v-model (sigma_data = 1): error on v
    sd = 1.0
    s = sigma[:, None, None, None]
    v = (eps * sd**2 - x0 * s) / (s**2 + sd**2) ** 0.5 * 1.0  # k-diffusion v for x = x0 + s*eps
    v_hat = v + 0.2
    x0_hat_v = xt * sd**2 / (s**2 + sd**2) - v_hat * s * sd / (s**2 + sd**2) ** 0.5
    x0_true = xt * sd**2 / (s**2 + sd**2) - v * s * sd / (s**2 + sd**2) ** 0.5
    assert torch.allclose(x0_true, x0, atol=1e-5)
    assert math.isclose(float(LS.denoising_loss(x0_hat_v, x0, sigma, "v")), 0.04, rel_tol=1e-3)
    assert float(LS.svdiff_loss(torch.tensor(1.0), torch.tensor(2.0), 0.5)) == 2.0
    assert float(LS.svdiff_loss(torch.tensor(1.0), torch.tensor(2.0), 0.0)) == 1.0


def test_step_randomness_depends_only_on_seed_and_step():
    a = T.data_indices(5, 7, 2, 3)
    assert a == T.data_indices(5, 7, 2, 3)
    # every epoch visits each sample once
    seen = [T.data_indices(5, s, 1, 3)[0] for s in range(3)]
    assert sorted(seen) == [0, 1, 2]
    n1 = torch.randn(4, generator=T.generator(1, 10, T.STREAM_NOISE))
    n2 = torch.randn(4, generator=T.generator(1, 10, T.STREAM_NOISE))
    n3 = torch.randn(4, generator=T.generator(1, 11, T.STREAM_NOISE))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
