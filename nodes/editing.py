"""Single-image editing (paper Sec. 3.4): DDIM Invert, DDIM Sampler (eta), Slerp Noise.

Glue only: the math is in ``svdiff/inversion.py``.  The model is evaluated through ComfyUI's
own guider (``comfy.samplers.CFGGuider`` running a custom ``KSAMPLER``), so model patches
(spectral shifts, LoRAs, attention patches), cfg and conditioning work as in sampling.

Two noise parameterisations are supported: ε/v models (VE, ``x0 + sigma n``) and flow
matching (SD3.x, Flux: ComfyUI's ``CONST``, ``(1 - t) x0 + t n``).  ComfyUI's samplers start a
flow model from ``noise_scaling(sigma0, noise, latent) = sigma0 * noise + (1 - sigma0) *
latent``, which at sigma0 = 1 ignores the LATENT: an inverted flow latent is fed back as the
NOISE of SamplerCustomAdvanced (DDIM Invert's NOISE output, :class:`StartAtLatentNoise`).
"""

from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from ..svdiff import inversion
from . import comfy_compat as compat
from .common import CATEGORY, SVDiffNodeError, check_interrupt, log, progress

INVERT = "DDIM Invert"
SAMPLER = "DDIM Sampler (η)"
SLERP = "Slerp Noise"

_KIND_NAMES = {
    "IMG_TO_IMG_FLOW": "image-to-image flow, whose output is the result (IMG_TO_IMG_FLOW)",
    "CONST": "flow matching (CONST) with its own denoising or noise scaling",
    "COSMOS_RFLOW": "rectified flow (COSMOS_RFLOW)",
    "IMG_TO_IMG": "image-to-image x0 prediction",
    "X0": "x0 prediction",
    "LCM": "LCM (consistency) prediction",
}


def sampling_kind_error(model_sampling) -> str | None:
    """None for an eps-/v-prediction model (VE noise x0 + sigma*n) or a flow-matching model
    (CONST), else what it is instead."""
    if compat.is_ve_eps_or_v(model_sampling) or compat.is_flow(model_sampling):
        return None
    cls = type(model_sampling)
    for c in cls.__mro__:
        if c.__name__ in _KIND_NAMES:
            return _KIND_NAMES[c.__name__]
    return cls.__name__


def sampling_route(node: str, model_sampling) -> str:
    """``inversion.VE`` or ``inversion.FLOW`` for the model; a clear error for any other kind."""
    kind = sampling_kind_error(model_sampling)
    if kind is not None:
        raise SVDiffNodeError(
            node,
            "model: DDIM needs an ε- or v-prediction model (SD1.x, SD2.x, SDXL) or a flow-matching model "
            f"(SD3.x, Flux); this model uses {kind}, which is not supported",
        )
    return inversion.FLOW if compat.is_flow(model_sampling) else inversion.VE


def noise_std(kind: str, model_sampling) -> float:
    """The factor on the unit noise at t = 1 (flow models; 1 for VE, where it is unused)."""
    return compat.flow_noise_scale(model_sampling) if kind == inversion.FLOW else 1.0


def model_sigma_data(node: str, model_sampling) -> float:
    """The model's sigma_data (1 for SD1.x/SD2.x/SDXL, 0.5 for EDM-type models), checked."""
    try:
        return inversion.check_sigma_data(compat.sigma_data(model_sampling))
    except inversion.InversionError as e:
        raise SVDiffNodeError(node, f"model: its noise schedule's {e}") from None


def check_latent(node: str, samples, field: str = "latent") -> None:
    if not isinstance(samples, torch.Tensor) or getattr(samples, "is_nested", False):
        raise SVDiffNodeError(node, f"{field}: expected a plain latent tensor")
    if samples.ndim < 2 or samples.shape[0] == 0:
        raise SVDiffNodeError(node, f"{field}: empty latent of shape {tuple(samples.shape)}")
    try:
        inversion.check_latent(samples, "the latent")
    except inversion.InversionError as e:
        raise SVDiffNodeError(node, f"{field}: {e}") from None


def inversion_sigmas(model, scheduler: str, steps: int, start_at_step: int, end_at_step: int) -> torch.Tensor:
    """The sigmas KSamplerAdvanced (add_noise disable, return_with_leftover_noise disable) samples along.

    Same computation and step counting as ``comfy.samplers.KSampler.sample``: the full
    schedule (``ddim_uniform`` may give one more sigma than steps), cut at ``end_at_step``
    with the last sigma forced to 0 (the input is a clean latent), then started at
    ``start_at_step``.
    """
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu().float().clone()
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[: end_at_step + 1].clone()
        sigmas[-1] = 0.0
    if start_at_step < len(sigmas) - 1:
        sigmas = sigmas[start_at_step:]
    else:
        sigmas = sigmas[-1:]
    return sigmas


# DDIM Invert records the sigma its LATENT was inverted to, and the samples that sigma
# describes (a reference, no copy): nodes that copy the dict and replace the samples
# (KSampler, Latent Multiply, ...) carry both keys along, and Slerp Noise then sees that
# the samples are no longer the ones the sigma was recorded for.
SIGMA_KEY = "svdiff_sigma"
SIGMA_SAMPLES_KEY = "svdiff_sigma_samples"


def record_sigma(latent: dict, samples: torch.Tensor, sigma: float) -> dict:
    """A copy of ``latent`` with ``samples`` and the noise level ``sigma`` they are at."""
    out = latent.copy()
    out["samples"] = samples
    out[SIGMA_KEY] = float(sigma)
    out[SIGMA_SAMPLES_KEY] = samples
    return out


def _same_samples(recorded, samples: torch.Tensor) -> bool:
    """Whether every sample of ``samples`` is one of ``recorded``'s (so batch copies, slices
    and concatenations of the recorded samples qualify)."""
    if not isinstance(recorded, torch.Tensor) or recorded.shape[1:] != samples.shape[1:]:
        return False
    rec = recorded.to(device=samples.device, dtype=samples.dtype).reshape(recorded.shape[0], -1)
    cur = samples.reshape(samples.shape[0], -1)
    return all(any(torch.equal(c, r) for r in rec) for c in cur)


def recorded_sigma(node: str, latent: dict, samples: torch.Tensor) -> float:
    """The sigma DDIM Invert recorded for these samples; an error naming ``sigmas`` otherwise."""
    if SIGMA_KEY not in latent:
        raise SVDiffNodeError(
            node,
            "sigmas: not connected, and the latent carries no noise level from DDIM Invert; "
            "connect DDIM Invert's SIGMAS (its first value is the latent's noise level)",
        )
    if not _same_samples(latent.get(SIGMA_SAMPLES_KEY), samples):
        raise SVDiffNodeError(
            node,
            f"sigmas: the latent was changed after DDIM Invert recorded its noise level "
            f"({latent[SIGMA_KEY]:.4g}); connect the SIGMAS whose first value is its noise level",
        )
    return float(latent[SIGMA_KEY])


def _denoiser(model_k, x, extra_args):
    s_in = x.new_ones([x.shape[0]])

    def denoise(xx, sigma):
        return model_k(xx, sigma * s_in, **extra_args)

    return denoise


class SVDiffDDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffDDIMInvert",
            display_name=INVERT,
            category=CATEGORY,
            description=(
                "DDIM inversion (SVDiff Eq. 6): turn a VAE-encoded image into the noisy latent from which "
                "KSamplerAdvanced (add_noise disable, sampler ddim/euler, same steps/scheduler/start step) "
                "or SamplerCustom with the output SIGMAS reconstructs it. Edit by changing the prompt. "
                "Flow models (SD3.x, Flux): sample back with SamplerCustomAdvanced given this node's NOISE, "
                "SIGMAS and LATENT (ComfyUI's other samplers start a flow model from the noise, not the latent)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An ε- or v-prediction model (SD1.x, SD2.x, SDXL) or a flow-matching model (SD3.x, Flux), "
                                        "e.g. the one fine-tuned on the image."),
                io.Conditioning.Input("positive", tooltip="The prompt to invert with (the paper uses the edited target prompt)."),
                io.Latent.Input("latent", tooltip="The image's latent from VAE Encode (clean, raw VAE scale)."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps; use the same number in the sampler that samples back."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance during inversion; the paper uses 1 (no guidance). Values other than 1 need a negative."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="Noise schedule; use the same one in the sampler that samples back."),
                io.Int.Input("start_at_step", default=0, min=0, max=10000,
                             tooltip="Invert up to this step only (SDEdit-style partial edit); give the sampler the same start_at_step."),
                io.Int.Input("end_at_step", default=10000, min=0, max=10000,
                             tooltip="Last sampler step to mirror, counted as KSamplerAdvanced counts; the latent is taken as clean there."),
                io.Int.Input("refine_iterations", default=0, min=0, max=100,
                             tooltip="0 = plain DDIM inversion as in the paper. n > 0 refines each step by n fixed-point "
                                     "iterations (n more model evaluations per step) so that sampling back reconstructs far more closely."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt, used only when cfg is not 1."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The inverted noisy latent, in the raw scale KSamplerAdvanced (add_noise disable) expects. "
                                                                "It records the noise level it was inverted to, which Slerp Noise reads when its sigmas input is unconnected."),
                io.Sigmas.Output(display_name="SIGMAS", tooltip="The sigmas inverted along (descending, as a sampler uses them); the first is the latent's noise level."),
                io.Noise.Output(display_name="NOISE", tooltip="For SamplerCustomAdvanced: starts sampling exactly at its latent_image (this LATENT, or "
                                                              "Slerp Noise's). Needed for flow models; for ε/v models it equals DisableNoise."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, cfg, scheduler, start_at_step, end_at_step, refine_iterations, negative=None) -> io.NodeOutput:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        check_latent(INVERT, samples)
        ms = model.get_model_object("model_sampling")
        kind = sampling_route(INVERT, ms)
        sigma_data = model_sigma_data(INVERT, ms)
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise SVDiffNodeError(INVERT, f"scheduler: unknown scheduler {scheduler!r}")
        if steps < 1:
            raise SVDiffNodeError(INVERT, f"steps: must be at least 1, got {steps}")
        if refine_iterations < 0:
            raise SVDiffNodeError(INVERT, f"refine_iterations: must be >= 0, got {refine_iterations}")
        cfg1 = abs(float(cfg) - 1.0) < 1e-9
        if negative is None and not cfg1:
            raise SVDiffNodeError(INVERT, f"negative: cfg {cfg} needs a negative conditioning (or set cfg to 1)")
        sigmas = inversion_sigmas(model, scheduler, steps, start_at_step, end_at_step)
        if len(sigmas) < 2:
            log.warning("[%s] start_at_step %d leaves no step to invert; the latent is returned unchanged", INVERT, start_at_step)
            return io.NodeOutput(record_sigma(latent, samples, float(sigmas[0])), sigmas, StartAtLatentNoise(model, kind))

        n_steps = len(sigmas) - 1
        pbar = progress(n_steps * (int(refine_iterations) + 1))

        def on_eval():
            check_interrupt()
            pbar.update(1)

        x0 = samples.float()
        # a flow model's sampler input is sigma0 * noise + (1 - sigma0) * latent (0 at sigma0 = 1):
        # start from the clean latent itself, processed in as the guider does
        flow_start = model.model.process_latent_in(x0) if kind == inversion.FLOW else None
        ns = noise_std(kind, ms)

        def invert_fn(model_k, x, sigmas_, extra_args=None, callback=None, disable=None):
            if flow_start is not None:
                x = flow_start.to(device=x.device, dtype=x.dtype)
            den = _denoiser(model_k, x, extra_args or {})
            return inversion.ddim_invert(den, x, sigmas_, int(refine_iterations), on_eval=on_eval, sigma_data=sigma_data,
                                         kind=kind, noise_std=ns)

        guider = comfy.samplers.CFGGuider(model)
        if negative is None:
            guider.inner_set_conds({"positive": positive})
        else:
            guider.set_conds(positive, negative)
        guider.set_cfg(float(cfg))
        zeros = torch.zeros_like(x0, device="cpu")
        try:
            out = guider.sample(zeros, x0, comfy.samplers.KSAMPLER(invert_fn), sigmas, seed=0)
        except inversion.InversionError as e:
            raise SVDiffNodeError(INVERT, str(e)) from None
        out = out.to(samples.device)
        if not torch.isfinite(out).all():
            raise SVDiffNodeError(INVERT, "the inversion produced NaN/inf values (check the model and the latent)")
        return io.NodeOutput(record_sigma(latent, out, float(sigmas[0])), sigmas, StartAtLatentNoise(model, kind))


class StartAtLatentNoise:
    """A NOISE (SamplerCustomAdvanced's ``noise`` input) that makes the sampler start exactly at
    its ``latent_image``, read as a noisy latent at the first sigma.

    ComfyUI starts from ``model_sampling.noise_scaling(sigma0, noise, latent)``: for an ε/v
    model ``noise * k + latent`` (k = sigma0 or sqrt(1 + sigma0^2)), so zero noise starts at the
    latent (what DisableNoise / KSamplerAdvanced's add_noise disable do); for a flow model
    ``sigma0 * s_n * noise + (1 - sigma0) * latent``, so the noise must be the latent itself
    (``latent / s_n`` in the model's space): then the start is the latent, exactly at sigma0 = 1.
    """

    def __init__(self, model, kind: str):
        self.seed = 0
        self.kind = kind
        self.model = model

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if self.kind != inversion.FLOW:
            return torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout, device="cpu")
        ms = self.model.get_model_object("model_sampling")
        x = self.model.model.process_latent_in(samples.to("cpu"))
        s = compat.flow_noise_scale(ms)
        return x if s == 1.0 else x / s


class SVDiffDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffDDIMSampler",
            display_name=SAMPLER,
            category=CATEGORY,
            description=(
                "DDIM with η as a SAMPLER for SamplerCustom / SamplerCustomAdvanced. η = 0 is ComfyUI's "
                "deterministic 'ddim' ('euler' on flow models such as SD3.x and Flux); η > 0 adds the noise DDIM defines "
                "(the paper uses 0.5 and 0.9 after inversion)."
            ),
            inputs=[
                io.Float.Input("eta", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="DDIM η: 0 = deterministic (reconstructs an inversion), 1 = DDPM-like; more η = more freedom to edit."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the per-step noise η injects (generated on the CPU, so the same on every device)."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta, seed) -> io.NodeOutput:
        eta = float(eta)
        if not (0.0 <= eta <= 1.0):
            raise SVDiffNodeError(SAMPLER, f"eta: must be in [0, 1], got {eta}")
        return io.NodeOutput(make_ddim_sampler(eta, int(seed)))


def make_ddim_sampler(eta: float, seed: int):
    """A ComfyUI SAMPLER running :func:`svdiff.inversion.ddim_sample` with eta and a seeded CPU generator."""

    def ddim_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        ms = model_k.inner_model.inner_model.model_sampling
        kind = sampling_route(SAMPLER, ms)
        extra_args = extra_args or {}
        den = _denoiser(model_k, x, extra_args)
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def noise(i):
            return torch.randn(x.shape, generator=gen, dtype=torch.float32, device="cpu").to(device=x.device, dtype=x.dtype)

        def cb(i, xx, denoised):
            check_interrupt()
            if callback is not None:
                callback({"x": xx, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

        try:
            return inversion.ddim_sample(den, x, sigmas, eta, noise, cb, kind=kind, noise_std=noise_std(kind, ms))
        except inversion.InversionError as e:
            raise SVDiffNodeError(SAMPLER, str(e)) from None

    # inpaint_options as ComfyUI's own "ddim" sampler object
    return comfy.samplers.KSAMPLER(ddim_fn, inpaint_options={"random": True})


class SVDiffSlerpNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffSlerpNoise",
            display_name=SLERP,
            category=CATEGORY,
            description=(
                "Perturb an inverted latent towards fresh noise by spherical interpolation (SVDiff Eq. 7), "
                "at the noise level it was inverted to. alpha 0 = the input, 1 = pure fresh noise."
            ),
            inputs=[
                io.Latent.Input("latent", tooltip="The inverted latent from DDIM Invert."),
                io.Model.Input("model", tooltip="The model the latent was inverted with (its latent format and noise schedule)."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Eq. 7's α: 0 returns the latent exactly, 1 returns fresh noise at the latent's noise level."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the fresh noise (ComfyUI's CPU noise, as KSampler makes it)."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="DDIM Invert's SIGMAS: its first value is the latent's noise level. Unconnected, the noise level "
                                        "DDIM Invert recorded in the LATENT is used; a latent without one (or changed since) is refused."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, latent, model, alpha, seed, sigmas=None) -> io.NodeOutput:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        check_latent(SLERP, samples)
        alpha = float(alpha)
        if not (0.0 <= alpha <= 1.0):
            raise SVDiffNodeError(SLERP, f"alpha: must be in [0, 1], got {alpha}")
        ms = model.get_model_object("model_sampling")
        kind = sampling_route(SLERP, ms)
        sigma_data = model_sigma_data(SLERP, ms)
        sigma = slerp_sigma(latent, samples, sigmas)
        if kind == inversion.FLOW and not 0.0 <= sigma <= 1.0:
            raise SVDiffNodeError(SLERP, f"sigmas: a flow-matching model's noise level lies in [0, 1]; got {sigma:.4g} "
                                         "(connect the SIGMAS DDIM Invert gave for this model)")
        if alpha == 0.0:
            return io.NodeOutput(record_sigma(latent, samples, sigma))
        eps = comfy.sample.prepare_noise(samples, int(seed), latent.get("batch_index"))
        z = model.model.process_latent_in(samples.float())
        try:
            mixed = inversion.slerp_noise(z, eps.to(z.device, torch.float32), alpha, sigma, sigma_data, kind, noise_std(kind, ms))
        except inversion.InversionError as e:
            raise SVDiffNodeError(SLERP, f"latent: {e}") from None
        return io.NodeOutput(record_sigma(latent, model.model.process_latent_out(mixed).to(samples.dtype), sigma))


def slerp_sigma(latent: dict, samples: torch.Tensor, sigmas) -> float:
    """The latent's noise level: SIGMAS' first value when connected, else the one DDIM Invert recorded."""
    if sigmas is None:
        return recorded_sigma(SLERP, latent, samples)
    if len(sigmas) == 0:
        raise SVDiffNodeError(SLERP, "sigmas: empty; connect DDIM Invert's SIGMAS (its first value is the latent's noise level)")
    return float(sigmas[0])


NODES = [SVDiffDDIMInvert, SVDiffDDIMSampler, SVDiffSlerpNoise]
