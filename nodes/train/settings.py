"""SVDiff Train's scalar settings: the single source of every default, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ...svdiff import layers as L
from ...svdiff.subsets import SUBSET_NAMES
from ...svdiff.training import LR_SCHEDULES
from ..common import SVDiffNodeError

NODE = "SVDiff Train"
NONE = "[None]"
INJECTION_KEY = "svdiff_train"
# Guidance scale of the generated prior images (DreamBooth's class images): a fixed choice of
# this pack, not a node input.
PRIOR_CFG = 7.0
IMAGE_FITS = ("aspect buckets", "centre-crop")


def err(field: str, msg: str) -> SVDiffNodeError:
    return SVDiffNodeError(NODE, f"{field}: {msg}")


@dataclass(frozen=True)
class TrainSettings:
    """Every scalar input of SVDiff Train with its default (the node's schema reads them here)."""

    prompt: str = "photo of a sks dog"
    captions: str = ""
    image_fit: str = "aspect buckets"
    class_prompt: str = "photo of a dog"
    train_text_encoder: bool = False
    train_t5: bool = False
    prior_weight: float = 1.0
    num_prior_images: int = 8
    prior_steps: int = 20
    subset: str = "UNet"
    rank: int = 0
    steps: int = 500
    batch_size: int = 1
    learning_rate: float = 0.001
    learning_rate_1d: float = 0.000001
    optimizer: str = "AdamW"
    seed: int = 0
    resolution: int = 512
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    side_path: str = "auto"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_accumulation: int = 1
    save_every: int = 100
    preview_every: int = 100
    validation_prompt: str = ""
    filename_prefix: str = "svdiff/train"
    resume_from: str = NONE
    unmix_weight: float = 0.0
    attention_reg_weight: float = 0.0
    attention_threshold: float = 0.5
    attention_resolutions: str = "all"

    @classmethod
    def from_inputs(cls, inputs: dict) -> "TrainSettings":
        """The settings given in ``inputs`` (missing or None: the default), converted and checked.

        Raises SVDiffNodeError naming the node and the first field that is out of range.
        """
        given = {f.name: inputs[f.name] for f in fields(cls) if inputs.get(f.name) is not None}
        raw = cls(**given)
        raw.validate()
        return cls(**{**given, **raw.converted()})

    def converted(self) -> dict:
        return dict(
            prompt=str(self.prompt or ""), class_prompt=str(self.class_prompt or ""), captions=str(self.captions or ""),
            train_text_encoder=bool(self.train_text_encoder), train_t5=bool(self.train_t5), gradient_checkpointing=bool(self.gradient_checkpointing),
            prior_weight=float(self.prior_weight), num_prior_images=int(self.num_prior_images),
            prior_steps=int(self.prior_steps), rank=int(self.rank), steps=int(self.steps), batch_size=int(self.batch_size),
            seed=int(self.seed), resolution=int(self.resolution), save_every=int(self.save_every or 0),
            preview_every=int(self.preview_every or 0), validation_prompt=str(self.validation_prompt or ""),
            filename_prefix=self.filename_prefix or "svdiff/train", resume_from=self.resume_from or NONE,
            warmup_steps=int(self.warmup_steps), grad_accumulation=int(self.grad_accumulation),
            unmix_weight=float(self.unmix_weight), attention_reg_weight=float(self.attention_reg_weight),
            attention_threshold=float(self.attention_threshold),
        )

    def validate(self) -> None:
        lr, lr_1d = self.learning_rate, self.learning_rate_1d
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise err("learning_rate", f"must be a positive finite number, got {lr}")
        if not isinstance(lr_1d, (int, float)) or not math.isfinite(lr_1d) or lr_1d < 0:
            raise err("learning_rate_1d", f"must be a finite number >= 0 (0 freezes 1-D weights), got {lr_1d}")
        if not math.isfinite(float(self.prior_weight)) or float(self.prior_weight) < 0:
            raise err("prior_weight", f"must be a finite number >= 0, got {float(self.prior_weight)}")
        if int(self.steps) < 0:
            raise err("steps", f"must be >= 0, got {int(self.steps)}")
        if int(self.batch_size) < 1:
            raise err("batch_size", f"must be >= 1, got {int(self.batch_size)}")
        if int(self.resolution) % 64 or int(self.resolution) < 64:
            raise err("resolution", f"must be a positive multiple of 64, got {int(self.resolution)}")
        if self.subset not in SUBSET_NAMES:
            raise err("subset", f"unknown subset {self.subset!r}; one of {', '.join(SUBSET_NAMES)}")
        if int(self.rank) < 0:
            raise err("rank", f"must be >= 0 (0 = all singular values), got {int(self.rank)}")
        self._validate_schedule()
        if self.image_fit not in IMAGE_FITS:
            raise err("image_fit", f"unknown choice {self.image_fit!r}; one of {', '.join(IMAGE_FITS)}")
        for field, v in (("unmix_weight", self.unmix_weight), ("attention_reg_weight", self.attention_reg_weight)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise err(field, f"must be a finite number >= 0 (0 = off), got {v}")
        t = self.attention_threshold
        if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise err("attention_threshold", f"must be in [0, 1) (a fraction of the class token's peak attention), got {t}")

    def _validate_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise err("lr_schedule", f"unknown schedule {self.lr_schedule!r}; one of {', '.join(LR_SCHEDULES)}")
        if int(self.warmup_steps) < 0:
            raise err("warmup_steps", f"must be >= 0, got {int(self.warmup_steps)}")
        if int(self.grad_accumulation) < 1:
            raise err("grad_accumulation", f"must be >= 1 (micro-batches per optimizer step), got {int(self.grad_accumulation)}")

    @property
    def force_route(self):
        """The layer route forced by ``side_path`` (None: chosen per layer by the cost model)."""
        return self.side_path if self.side_path in L.ROUTES else None

    @property
    def attention(self) -> bool:
        """Whether an attention loss is on (then the cross-attention maps are captured)."""
        return self.unmix_weight > 0 or self.attention_reg_weight > 0


DEFAULTS = TrainSettings()


def training_dtype(name: str, device, should_use_bf16) -> torch.dtype:
    """The compute dtype of ``training_dtype`` on ``device``; "auto": bf16 where the device has
    it (``should_use_bf16(device)``), fp32 on the CPU."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16  # with torch.amp gradient scaling (run.gradient_scaler)
    if device.type != "cpu" and should_use_bf16(device):
        return torch.bfloat16
    return torch.float32
