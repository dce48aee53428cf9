"""SVDiff in plain PyTorch: spectral shifts of a diffusion model's weights.

Han et al., "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning", ICCV 2023.
Nothing in this package imports ComfyUI; ``nodes/`` is the glue.
"""

__version__ = "0.1.0"
