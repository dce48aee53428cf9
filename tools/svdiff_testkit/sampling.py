"""Core ComfyUI nodes called directly, for tests of guiders and samplers."""

from __future__ import annotations

import torch


def node(name: str):
    """A core or pack node class by its id (``nodes.NODE_CLASS_MAPPINGS``)."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def encode(clip, text: str):
    """CLIPTextEncode's CONDITIONING of ``text``."""
    return node("CLIPTextEncode")().encode(clip, text)[0]


def sample(model, guider, seed: int = 4, hw: int = 8, steps: int = 3) -> torch.Tensor:
    """SamplerCustomAdvanced with ``guider``: RandomNoise(seed), euler, ``steps`` normal sigmas,
    from an empty latent of hw x hw; the output samples."""
    noise = node("RandomNoise").execute(seed).result[0]
    sampler = node("KSamplerSelect").execute("euler").result[0]
    sigmas = node("BasicScheduler").execute(model, "normal", steps, 1.0).result[0]
    latent = {"samples": torch.zeros(1, 4, hw, hw)}
    out = node("SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, latent).result[0]
    return out["samples"].clone()


def neg_guider(model, pos, neg, empty, cfg: float, beta: float, **more):
    """The pack's Negative-Prompt Guider (Eq. 9) as a GUIDER; ``more``: further negatives/weights."""
    return node("SVDiffNegativeGuider").execute(model, pos, neg, empty, cfg, beta, **more).result[0]


def record_post_cfg(model):
    """A clone whose post-CFG hook records every call's arguments (and changes nothing)."""
    calls = []
    m = model.clone()

    def hook(args):
        calls.append({k: args[k].clone() for k in ("denoised", "cond_denoised", "uncond_denoised")})
        return args["denoised"]

    m.set_model_sampler_post_cfg_function(hook)
    return m, calls


def guider_graph(ckpt_name: str, **guider_inputs) -> dict:
    """An API prompt: the checkpoint -> positive / two-subject negative / empty prompts ->
    Negative-Prompt Guider (cfg 5, beta 0.5, plus ``guider_inputs``) -> SamplerCustomAdvanced
    (euler, 2 steps, 64 px) -> VAEDecode -> PreviewImage (node "12").  Extra CONDITIONING
    inputs can name node "13", the prompt "photo of a dog"."""
    enc = lambda text: {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}  # noqa: E731
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": enc("photo of a sks dog and a hta sculpture"),
        "3": enc("photo of a dog and a sculpture"),
        "4": enc(""),
        "13": enc("photo of a dog"),
        "5": {"class_type": "SVDiffNegativeGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                             "empty": ["4", 0], "cfg": 5.0, "beta": 0.5, **guider_inputs}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["5", 0], "sampler": ["7", 0],
                                                                "sigmas": ["8", 0], "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
