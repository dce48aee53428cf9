"""Pure math of svdiff.inversion: DDIM(eta) step, inversion (Eq. 6), slerp (Eq. 7). No ComfyUI."""

import math

import pytest
import torch

import svdiff.inversion as inv

# SD1's discrete schedule (scaled-linear betas) gives realistic sigmas without ComfyUI.
_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
_ABAR = torch.cumprod(1 - _BETAS, 0)
_SIGMAS = ((1 - _ABAR) / _ABAR).sqrt()


def schedule(steps):
    """DDIM-uniform-like descending sigmas ending at 0."""
    idx = torch.arange(0, 1000, 1000 // steps).flip(0)
    return torch.cat([_SIGMAS[idx], torch.zeros(1, dtype=torch.float64)]).float()


def gaussian_denoiser(mu, s2, calls=None):
    """Exact denoiser for data x0 ~ N(mu, s2 I): D(x, sigma) = mu + s2/(s2+sigma^2) (x - mu)."""

    def D(x, sigma):
        sigma = float(sigma)
        if calls is not None:
            calls.append(sigma)
        return mu + s2 / (s2 + sigma**2) * (x - mu)

    return D


def nonlinear_denoiser(seed=0, c=4):
    """A smooth non-linear stand-in for a network: D = x - sigma * eps_hat(x / sqrt(1+sigma^2))."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c, c, generator=g) * 0.6
    b = torch.randn(c, generator=g) * 0.3

    def D(x, sigma):
        xin = x / math.sqrt(float(sigma) ** 2 + 1)
        eps = torch.tanh(torch.einsum("oc,bchw->bohw", W, xin) + b[None, :, None, None]) + 0.5 * xin
        return x - float(sigma) * eps

    return D


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_eta_sigmas_are_ddim_eq16(eta):
    # DDIM Eq. 16 in the VP latent, written out here independently of the module
    for t, tp in [(999, 949), (500, 450), (101, 51), (51, 1)]:
        a_t, a_p = float(_ABAR[t]), float(_ABAR[tp])
        vp_std = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        s, sn = math.sqrt((1 - a_t) / a_t), math.sqrt((1 - a_p) / a_p)
        down, up = inv.ddim_eta_sigmas(s, sn, eta)
        # VE noise std times sqrt(abar_prev) is the VP noise std
        assert up * math.sqrt(a_p) == pytest.approx(vp_std, rel=1e-9, abs=1e-12)
        # the deterministic part keeps the total variance at sigma_next^2 (DDIM Eq. 12)
        assert down**2 + up**2 == pytest.approx(sn**2, rel=1e-9)
        # DDIM Eq. 12's eps coefficient sqrt(1 - abar_prev - std^2), divided by sqrt(abar_prev)
        assert down == pytest.approx(math.sqrt(1 - a_p - vp_std**2) / math.sqrt(a_p), rel=1e-7)


def test_eta_zero_and_last_step_are_deterministic():
    assert inv.ddim_eta_sigmas(3.0, 1.0, 0.0) == (1.0, 0.0)
    assert inv.ddim_eta_sigmas(3.0, 0.0, 0.9) == (0.0, 0.0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(inv.InversionError):
            inv.ddim_eta_sigmas(3.0, 1.0, bad)


def test_ddim_sample_eta_adds_exactly_sigma_up_noise():
    D = nonlinear_denoiser()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 14.6
    sig = schedule(5)[:3]  # two steps
    zs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    got = inv.ddim_sample(D, x, sig, eta=0.7, noise=lambda i: zs[i])
    # by hand: x0 + sigma_down * eps_hat + sigma_up * z
    y = x
    for i in range(2):
        s, sn = float(sig[i]), float(sig[i + 1])
        den = D(y, sig[i])
        eps = (y - den) / s
        down, up = inv.ddim_eta_sigmas(s, sn, 0.7)
        y = den + down * eps + up * zs[i]
    assert torch.allclose(got, y, rtol=1e-5, atol=1e-4)
    # eta = 0 is plain Euler, bit for bit
    det = inv.ddim_sample(D, x, sig, eta=0.0)
    y = x
    for i in range(2):
        d = (y - D(y, sig[i])) / sig[i]
        y = y + d * (sig[i + 1] - sig[i])
    assert torch.equal(det, y)


def test_inversion_never_evaluates_at_sigma_zero_and_roundtrips_linear_model():
    calls = []
    D = gaussian_denoiser(0.3, 0.8, calls)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sig = schedule(10)
    xT = inv.ddim_invert(D, x0, sig, refine_iterations=0)
    assert min(calls) > 0 and len(calls) == 10
    assert xT.std() > 5 * x0.std()  # it really went to high noise
    back = inv.ddim_sample(D, xT, sig)
    plain = (back - x0).abs().max().item()
    calls.clear()
    xT_r = inv.ddim_invert(D, x0, sig, refine_iterations=8)
    assert len(calls) == 10 * 9 and min(calls) > 0
    refined = (inv.ddim_sample(D, xT_r, sig) - x0).abs().max().item()
    assert plain > 1e-3
    assert refined < plain / 100, (plain, refined)


def test_refinement_converges_on_nonlinear_model():
    D = nonlinear_denoiser(3)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sig = schedule(20)
    errs = []
    for n in (0, 2, 6):
        xT = inv.ddim_invert(D, x0, sig, refine_iterations=n)
        errs.append((inv.ddim_sample(D, xT, sig) - x0).abs().mean().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < errs[0] / 10, errs


def test_single_inverse_step_is_the_exact_mirror_when_converged():
    D = nonlinear_denoiser(5)
    x_lo = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    lo, hi = torch.tensor(0.5), torch.tensor(0.9)
    x_hi = inv.inverse_step(D, x_lo, lo, hi, refine_iterations=40)
    fwd = inv.euler_step(x_hi, D(x_hi, hi), hi, lo)
    assert torch.allclose(fwd, x_lo, atol=1e-5)


def test_invert_rejects_unsorted_sigmas():
    D = gaussian_denoiser(0.0, 1.0)
    with pytest.raises(inv.InversionError):
        inv.ddim_invert(D, torch.ones(1, 4, 2, 2), torch.tensor([0.0, 1.0, 2.0]))


# ------------------------------- slerp -------------------------------------------------


def _angle(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return torch.arccos((a @ b) / (a.norm() * b.norm())).item()


def test_slerp_end_points_exact_and_angles_split():
    g = torch.Generator().manual_seed(7)
    z, e = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    e = e * (z.reshape(3, -1).norm(dim=1) / e.reshape(3, -1).norm(dim=1))[:, None, None, None]  # equal norms
    assert torch.equal(inv.slerp(0.0, z, e), z)
    assert torch.equal(inv.slerp(1.0, z, e), e)
    for a in (0.25, 0.5, 0.9):
        m = inv.slerp(a, z, e)
        for i in range(3):
            phi = _angle(z[i], e[i])
            assert _angle(m[i], z[i]) == pytest.approx(a * phi, rel=1e-4)
            assert _angle(m[i], e[i]) == pytest.approx((1 - a) * phi, rel=1e-4)


def test_slerp_keeps_norm_of_equal_norm_inputs_and_is_per_sample():
    g = torch.Generator().manual_seed(8)
    z, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    e = e / e[0].norm() * z[0].norm()  # sample 0: equal norms
    m = inv.slerp(0.5, z, e)
    assert m[0].norm().item() == pytest.approx(z[0].norm().item(), rel=1e-5)
    # changing sample 1 does not change sample 0
    z2 = z.clone()
    z2[1] = torch.randn(4, 8, 8, generator=g) * 5
    m2 = inv.slerp(0.5, z2, e)
    assert torch.equal(m2[0], m[0]) and not torch.equal(m2[1], m[1])


def test_slerp_parallel_falls_back_to_lerp():
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    m = inv.slerp(0.3, z, 2 * z)
    assert torch.isfinite(m).all()
    assert torch.allclose(m, 0.7 * z + 0.3 * 2 * z, atol=1e-5)


def test_slerp_noise_scale_and_end_points():
    g = torch.Generator().manual_seed(10)
    sigma = 14.6
    s = math.sqrt(sigma**2 + 1)
    zT = torch.randn(4, 4, 8, 8, generator=g) * s  # an inverted latent at sigma
    eps = torch.randn(4, 4, 8, 8, generator=g)
    assert torch.equal(inv.slerp_noise(zT, eps, 0.0, sigma), zT)
    assert torch.equal(inv.slerp_noise(zT, eps, 1.0, sigma), eps * s)
    for a in (0.1, 0.5, 0.9):
        m = inv.slerp_noise(zT, eps, a, sigma)
        nm, nz, ne = (t.reshape(4, -1).norm(dim=1) for t in (m, zT, eps * s))
        # the mixed norm stays between the two (both ~ s * sqrt(numel)), at the inverted latent's scale
        assert (nm >= torch.minimum(nz, ne) * 0.999).all() and (nm <= torch.maximum(nz, ne) * 1.001).all()
        assert torch.allclose(nm / nz, torch.ones(4), atol=0.1), nm / nz
    # a partial inversion at a small sigma: the scale follows that sigma
    small = 2.0
    zs = torch.randn(1, 4, 8, 8, generator=g) * math.sqrt(small**2 + 1)
    m = inv.slerp_noise(zs, eps[:1], 1.0, small)
    assert m.std().item() == pytest.approx(math.sqrt(small**2 + 1) * eps[:1].std().item(), rel=1e-6)


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_slerp_noise_refuses_zero_and_nonfinite(bad):
    z = torch.randn(2, 4, 4, 4)
    if bad == "zero":
        z[1] = 0
    else:
        z[0, 0, 0, 0] = float(bad)
    with pytest.raises(inv.InversionError, match="zeros" if bad == "zero" else "NaN"):
        inv.slerp_noise(z, torch.randn(2, 4, 4, 4), 0.5, 14.6)


# ------------------------------- flow matching (kind="flow") ---------------------------


def flow_schedule(steps, shift=3.0):
    """Descending flow times 1 .. 0 with SD3's time shift t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def gaussian_flow_denoiser(mu, s2, calls=None, noise_std=1.0):
    """Exact denoiser of x_t = (1-t) x0 + t n eps, x0 ~ N(mu, s2 I):
    D = mu + (1-t) s2 / ((1-t)^2 s2 + t^2 n^2) (x - (1-t) mu)."""

    def D(x, t):
        t = float(t)
        if calls is not None:
            calls.append(t)
        var = (1 - t) ** 2 * s2 + (t * noise_std) ** 2
        return mu + (1 - t) * s2 / var * (x - (1 - t) * mu)

    return D


def nonlinear_flow_denoiser(seed=0, c=4):
    """A smooth non-linear velocity model: D = x - t v(x), v = tanh(W x + b) - 0.3 x."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c, c, generator=g) * 0.5
    b = torch.randn(c, generator=g) * 0.3

    def D(x, t):
        v = torch.tanh(torch.einsum("oc,bchw->bohw", W, x) + b[None, :, None, None]) - 0.3 * x
        return x - float(t) * v

    return D


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
def test_flow_eta_coefficients_are_ddim_eq16_in_the_flow_latent(eta):
    # DDIM Eq. 16 written out in the VP latent z = x / c(t), sqrt(abar) = (1-t)/c, independently
    for t, tp in [(1.0, 0.9), (0.9, 0.8), (0.5, 0.3), (0.2, 0.05)]:
        c_t, c_p = math.hypot(1 - t, t), math.hypot(1 - tp, tp)
        a_t, a_p = ((1 - t) / c_t) ** 2, ((1 - tp) / c_p) ** 2
        vp_std = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        t_down, gain, up = inv.flow_eta_coefficients(t, tp, eta)
        assert up == pytest.approx(vp_std * c_p, rel=1e-9, abs=1e-12)  # back to x = c z
        d = math.sqrt(1 - a_p - vp_std**2) * c_p  # Eq. 12's eps coefficient, in x
        # the deterministic part (1-t') x0 + d eps: Euler to t_down, times gain
        assert gain * (1 - t_down) == pytest.approx(1 - tp, rel=1e-9)
        assert gain * t_down == pytest.approx(d, rel=1e-7, abs=1e-12)
        assert d**2 + up**2 == pytest.approx(tp**2, rel=1e-9)
        if t < 1:  # the same as the VE step at sigma = t / (1-t), times (1 - t')
            _, up_ve = inv.ddim_eta_sigmas(t / (1 - t), tp / (1 - tp), eta)
            assert up == pytest.approx((1 - tp) * up_ve, rel=1e-9, abs=1e-12)
    assert inv.flow_eta_coefficients(0.5, 0.3, 0.0) == (0.3, 1.0, 0.0)
    assert inv.flow_eta_coefficients(0.5, 0.0, 0.9) == (0.0, 1.0, 0.0)


def test_flow_eta_one_from_t1_is_the_ddpm_posterior():
    # from pure noise (t = 1) with eta = 1 the step forgets eps_hat: x' = (1-t') x0_hat + t' z
    D = nonlinear_flow_denoiser(1)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    one = torch.tensor(1.0)
    got = inv.flow_eta_step(x, D(x, one), one, torch.tensor(0.7), 1.0, lambda: z)
    assert torch.allclose(got, 0.3 * D(x, one) + 0.7 * z, atol=1e-6)


def test_flow_ddim_sample_is_euler_at_eta0_and_adds_exactly_up_noise():
    D = nonlinear_flow_denoiser(2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sig = flow_schedule(6)[:3]
    det = inv.ddim_sample(D, x, sig, eta=0.0, kind="flow")
    y = x
    for i in range(2):  # the flow ODE's Euler step x + (t' - t) v, v = (x - D) / t
        v = (y - D(y, sig[i])) / sig[i]
        y = y + v * (sig[i + 1] - sig[i])
    assert torch.equal(det, y)
    zs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(20 + i)) for i in range(2)]
    for ns in (1.0, 3.0):
        got = inv.ddim_sample(D, x, sig, eta=0.6, noise=lambda i: zs[i], kind="flow", noise_std=ns)
        y = x
        for i in range(2):  # x' = (1-t') x0_hat + d eps_hat + u n z, with x = (1-t) x0_hat + t n eps_hat
            t, tp = float(sig[i]), float(sig[i + 1])
            x0 = D(y, sig[i])
            eps = (y - (1 - t) * x0) / t  # n * eps_hat
            _, _, up = inv.flow_eta_coefficients(t, tp, 0.6)
            d = math.sqrt(tp**2 - up**2)
            y = (1 - tp) * x0 + d * eps + up * ns * zs[i]
        assert torch.allclose(got, y, rtol=1e-5, atol=1e-5), (ns, (got - y).abs().max())


def test_flow_scale_is_the_gaussian_flow():
    assert inv.flow_scale(1.0) == 1.0 and inv.flow_scale(0.0) == 1.0
    assert inv.flow_scale(0.5) == pytest.approx(math.sqrt(0.5))
    assert inv.flow_scale(1.0, 0.5, 8.0) == 8.0 and inv.flow_scale(0.0, 0.5, 8.0) == 0.5
    assert inv.latent_scale(3.0) == inv.unit_scale(3.0)
    for bad in (-0.1, 1.2):
        with pytest.raises(inv.InversionError, match=r"\[0, 1\]"):
            inv.flow_scale(bad)
    with pytest.raises(inv.InversionError, match="unknown"):
        inv.latent_scale(0.5, kind="x0")
    # for Gaussian data the inverse step's first guess x * c(t_hi) / c(t_lo) is the exact flow
    D = gaussian_flow_denoiser(0.0, 1.0)
    x_lo = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    lo, hi = torch.tensor(0.3), torch.tensor(0.6)
    x_hi = inv.inverse_step(D, x_lo, lo, hi, kind="flow")
    guess = x_lo * (inv.flow_scale(0.6) / inv.flow_scale(0.3))
    assert torch.allclose(x_hi, x_lo + 0.3 * (guess - D(guess, hi)) / 0.6, atol=1e-6)


@pytest.mark.parametrize("noise_std", [1.0, 8.0])
def test_flow_inversion_roundtrips_and_refinement_helps(noise_std):
    calls = []
    D = gaussian_flow_denoiser(0.3, 0.8, calls, noise_std)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    steps = 10 if noise_std == 1.0 else 40  # noise scale 8 makes the ODE stiffer
    sig = flow_schedule(steps)
    x1 = inv.ddim_invert(D, x0, sig, kind="flow", noise_std=noise_std)
    assert min(calls) > 0 and len(calls) == steps and max(calls) == 1.0
    plain = (inv.ddim_sample(D, x1, sig, kind="flow") - x0).abs().max().item()
    x1r = inv.ddim_invert(D, x0, sig, refine_iterations=8, kind="flow", noise_std=noise_std)
    refined = (inv.ddim_sample(D, x1r, sig, kind="flow") - x0).abs().max().item()
    assert plain > 1e-4 and refined < plain / 20, (plain, refined)
    # at t = 1 the inverted latent is at the noise's scale (the exact flow map is
    # x0 -> n (x0 - mu) / sqrt(s2); Euler's error on these few steps is tens of percent)
    exact = noise_std * (x0 - 0.3) / math.sqrt(0.8)
    assert 0.8 < x1r.std().item() / exact.std().item() < 1.5
    # a non-linear velocity: refinement converges
    Dn = nonlinear_flow_denoiser(3)
    errs = [(inv.ddim_sample(Dn, inv.ddim_invert(Dn, x0, sig, n, kind="flow"), sig, kind="flow") - x0).abs().mean().item()
            for n in (0, 2, 6)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 10, errs
    # the VE first guess on flow times (a wrong parameterisation) reconstructs worse than the flow one
    ve = (inv.ddim_sample(D, inv.ddim_invert(D, x0, sig), sig, kind="flow") - x0).abs().max().item()
    assert ve > plain


def test_flow_inversion_refuses_times_outside_0_1():
    D = gaussian_flow_denoiser(0.0, 1.0)
    with pytest.raises(inv.InversionError, match=r"\[0, 1\]"):
        inv.ddim_invert(D, torch.ones(1, 4, 2, 2), torch.tensor([14.6, 1.0, 0.0]), kind="flow")


def test_flow_slerp_noise_scale_and_end_points():
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(4, 4, 8, 8, generator=g)
    x1 = torch.randn(4, 4, 8, 8, generator=g)  # a full inversion: t = 1, unit scale
    assert torch.equal(inv.slerp_noise(x1, eps, 0.0, 1.0, kind="flow"), x1)
    assert torch.equal(inv.slerp_noise(x1, eps, 1.0, 1.0, kind="flow"), eps)  # no sigma factor at t = 1
    m = inv.slerp_noise(x1, eps, 0.5, 1.0, kind="flow")
    assert torch.allclose(m, inv.slerp(0.5, x1, eps), atol=1e-6)  # Eq. 7 itself
    # a partial inversion at t: fresh noise at the latent's own scale c(t)
    t = 0.4
    c = math.hypot(1 - t, t)
    xt = torch.randn(4, 4, 8, 8, generator=g) * c
    assert torch.allclose(inv.slerp_noise(xt, eps, 1.0, t, kind="flow"), eps * c, rtol=1e-6)
    mt = inv.slerp_noise(xt, eps, 0.5, t, kind="flow")
    assert torch.allclose(mt / c, inv.slerp(0.5, xt / c, eps), atol=1e-5)
    assert mt.std().item() == pytest.approx(c, rel=0.1)
    # noise scale 8 (HiDream-O1): alpha 1 at t = 1 is 8 eps, what ComfyUI starts from
    assert torch.allclose(inv.slerp_noise(x1 * 8, eps, 1.0, 1.0, kind="flow", noise_std=8.0), eps * 8)
    with pytest.raises(inv.InversionError, match=r"\[0, 1\]"):
        inv.slerp_noise(x1, eps, 0.5, 14.6, kind="flow")
