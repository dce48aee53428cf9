"""DDIM inversion round trip: ours (plain and refined) against the diffusers anchor.

Anchor: diffusers' ``DDIMInverseScheduler`` then ``DDIMScheduler`` (eta 0), configured as
SD1.5 ships them, stepping the VP latent with the eps-predictions of the same model.
Ours: ``svdiff.inversion.ddim_invert`` then ``ddim_sample`` (= ComfyUI's "ddim") on
ComfyUI's ``ddim_uniform`` sigmas, driven by the same model through the same function.
Reported: mean |z_back - z0| in model space for unit-std latents, the ratios against the
anchor, and the model evaluations each used.  Goal: plain <= anchor, refined <= anchor / 10.

Models: the tiny random SD1-style UNet as is (much rougher in x than a trained UNet, a hard
case for any inversion) and damped (eps-hat x 0.1, a trained-model-like Lipschitz constant).
Run: .venv/bin/python bench/bench_inversion.py   (needs requirements-bench.txt: diffusers)
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402  (puts tools/ on sys.path)

STEPS = (20, 50)
REFINE = (5, 10)
DAMP = 0.1


def main() -> int:
    import torch

    try:
        from diffusers import DDIMInverseScheduler, DDIMScheduler
    except ImportError:
        print("diffusers is not installed: pip install -r requirements-bench.txt", flush=True)
        return 1
    state = _common.boot()
    import comfy.model_management as mm
    import comfy.samplers
    import nodes
    from svdiff_testkit import tiny

    inv = sys.modules[state["pack_name"] + ".svdiff.inversion"]
    mp, clip = tiny.build(0)
    cond = nodes.CLIPTextEncode().encode(clip, "a photo of a red chair")[0][0][0]
    mm.load_models_gpu([mp], force_full_load=True)
    ms = mp.get_model_object("model_sampling")
    sd15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # model-space, unit std
    ctx = cond.expand(x0.shape[0], -1, -1)
    print(f"device {mm.get_torch_device()}, latent {tuple(x0.shape)}, diffusers anchor vs ours (mean |z_back - z0|)", flush=True)

    for damp in (1.0, DAMP):
        calls = [0]

        def denoise(x, sigma, damp=damp):
            calls[0] += 1
            s = sigma.reshape(1).expand(x.shape[0]).float()
            d = mp.model.apply_model(x, s, c_crossattn=ctx)
            return x - damp * (x - d)

        def eps_at(z, t):
            """eps-prediction at diffusers' timestep t of the VP latent z, via the same denoiser."""
            sigma = ms.sigmas[int(t)]
            x = z * (1 + sigma**2) ** 0.5  # VP -> VE latent
            return (x - denoise(x, sigma)) / sigma

        def anchor(n):
            isch, fsch = DDIMInverseScheduler(**sd15), DDIMScheduler(**sd15)
            isch.set_timesteps(n)
            fsch.set_timesteps(n)
            z = x0.clone()
            for t in isch.timesteps:
                z = isch.step(eps_at(z, t), t, z).prev_sample
            for t in fsch.timesteps:
                z = fsch.step(eps_at(z, t), t, z, eta=0.0).prev_sample
            return (z - x0).abs().mean().item()

        def ours(n, refine):
            sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", n)
            xT = inv.ddim_invert(denoise, x0, sigmas, refine)
            return (inv.ddim_sample(denoise, xT, sigmas) - x0).abs().mean().item()

        label = "tiny UNet" if damp == 1.0 else f"tiny UNet, eps x {damp}"
        with torch.no_grad():
            for n in STEPS:
                calls[0] = 0
                t0 = time.perf_counter()
                a = anchor(n)
                ta, ca = time.perf_counter() - t0, calls[0]
                calls[0] = 0
                t0 = time.perf_counter()
                p = ours(n, 0)
                tp, cp = time.perf_counter() - t0, calls[0]
                print(f"[{label}] {n} steps: anchor {a:.3e} ({ca} evals, {ta:.1f}s); "
                      f"plain {p:.3e} = {p / a:.2f}x anchor ({cp} evals, {tp:.1f}s)", flush=True)
                for r in REFINE:
                    calls[0] = 0
                    t0 = time.perf_counter()
                    e = ours(n, r)
                    tr, cr = time.perf_counter() - t0, calls[0]
                    print(f"    refine {r:2d}: {e:.3e} = anchor / {a / e:.1f}, plain / {p / e:.1f} ({cr} evals, {tr:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
