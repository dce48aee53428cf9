"""SVDiff Train: DreamBooth-style spectral-shift training inside the ComfyUI graph.

Glue only: the math is in ``svdiff.layers`` (shifted layers, side path / recompose),
``svdiff.losses`` (Eq. 3), ``svdiff.attention`` (unmix loss, Eq. 10) and ``svdiff.training``
(optimizer, per-step randomness, state).  The pieces, one concern each:

* ``settings``  ``TrainSettings``: every scalar input, its default and its validation;
* ``layers``    the injected layer forwards and the delta parameters (``Trainable``);
* ``data``      images/prompts to latents/conditionings, prior generation, Cut-Mix data;
* ``sources``   the instance and prior data of each route, and ``batch(step)`` per route;
* ``attention`` the attention regularisers as plain functions;
* ``run``       ``train()``: clones, resume, ``train_step``, periodic saves, ``TrainResult``;
* ``node``      the ``SVDiffTrain`` node.

Mechanism: a CLONE of the MODEL (and of the CLIP when its text encoder is trained) gets a
module injection (``ModelPatcher.set_injections``) while it is loaded; ComfyUI ejects it on
unpatch, and the run unloads the clone when it is done.  No base weight is ever written,
copied or given a gradient.
"""

from .data import CutMixData, denoise_x0, encode_prompt, evaluate_denoising_loss, model_kwargs, prepare_images
from .layers import TrainInjection, Trainable
from .node import NODES, SVDiffTrain
from .run import TrainResult, train, train_step
from .settings import DEFAULTS, NODE, NONE, TrainSettings

__all__ = ["CutMixData", "DEFAULTS", "NODE", "NODES", "NONE", "SVDiffTrain", "TrainInjection", "TrainResult", "TrainSettings",
           "Trainable", "denoise_x0", "encode_prompt", "evaluate_denoising_loss", "model_kwargs", "prepare_images", "train",
           "train_step"]
