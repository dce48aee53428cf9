"""The input dict of SVDiff Train (``nodes.train.train``) for tests and tools that call it directly."""

from __future__ import annotations

NONE = "[None]"  # the resume_from choice for "start from zero"


def train_inputs(checkpoint, **overrides) -> dict:
    """SVDiff Train's inputs for ``checkpoint`` = (MODEL, CLIP, VAE): two steps on the UNet at
    64 px, batch 1, no prior preservation, nothing saved, no previews, AdamW, seed 0, no
    training images; ``overrides`` set the rest (images or training_set) and change any of these."""
    model, clip, vae = checkpoint
    a = dict(model=model, clip=clip, vae=vae, images=[], prompt="photo of a sks dog", class_prompt="photo of a dog",
             prior_weight=0.0, num_prior_images=2, prior_steps=3, subset="UNet", rank=0, steps=2, batch_size=1,
             learning_rate=1e-2, learning_rate_1d=1e-4, optimizer="AdamW", seed=0, resolution=64,
             gradient_checkpointing=False, training_dtype="auto", side_path="auto", save_every=0, preview_every=0,
             filename_prefix="svdiff/test", resume_from=NONE)
    a.update(overrides)
    return a
