"""DDIM inversion, DDIM sampling with eta, and slerp noise injection (paper Sec. 3.4, Eq. 6-7).

Everything here works in the *variance-exploding* ("k-diffusion") parameterisation that
ComfyUI's samplers use: a latent at noise level sigma is ``x = x0 + sigma * eps`` and the
model is seen through a denoiser ``D(x, sigma) -> x0_hat``.  DDIM's variance-preserving
latent is ``z_t = sqrt(abar_t) * x`` with ``sigma_t^2 = (1 - abar_t) / abar_t``, so a DDIM
step in z is exactly an Euler step of the probability-flow ODE ``dx/dsigma = eps_hat`` in x
(Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, Eq. 12-14; Karras et al.
2022, Sec. 4).  That is why ComfyUI's "ddim" sampler *is* its Euler sampler.

- :func:`euler_step` / :func:`ddim_sample`: DDIM with eta (DDIM Eq. 12 and 16).
- :func:`inverse_step` / :func:`ddim_invert`: Eq. 6, ``z_T = DDIMInvert(z*, c; theta')``,
  the step that exactly mirrors :func:`euler_step`, with optional fixed-point refinement.
- :func:`slerp` / :func:`slerp_noise`: Eq. 7, with the sigma-scale normalisation.
- :func:`unit_scale`: ``sqrt(sigma^2 + sigma_data^2)``, the scale of a latent at sigma, which
  the inversion and the slerp divide by; ``sigma_data`` (the data's standard deviation, 1
  for SD1.x/SD2.x/SDXL, 0.5 for EDM-type models such as Playground v2.5) is passed in.

**Flow matching** (``kind="flow"``: SD3.x, Flux; ComfyUI's ``CONST`` model sampling) uses
the linear-interpolation latent ``x_t = (1 - t) x0 + t * s_n * eps`` with ``t`` in [0, 1]
(ComfyUI's sigma *is* t; ``s_n`` is the noise scale, 1 except for pixel models such as
HiDream-O1) and the model predicts the velocity ``v = s_n eps - x0``, so
``D(x, t) = x - t v`` (ComfyUI's ``calculate_denoised``).  This is DDIM's latent with
``alpha_t = 1 - t`` and ``sigma_t = t s_n``: dividing by ``c(t) = sqrt((1-t)^2 sigma_data^2
+ t^2 s_n^2)`` (:func:`flow_scale`) gives a variance-preserving latent ``z = x / c(t)``, and
dividing by ``1 - t`` the VE latent at ``sigma = t s_n / (1 - t)``.  A DDIM step keeps
``x0_hat`` and ``eps_hat`` and moves the coefficients, which is the same in every one of
these rescaled latents; in x it reads

    x_{t'} = (1 - t') x0_hat + t' s_n eps_hat = x_t + (t' - t) v_hat

(substitute ``x0_hat = x_t - t v_hat`` and ``s_n eps_hat = x_t + (1 - t) v_hat``): DDIM
with eta = 0 is exactly the Euler step of the flow ODE ``dx/dt = v(x, t)``, which is again
``x + (x - D) / t * (t' - t)``, the very :func:`euler_step` ComfyUI's "euler" takes.  So the
deterministic sampler and the inversion's fixed point are the same code for both kinds; only
the inversion's first guess (:func:`inverse_step`), the eta noise (:func:`flow_eta_step`)
and the slerp scale (:func:`slerp_noise`) use ``c(t)`` where the VE route uses
``sqrt(sigma^2 + sigma_data^2)``.

Plain PyTorch; no ComfyUI.  A *denoiser* is any callable ``denoise(x, sigma) -> x0_hat``
with ``sigma`` a 0-dim tensor (the glue in ``nodes/editing.py`` wraps ComfyUI's guider).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Optional[Callable[..., None]]


VE = "ve"      # variance exploding, x = x0 + sigma eps (eps- and v-prediction models)
FLOW = "flow"  # flow matching, x = (1 - t) x0 + t s_n eps (SD3.x, Flux)
KINDS = (VE, FLOW)


class InversionError(ValueError):
    """An input the inversion/slerp math cannot use (zero or non-finite latent, bad sigmas)."""


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`, else an :class:`InversionError`."""
    if kind not in KINDS:
        raise InversionError(f"unknown noise parameterisation {kind!r} (expected one of {KINDS})")
    return kind


# ---------------------------------------------------------------------------------------
# DDIM sampling with eta
# ---------------------------------------------------------------------------------------


def ddim_eta_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of one DDIM(eta) step from ``sigma`` to ``sigma_next``.

    DDIM Eq. 16 defines the noise std of a step t -> t-1 in the VP latent as
    ``s_t(eta) = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1})``
    and DDIM Eq. 12 moves the deterministic part to ``sqrt(1 - abar_{t-1} - s_t^2) * eps``.
    Dividing by ``sqrt(abar_{t-1})`` and substituting ``abar = 1 / (1 + sigma^2)`` gives, in
    the VE latent,

        sigma_up   = eta * sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)

    so that ``x_next = x0_hat + sigma_down * eps_hat + sigma_up * z``, z ~ N(0, I).
    The data scale cancels: with ``abar = sigma_data^2 / (sigma^2 + sigma_data^2)`` (an
    EDM-type model, see :func:`unit_scale`) the same two formulas follow.
    ``eta`` must lie in [0, 1] (1 = the DDPM posterior variance).
    """
    eta = float(eta)
    if not (0.0 <= eta <= 1.0) or math.isnan(eta):
        raise InversionError(f"eta must be in [0, 1], got {eta}")
    sigma, sigma_next = float(sigma), float(sigma_next)
    if eta == 0.0 or sigma_next <= 0.0 or sigma <= 0.0 or sigma_next >= sigma:
        return sigma_next, 0.0
    up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    up = min(up, sigma_next)
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0), written as the Euler step ComfyUI's "ddim" takes.

    ``x_next = x + (x - D(x, sigma)) / sigma * (sigma_next - sigma)``: DDIM Eq. 12 with
    sigma_t = 0, in the VE parameterisation (DDIM Eq. 14).  Same operations in the same order
    as ComfyUI's ``sample_euler``, so the results agree bit for bit.
    """
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def flow_eta_coefficients(t: float, t_next: float, eta: float) -> tuple[float, float, float]:
    """(t_down, gain, up) of one flow-matching DDIM(eta) step from ``t`` to ``t_next``.

    Derivation.  With ``x_t = (1-t) x0 + t eps`` (noise scale 1; see :func:`flow_eta_step`
    for ``s_n``), DDIM's VP latent is ``z = x / c(t)`` with ``sqrt(abar_t) = (1-t) / c(t)``,
    ``sqrt(1-abar_t) = t / c(t)``.  DDIM Eq. 12/16 give
    ``z' = sqrt(abar') x0_hat + sqrt(1 - abar' - s^2) eps_hat + s z_noise``; multiplying by
    ``c(t')``::

        x' = (1-t') x0_hat + d eps_hat + u z_noise,   d^2 + u^2 = t'^2

    with ``u = c(t') s``.  Written out with Eq. 16 (or, equivalently, as ``(1 - t')`` times
    the VE ``sigma_up`` of :func:`ddim_eta_sigmas` at ``sigma = t/(1-t)``, which is finite
    also at t = 1)::

        u = eta * t' * sqrt(1 - q^2),  q = t' (1 - t) / (t (1 - t')),  d = sqrt(t'^2 - u^2)

    The deterministic part is an Euler flow step to the time ``t_down`` whose noise-to-signal
    ratio is ``d / (1-t')``, i.e. ``t_down = d / (1 - t' + d)``, giving
    ``(1-t_down) x0_hat + t_down eps_hat``; times ``gain = 1 - t' + d = (1-t')/(1-t_down)``
    that is ``(1-t') x0_hat + d eps_hat``.  eta = 0 gives ``(t', 1, 0)``, the plain Euler
    step; eta = 1 is the DDPM posterior (from t = 1: ``x' = (1-t') x0_hat + t' z``).
    """
    eta = float(eta)
    if not (0.0 <= eta <= 1.0) or math.isnan(eta):
        raise InversionError(f"eta must be in [0, 1], got {eta}")
    t, t_next = float(t), float(t_next)
    if eta == 0.0 or t_next <= 0.0 or t <= 0.0 or t_next >= t or t_next >= 1.0:
        return t_next, 1.0, 0.0
    q = t_next * (1.0 - t) / (t * (1.0 - t_next))
    up = min(eta * t_next * math.sqrt(max(1.0 - q * q, 0.0)), t_next)
    d = math.sqrt(max(t_next * t_next - up * up, 0.0))
    return d / (1.0 - t_next + d), 1.0 - t_next + d, up


def flow_eta_step(x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eta: float,
                  noise: Callable[[], torch.Tensor], noise_std: float = 1.0) -> torch.Tensor:
    """One flow-matching DDIM(eta) step: ``gain * euler_step(x, D, t, t_down) + up * s_n * z``.

    See :func:`flow_eta_coefficients`.  With noise scale ``s_n`` (``x_t = (1-t) x0 + t s_n
    eps``) the latent ``x / s_n`` is the unit-noise case with data ``x0 / s_n``, and the
    Euler step commutes with that scaling, so only the fresh noise gets the factor ``s_n``.
    ``noise()`` returns unit Gaussian noise of x's shape; called only when ``up > 0``.
    """
    t_down, gain, up = flow_eta_coefficients(float(t), float(t_next), eta)
    x = euler_step(x, denoised, t, t_next.new_tensor(t_down)) * gain
    if up > 0:
        x = x + noise().to(device=x.device, dtype=x.dtype) * (up * float(noise_std))
    return x


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float = 0.0,
    noise: Optional[Callable[[int], torch.Tensor]] = None,
    callback: StepCallback = None,
    kind: str = VE,
    noise_std: float = 1.0,
) -> torch.Tensor:
    """DDIM sampling with eta (DDIM Eq. 12 and 16) along descending ``sigmas``.

    Each step evaluates ``D(x, sigma_i)``, moves deterministically to ``sigma_down`` and adds
    ``sigma_up * noise(i)`` (see :func:`ddim_eta_sigmas`).  ``noise(i)`` must return a unit
    Gaussian tensor of x's shape; it is only called when eta > 0 and sigma_up > 0.
    ``callback(i, x, denoised)`` runs after each model evaluation.
    With eta = 0 this is :func:`euler_step` repeated, i.e. ComfyUI's "ddim" (and "euler").
    ``kind="flow"``: sigmas are flow times t in [0, 1]; eta > 0 steps with
    :func:`flow_eta_step` (``noise_std``: the model's noise scale s_n); eta = 0 is the same
    Euler step, which on a flow model is ComfyUI's "euler" bit for bit.
    """
    check_kind(kind)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if eta == 0:
            x = euler_step(x, denoised, sigma, sigma_next)
            continue
        if kind == FLOW:
            if noise is None:
                raise InversionError("eta > 0 needs a noise source")
            x = flow_eta_step(x, denoised, sigma, sigma_next, eta, lambda i=i: noise(i), noise_std)
            continue
        down, up = ddim_eta_sigmas(float(sigma), float(sigma_next), eta)
        x = euler_step(x, denoised, sigma, sigma_next.new_tensor(down))
        if up > 0:
            if noise is None:
                raise InversionError("eta > 0 needs a noise source")
            x = x + noise(i).to(device=x.device, dtype=x.dtype) * up
    return x


# ---------------------------------------------------------------------------------------
# The unit scale at sigma (sigma_data)
# ---------------------------------------------------------------------------------------


def check_sigma_data(sigma_data: float) -> float:
    """``sigma_data`` as a float, refused unless finite and > 0."""
    sigma_data = float(sigma_data)
    if not math.isfinite(sigma_data) or sigma_data <= 0.0:
        raise InversionError(f"sigma_data must be finite and > 0, got {sigma_data}")
    return sigma_data


def unit_scale(sigma: float, sigma_data: float = 1.0) -> float:
    """``sqrt(sigma^2 + sigma_data^2)``: the standard deviation of a latent at noise level sigma.

    With VE noise ``x = x0 + sigma * n``, data of standard deviation ``sigma_data`` and unit
    noise n independent of it, ``Var(x) = sigma_data^2 + sigma^2``.  The model's input is
    ``c_in * x = x / sqrt(sigma^2 + sigma_data^2)`` (Karras et al. 2022, Table 1; ComfyUI's
    ``calculate_input``), a unit-variance latent: DDIM's variance-preserving latent
    ``z = sqrt(abar) * x`` with ``abar = sigma_data^2 / (sigma^2 + sigma_data^2)``, up to the
    constant factor 1/sigma_data.  For sigma_data = 1 (SD1.x, SD2.x, SDXL) this is the
    familiar ``sqrt(1 + sigma^2) = 1 / sqrt(abar)``.
    """
    sigma_data = check_sigma_data(sigma_data)
    return math.sqrt(float(sigma) ** 2 + sigma_data**2)


def flow_scale(t: float, sigma_data: float = 1.0, noise_std: float = 1.0) -> float:
    """``c(t) = sqrt((1-t)^2 sigma_data^2 + t^2 s_n^2)``: the standard deviation of a flow latent at time t.

    ``x_t = (1-t) x0 + t s_n eps`` with data of standard deviation ``sigma_data`` and unit
    noise independent of it has ``Var(x_t) = (1-t)^2 sigma_data^2 + t^2 s_n^2``.  ``x_t / c(t)``
    is DDIM's variance-preserving latent (``sqrt(abar_t) = (1-t) sigma_data / c(t)``, up to
    the constant 1/sigma_data as in :func:`unit_scale`), the flow counterpart of
    ``x / sqrt(sigma^2 + sigma_data^2)``.  It is 1 at t = 1 for unit noise: the start of a
    flow sampler is plain unit Gaussian noise, with no sigma factor.  For Gaussian data
    ``x0 ~ N(0, sigma_data^2 I)`` the flow ODE's exact solution is ``x(t) proportional to c(t)``
    (``D(x, t) = x (1-t) sigma_data^2 / c(t)^2`` and ``dx/dt = (x - D) / t = x c'(t) / c(t)``).
    """
    sigma_data = check_sigma_data(sigma_data)
    noise_std = check_sigma_data(noise_std)
    t = float(t)
    if not (0.0 <= t <= 1.0):
        raise InversionError(f"a flow-matching time must lie in [0, 1], got {t}")
    return math.sqrt(((1.0 - t) * sigma_data) ** 2 + (t * noise_std) ** 2)


def latent_scale(sigma: float, sigma_data: float = 1.0, kind: str = VE, noise_std: float = 1.0) -> float:
    """:func:`unit_scale` (``kind="ve"``) or :func:`flow_scale` (``kind="flow"``)."""
    if check_kind(kind) == FLOW:
        return flow_scale(sigma, sigma_data, noise_std)
    return unit_scale(sigma, sigma_data)


# ---------------------------------------------------------------------------------------
# DDIM inversion (Eq. 6)
# ---------------------------------------------------------------------------------------


def inverse_step(
    denoise: Denoiser,
    x_lo: torch.Tensor,
    sigma_lo: torch.Tensor,
    sigma_hi: torch.Tensor,
    refine_iterations: int = 0,
    on_eval: Optional[Callable[[], None]] = None,
    sigma_data: float = 1.0,
    kind: str = VE,
    noise_std: float = 1.0,
) -> torch.Tensor:
    """Invert one :func:`euler_step`: find ``x_hi`` with ``euler_step(x_hi, D(x_hi, sigma_hi), sigma_hi, sigma_lo) = x_lo``.

    That is the fixed point ``x_hi = x_lo + (sigma_hi - sigma_lo) * eps_hat(x_hi, sigma_hi)``
    with ``eps_hat(x, sigma) = (x - D(x, sigma)) / sigma``.  Plain DDIM inversion (Eq. 6, as
    in DDIM Sec. 4.3 and diffusers' DDIMInverseScheduler) approximates the unknown
    ``x_hi`` by the known latent in DDIM's variance-preserving scale, ``z_hi ~ z_lo``: the
    network sees ``z_lo`` labelled with the *target* level, i.e. ``eps_hat(x_lo * r, sigma_hi)``
    with ``r = unit_scale(sigma_hi) / unit_scale(sigma_lo)
    = sqrt((sigma_hi^2 + sigma_data^2) / (sigma_lo^2 + sigma_data^2))``, so that the model's
    input ``x / sqrt(sigma^2 + sigma_data^2)`` is the same at both levels (see
    :func:`unit_scale`; ``sqrt((1 + sigma_hi^2) / (1 + sigma_lo^2))`` for sigma_data = 1).
    ``r`` is also the exact flow of the probability-flow ODE for Gaussian data
    ``x0 ~ N(0, sigma_data^2 I)``: then ``D(x, sigma) = x sigma_data^2 / (sigma^2 + sigma_data^2)``,
    ``dx/dsigma = x sigma / (sigma^2 + sigma_data^2)`` and ``x(sigma)`` is proportional to
    ``sqrt(sigma^2 + sigma_data^2)``.  It only divides by sigma_hi, never by sigma_lo (which
    is 0 at the clean end).  ``refine_iterations`` > 0 then iterates the fixed point, one
    more model evaluation each, so that sampling back retraces the path far more closely.

    ``kind="flow"`` (sigmas are flow times t): the step being inverted is the flow ODE's Euler
    step ``x_lo = x_hi + (t_lo - t_hi) v(x_hi, t_hi)``, DDIM with ``alpha = 1-t``,
    ``sigma = t`` (module docstring), so the fixed point is the same
    ``x_hi = x_lo + (t_hi - t_lo) v(x_hi, t_hi)`` with ``v = (x - D(x, t)) / t``.  DDIM's
    first guess ``z_hi ~ z_lo`` in the VP latent ``z = x / c(t)`` becomes
    ``x_lo * c(t_hi) / c(t_lo)`` (:func:`flow_scale`, with the model's noise scale
    ``noise_std``), again the exact flow for Gaussian data.
    """
    if float(sigma_hi) <= 0.0:
        raise InversionError(f"inverse step needs sigma_hi > 0, got {float(sigma_hi)}")
    dt = sigma_lo - sigma_hi  # the forward step's (negative) increment, mirrored below

    def step_from(x_eval):
        if on_eval is not None:
            on_eval()
        d = (x_eval - denoise(x_eval, sigma_hi)) / sigma_hi
        return x_lo - d * dt

    if check_kind(kind) == FLOW:
        r = flow_scale(sigma_hi, sigma_data, noise_std) / flow_scale(sigma_lo, sigma_data, noise_std)
    else:
        d2 = check_sigma_data(sigma_data) ** 2
        r = math.sqrt((float(sigma_hi) ** 2 + d2) / (float(sigma_lo) ** 2 + d2))
    x_hi = step_from(x_lo * r)
    for _ in range(int(refine_iterations)):
        x_hi = step_from(x_hi)
    return x_hi


@torch.no_grad()
def ddim_invert(
    denoise: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    refine_iterations: int = 0,
    callback: StepCallback = None,
    on_eval: Optional[Callable[[], None]] = None,
    sigma_data: float = 1.0,
    kind: str = VE,
    noise_std: float = 1.0,
) -> torch.Tensor:
    """Eq. 6: ``z_T = DDIMInvert(z*, c; theta')`` along the *sampling* sigmas (descending).

    ``x0`` is the latent at ``sigmas[-1]`` (normally 0, a clean VAE-encoded latent); the
    result is the latent at ``sigmas[0]`` from which :func:`ddim_sample` with eta = 0 on the
    same sigmas (ComfyUI's "ddim"/Euler) walks back to ``x0``.  Steps are inverted from the
    last to the first with :func:`inverse_step` (``sigma_data``: the model's, see
    :func:`unit_scale`); ``callback(k, x)`` runs after each of them.

    ``kind="flow"``: ``sigmas`` are flow times in [0, 1] (ComfyUI's flow sigmas, shift
    included), ``x0`` the latent at ``sigmas[-1]`` (0: clean) and the result the latent at
    ``sigmas[0]`` (1: the start of a full sampling run, where it takes the place of the unit
    noise); the flow ODE ``dx/dt = v(x, t)`` is integrated *up* in t with the inverse of
    each Euler step of the descending schedule (:func:`inverse_step`).
    """
    check_sigma_data(sigma_data)
    sig = [s for s in sigmas]
    for a, b in zip(sig[:-1], sig[1:]):
        if not float(a) > float(b):
            raise InversionError("sigmas must be strictly decreasing (the order a sampler uses them)")
    if check_kind(kind) == FLOW and sig and not (0.0 <= float(sig[-1]) and float(sig[0]) <= 1.0):
        raise InversionError(f"flow-matching sigmas must lie in [0, 1], got {float(sig[0]):.4g} .. {float(sig[-1]):.4g}")
    x = x0
    n = len(sig) - 1
    for k in range(n):
        i = n - 1 - k  # invert sampler step i: sigmas[i] -> sigmas[i + 1]
        x = inverse_step(denoise, x, sig[i + 1], sig[i], refine_iterations, on_eval, sigma_data, kind, noise_std)
        if callback is not None:
            callback(k, x)
    return x


# ---------------------------------------------------------------------------------------
# Slerp noise injection (Eq. 7)
# ---------------------------------------------------------------------------------------


def check_latent(z: torch.Tensor, what: str = "latent") -> None:
    """Refuse latents the slerp cannot use: non-finite values or an all-zero sample."""
    if not torch.isfinite(z).all():
        raise InversionError(f"{what} contains NaN or infinite values")
    flat = z.reshape(z.shape[0], -1) if z.ndim > 0 else z.reshape(1, 1)
    zero = (flat.abs().amax(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise InversionError(f"{what} sample(s) {zero} are all zeros: there is no direction to interpolate from")


def slerp(alpha: float, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``sin((1-a) phi)/sin(phi) z + sin(a phi)/sin(phi) eps``, ``phi = arccos(cos(z, eps))``.

    Per sample: the first dimension is the batch and every sample gets its own angle.  Where
    the two are (numerically) parallel the formula's limit, linear interpolation, is used.
    ``alpha`` = 0 returns ``z`` and ``alpha`` = 1 returns ``eps``, both exactly.
    """
    alpha = float(alpha)
    if alpha == 0.0:
        return z.clone()
    if alpha == 1.0:
        return eps.clone()
    b = z.shape[0]
    zf = z.reshape(b, -1).double()
    ef = eps.reshape(b, -1).double()
    cos = (zf * ef).sum(1) / (zf.norm(dim=1) * ef.norm(dim=1))
    phi = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(phi)
    par = sin.abs() < 1e-6
    safe = torch.where(par, torch.ones_like(sin), sin)
    wa = torch.where(par, torch.full_like(sin, 1.0 - alpha), torch.sin((1.0 - alpha) * phi) / safe)
    wb = torch.where(par, torch.full_like(sin, alpha), torch.sin(alpha * phi) / safe)
    out = wa[:, None] * zf + wb[:, None] * ef
    return out.reshape(z.shape).to(z.dtype)


def slerp_noise(z_T: torch.Tensor, eps: torch.Tensor, alpha: float, sigma_start: float,
                sigma_data: float = 1.0, kind: str = VE, noise_std: float = 1.0) -> torch.Tensor:
    """Eq. 7 at the sigma the latent was inverted to: ``s * slerp(alpha, z_T / s, eps)``, ``s = sqrt(sigma^2 + sigma_data^2)``.

    ``z_T`` is the inverted latent in the model's (VE) latent space at ``sigma_start``, the
    first sigma the sampler will use; ``eps`` is unit Gaussian noise.  Dividing by
    ``s = unit_scale(sigma_start, sigma_data)`` brings ``z_T``, whose variance is
    ``sigma^2 + sigma_data^2``, to the unit scale of ``eps`` (the model's input
    ``x / sqrt(sigma^2 + sigma_data^2)``, DDIM's VP latent; see :func:`unit_scale`), so
    ``alpha`` = 0.5 is a true half-way point and ``alpha`` = 1 gives ``s * eps``, the noise
    the model expects at ``sigma_start`` (its input is then exactly ``eps``).  For
    sigma_data = 1 that is ``sqrt(1 + sigma^2) * eps``, exactly what ComfyUI's KSampler
    starts from at sigma_max; ComfyUI writes ``sqrt(1 + sigma^2)`` there for every model,
    which for an EDM-type model (sigma_data 0.5, sigma_max 80 or more) differs from ``s`` by
    less than 1e-4 relative.

    ``kind="flow"``: ``s = c(t) = sqrt((1-t)^2 sigma_data^2 + t^2 s_n^2)`` (:func:`flow_scale`)
    at the flow time ``t = sigma_start``.  Writing the inverted latent as
    ``x_t = (1-t) x0_hat + t s_n eps_hat``, ``x_t / c(t)`` is the unit-variance VP latent
    ``sqrt(abar) x0_hat + sqrt(1-abar) eps_hat`` (for ``x0_hat``, ``eps_hat`` of the data's and
    the noise's scale), the same object Eq. 7 slerps in DDIM; so ``alpha`` = 1 gives
    ``c(t) eps``.  For a full inversion (t = 1) that is ``s_n eps``, exactly the noise ComfyUI's
    samplers start a flow model from (``noise_scaling`` at sigma 1: ``1 * s_n * eps +
    0 * latent``), and the slerp is Eq. 7 on ``x_1 / s_n`` and ``eps`` with no sigma factor at
    all; for a partial inversion it is fresh noise of the latent's own variance at t.
    """
    check_latent(z_T, "inverted latent")
    if eps.shape != z_T.shape:
        raise InversionError(f"noise shape {tuple(eps.shape)} differs from the latent's {tuple(z_T.shape)}")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise InversionError(f"alpha must be in [0, 1], got {alpha}")
    sigma_start = float(sigma_start)
    if not math.isfinite(sigma_start) or sigma_start < 0:
        raise InversionError(f"sigma must be finite and >= 0, got {sigma_start}")
    s = latent_scale(sigma_start, sigma_data, kind, noise_std)
    if alpha == 0.0:
        return z_T.clone()
    if alpha == 1.0:
        return eps.to(z_T.dtype) * s
    return slerp(alpha, z_T / s, eps.to(z_T.dtype)) * s
