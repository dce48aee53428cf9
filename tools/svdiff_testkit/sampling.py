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
