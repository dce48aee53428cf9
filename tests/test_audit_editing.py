"""Paper audit, single-image editing (Sec. 3.4, Eq. 6-7).

- Slerp Noise without SIGMAS takes the sigma DDIM Invert recorded in its LATENT (not the
  model's sigma_max), and refuses a latent that carries none.
"""

import pytest
import torch

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
        return _res(editing().SVDiffDDIMInvert.execute(model, pos, latent, steps, 1.0, scheduler, start, end, refine))


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
