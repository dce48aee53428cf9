"""Cut-Mix Builder node (Sec. 3.3, appendix C.2): multi-subject training sets for SVDiff Train.

Glue only: ``svdiff.cutmix`` builds the samples.  Subjects come in four fixed optional
slots (ComfyUI 0.3.75's editor cannot grow inputs): a slot is used when its ``images_N``
is connected.  The output value (``SVDIFF_TRAINING_SET``) is a
``svdiff.cutmix.CutMixTrainingSet``; a preview grid shows the first samples training
will draw (steps 0, 1, ...), with their prompts.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..svdiff.cutmix import LAYOUTS, CutMixConfig, CutMixTrainingSet, Subject, preview_grid
from .common import CATEGORY, SVDiffNodeError, TrainingSetType

NODE_NAME = "Cut-Mix Builder"
SLOTS = 4
DEFAULT_WORDS = [("sks", "dog"), ("hta", "sculpture"), ("zwx", "cat"), ("qtx", "toy")]


def _slot_inputs(n: int) -> list:
    token, cls = DEFAULT_WORDS[n - 1]
    return [
        io.Image.Input(f"images_{n}", optional=True,
                       tooltip=f"Subject {n}: its training images (the slot is used when this is connected)."),
        io.String.Input(f"token_{n}", default=token,
                        tooltip=f"Subject {n}: the special token [V] naming it in prompts (a rare word, e.g. '{token}')."),
        io.String.Input(f"class_word_{n}", default=cls,
                        tooltip=f"Subject {n}: its coarse class word (e.g. '{cls}'); prior prompts use it alone."),
        io.Image.Input(f"prior_images_{n}", optional=True,
                       tooltip=f"Subject {n}: optional class (prior-preservation) images, e.g. generated "
                               f"from 'photo of a {cls}'."),
    ]


class SVDiffCutMixBuilder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = []
        for n in range(1, SLOTS + 1):
            inputs += _slot_inputs(n)
        inputs += [
            io.Float.Input("probability", default=0.6, min=0.0, max=0.99, step=0.01,
                           tooltip="Chance that a training sample is cut-mixed from two subjects (paper: 0.6). "
                                   "Must stay below 1, or the model never sees the subjects apart."),
            io.Combo.Input("layout", options=list(LAYOUTS), default="left-right",
                           tooltip="How two subjects share a mixed image: side by side, one above the other "
                                   "(both 1:1, the paper's layouts), or random orientation and split ratio (this pack's "
                                   "extension: appendix C.2 leaves random layouts to future work)."),
            io.Float.Input("and_prompt_probability", default=0.5, min=0.0, max=1.0, step=0.01,
                           tooltip="Chance that a mixed prompt is 'photo of a A and a B' (random order) "
                                   "instead of naming the layout ('... on the left and ... on the right')."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                         tooltip="Seed of the sampling: the sample of each training step is fixed by it."),
            io.Int.Input("resolution", default=512, min=8, max=4096, step=8,
                         tooltip="Training resolution in pixels: images are resized (shorter side) and "
                                 "centre-cropped to it, as SVDiff Train does."),
            io.Int.Input("preview_count", default=8, min=1, max=32,
                         tooltip="How many of the first training samples the preview grid shows."),
        ]
        return io.Schema(
            node_id="SVDiffCutMixBuilder",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Builds a Cut-Mix-Unmix training set (SVDiff Sec. 3.3) from two to four subjects: mixed "
                "samples put two subjects side by side with a prompt naming both, the rest show one "
                "subject. Feed it to SVDiff Train instead of plain images."
            ),
            inputs=inputs,
            outputs=[
                TrainingSetType.Output(display_name="training_set"),
                io.Image.Output(display_name="preview"),
                io.String.Output(display_name="preview_prompts"),
            ],
        )

    @classmethod
    def execute(cls, probability=0.6, layout="left-right", and_prompt_probability=0.5, seed=0,
                resolution=512, preview_count=8, **slots) -> io.NodeOutput:
        training_set = build_training_set(slots, probability, layout, and_prompt_probability, seed, resolution)
        samples = training_set.preview(int(preview_count))
        grid = preview_grid(samples, columns=min(4, len(samples)))
        prompts = "\n".join(f"{i}: {s.prompt}" for i, s in enumerate(samples))
        return io.NodeOutput(training_set, grid, prompts)


def build_training_set(slots: dict, probability, layout, and_prompt_probability, seed, resolution) -> CutMixTrainingSet:
    """The CutMixTrainingSet of the node's inputs; errors name the offending field."""
    subjects = []
    used = []
    with torch.inference_mode(False):  # keep ordinary tensors: training builds graphs on them
        for n in range(1, SLOTS + 1):
            images = slots.get(f"images_{n}")
            prior = slots.get(f"prior_images_{n}")
            if images is None:
                if prior is not None:
                    raise SVDiffNodeError(NODE_NAME, f"prior_images_{n}: given without images_{n}")
                continue
            if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
                shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                raise SVDiffNodeError(NODE_NAME, f"images_{n}: subject {n} has no images ({shape})")
            if prior is not None and (not isinstance(prior, torch.Tensor) or prior.ndim != 4 or prior.shape[0] == 0):
                raise SVDiffNodeError(NODE_NAME, f"prior_images_{n}: the prior batch of subject {n} has no images")
            token = str(slots.get(f"token_{n}", "") or "").strip()
            cls_word = str(slots.get(f"class_word_{n}", "") or "").strip()
            if not token:
                raise SVDiffNodeError(NODE_NAME, f"token_{n}: subject {n} needs a special token (e.g. 'sks')")
            if not cls_word:
                raise SVDiffNodeError(NODE_NAME, f"class_word_{n}: subject {n} needs a class word (e.g. 'dog')")
            try:
                subjects.append(Subject(images.clone(), token, cls_word, prior.clone() if prior is not None else None))
            except ValueError as e:
                raise SVDiffNodeError(NODE_NAME, f"subject {n}: {e}") from e
            used.append(n)
        if len(subjects) < 2:
            raise SVDiffNodeError(
                NODE_NAME,
                f"images_1, images_2: Cut-Mix needs at least two subjects; connect the images of two or more "
                f"slots (connected: {', '.join(f'images_{n}' for n in used) or 'none'})",
            )
        seen = {}
        for n, s in zip(used, subjects):
            if s.token in seen:
                raise SVDiffNodeError(NODE_NAME, f"token_{n}: '{s.token}' is already subject {seen[s.token]}'s token")
            seen[s.token] = n
        try:
            config = CutMixConfig(probability, layout, and_prompt_probability, seed)
        except ValueError as e:
            raise SVDiffNodeError(NODE_NAME, str(e)) from e
        try:
            return CutMixTrainingSet(subjects, config, resolution)
        except ValueError as e:
            raise SVDiffNodeError(NODE_NAME, str(e)) from e


NODES = [SVDiffCutMixBuilder]
