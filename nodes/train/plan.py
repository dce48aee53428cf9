"""SVDiff Train's memory plan before any work (``svdiff.memory_plan`` on the connected MODEL).

``check`` plans the run from the model's weights and the settings, shows the plan on the node,
and refuses the run (an SVDiffNodeError naming a subset/rank that fits) when a device limit is
known and the plan exceeds it.  On the CPU no limit is known and nothing is refused.
"""

from __future__ import annotations

import torch

import comfy.model_management as mm

from ...svdiff import memory_plan as M
from ...svdiff.subsets import SubsetError, family_of, select, subsets_for
from .. import comfy_compat as compat
from ..adapter import UNET_PREFIX, architecture_of, shiftable_shapes
from .layers import text_encoder_keys
from .settings import TrainSettings, err, training_dtype

#: Bytes a run may use on a device, or None where unknown (tests replace it with a fake limit).
device_limit = M.device_free_bytes


def _weights_bytes(patcher) -> int:
    return M.tensor_bytes(v for v in patcher.model.state_dict().values())


def _text_encoder_shapes(clip, train_t5: bool) -> dict:
    """The text-encoder weights SVDiff Train shifts (the training clone's choice)."""
    shapes = shiftable_shapes(clip.patcher)
    return {k: shapes[k] for k in text_encoder_keys(shapes, train_t5)}


def _profile_architecture(model) -> str:
    """The model configuration's class name, or the nearest base class with an activation
    profile (a subclass such as a fine-tune's own type plans like its family)."""
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    for c in type(cfg).__mro__ if cfg is not None else ():
        if c.__name__ in M.FAMILIES:
            return c.__name__
    return architecture_of(model)


def plan_inputs(model, clip, s: TrainSettings) -> tuple:
    """(PlanInputs of the run, subset name -> its trained shapes)."""
    shapes = shiftable_shapes(model, UNET_PREFIX)
    try:
        trained = {k: shapes[k] for k in select(shapes, s.subset)}
    except SubsetError as e:  # a subset of another model family
        raise err("subset", str(e)) from None
    subsets = {name: {k: shapes[k] for k in select(shapes, name)} for name in subsets_for(family_of(shapes))}
    train_te = bool(s.train_text_encoder) and clip is not None
    model_bytes = _weights_bytes(model) + (_weights_bytes(clip.patcher) if train_te else 0)
    tdt = training_dtype(s.training_dtype, model.load_device, mm.should_use_bf16)
    p = M.PlanInputs(
        model_bytes=model_bytes, all_shapes=shapes, trained_shapes=trained, rank=s.rank, optimizer=s.optimizer,
        resolution=s.resolution, samples=s.batch_size * (2 if s.prior_weight > 0 else 1),
        compute_bytes=torch.empty((), dtype=tdt).element_size(),
        checkpointing=s.gradient_checkpointing, architecture=_profile_architecture(model),
        extra_shapes=_text_encoder_shapes(clip, s.train_t5) if train_te else {},
    )
    return p, subsets


def check(model, clip, s: TrainSettings, notes: list) -> str:
    """The plan as one line of text (shown on the node at once); raises when it cannot fit."""
    p, subsets = plan_inputs(model, clip, s)
    pl = M.plan(p)
    limit = device_limit(model.load_device)
    if limit is None:
        text = f"{pl.line()}; no device limit known ({model.load_device}): not checked"
    else:
        text = f"{pl.line()}; {M.gib(limit)} free on {model.load_device}"
    if pl.note:
        notes.append(f"memory plan: {pl.note}")
    compat.progress_text(text)
    if limit is not None and pl.total > limit:
        raise err("subset/rank", M.refusal(p, pl, limit, subsets, s.subset))
    return text
