"""Cut-Mix-Unmix data augmentation for multi-subject training (Sec. 3.3, Fig. 3, appendix C.2).

A :class:`CutMixTrainingSet` turns two or more subjects (each a batch of images with its
special token and class word) into training samples.  With probability
``config.probability`` (the paper uses 0.6, never 1: Sec. 3.3) a sample is *cut-mixed*:
two subjects are drawn without replacement and their images are placed side by side
("left-right"), one above the other ("up-down") or at a random split ("random", this
pack's extension, see :class:`CutMixConfig`), and the prompt names both, e.g.

* ``"photo of a sks dog and a hta sculpture"`` (with ``and_prompt_probability``, subject
  order random), or
* ``"photo of a sks dog on the left and a hta sculpture on the right"`` /
  ``"photo of a sks dog at the top and a hta sculpture at the bottom"`` (names the layout).

Otherwise the sample is one subject's image with ``"photo of a sks dog"``.  Prior
(class-preservation) samples are built the same way from the subjects' prior images with
the class words only (``"photo of a dog and a sculpture"``).

Every sample carries one region mask per subject it shows (they cover the image exactly
once) and the word that names each region in the prompt, which the attention "unmix"
regularisation (``svdiff.attention.unmix_loss``) needs.

Each region is filled the way a training image is: the subject's image is resized so its
shorter side covers the region and centre-cropped to it (:func:`resize_cover`), so the
subject stays whole and centred instead of being cut in half.

Plain PyTorch; imports nothing from ComfyUI.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

LAYOUTS = ("left-right", "up-down", "random")
# Split ratio range of the "random" layout (fraction of the image given to the first region).
RANDOM_SPLIT_RANGE = (0.25, 0.75)


# --------------------------------------------------------------------------------------
# Resizing (shared with SVDiff Train)
# --------------------------------------------------------------------------------------
def _check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected an image tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected images shaped [N, H, W, 3], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what}: the batch has no images")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"{what}: images of size {tuple(images.shape[1:3])} are empty")
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    elif images.shape[-1] == 4:
        images = images[..., :3]  # drop alpha
    return images


def resize_cover(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [N,H,W,C] images so they cover (height, width), then centre-crop to it.

    The scale is max(height/H, width/W) (the shorter side, relative to the target, fits
    exactly), so the aspect ratio is kept and nothing is padded.  Bilinear with
    anti-aliasing; values stay in the input range.  Returns float32 [N,height,width,C].
    """
    if height < 1 or width < 1:
        raise ValueError(f"target size {height}x{width} is empty")
    n, h, w, c = images.shape
    x = images.detach().float()
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        x = x.movedim(-1, 1)
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=(rh < h or rw < w))
        x = x.movedim(1, -1)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[:, top:top + height, left:left + width, :]
    lo, hi = images.min().item(), images.max().item()
    return x.clamp(min(lo, 0.0), max(hi, 1.0)).contiguous()


def resize_center_crop(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` and centre-crop to a square (training input).

    ``images``: [N,H,W,3] (or [H,W,3]) in [0,1]; returns float32 [N,resolution,resolution,3].
    This is the preprocessing of SVDiff training images (DreamBooth-style square crops).
    """
    resolution = int(resolution)
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return resize_cover(_check_images(images, "images"), resolution, resolution)


# --------------------------------------------------------------------------------------
# Configuration and values
# --------------------------------------------------------------------------------------
@dataclass(eq=False)
class Subject:
    """One personalised subject: its images, special token [V] and coarse class word.

    ``images``: [N,H,W,3] in [0,1] (ComfyUI IMAGE layout); ``prior_images`` (optional):
    class images for prior preservation, same layout.
    """

    images: torch.Tensor
    token: str
    class_word: str
    prior_images: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.token = (self.token or "").strip()
        self.class_word = (self.class_word or "").strip()
        if not self.token:
            raise ValueError("token: the special token (e.g. 'sks') is empty")
        if not self.class_word:
            raise ValueError("class_word: the class word (e.g. 'dog') is empty")
        self.images = _check_images(self.images, "images")
        if self.prior_images is not None:
            self.prior_images = _check_images(self.prior_images, "prior_images")

    @property
    def instance_words(self) -> str:
        return f"{self.token} {self.class_word}"


@dataclass
class CutMixConfig:
    """Settings of Cut-Mix-Unmix (Sec. 3.3, appendix C.2).

    probability: chance that a sample is cut-mixed, in [0, 1) (the paper uses 0.6; 1 would
        leave the model no single-subject samples to tell the subjects apart).
    layout: "left-right" or "up-down" (1:1 split, the paper's default), or "random": each
        mixed sample picks left-right or up-down with equal chance and a split ratio drawn
        uniformly from RANDOM_SPLIT_RANGE.  "random" is this pack's extension: appendix C.2
        reports that random left/right split ratios behaved like the fixed 1:1 split and
        leaves random layouts to future work.
    and_prompt_probability: chance that a mixed prompt is "photo of a A and a B" (subject
        order random) instead of naming the layout ("... on the left and ... on the right").
    seed: every sample is a deterministic function of (seed, step, prior).
    """

    probability: float = 0.6
    layout: str = "left-right"
    and_prompt_probability: float = 0.5
    seed: int = 0

    def __post_init__(self):
        p = float(self.probability)
        if not (0.0 <= p < 1.0):
            raise ValueError(
                f"probability: must be in [0, 1), got {self.probability} (1 would leave no single-subject samples)"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        a = float(self.and_prompt_probability)
        if not (0.0 <= a <= 1.0):
            raise ValueError(f"and_prompt_probability: must be in [0, 1], got {self.and_prompt_probability}")
        self.probability, self.and_prompt_probability, self.seed = p, a, int(self.seed)


@dataclass(eq=False)
class CutMixSample:
    """One training sample.

    image: [H,W,3] float32 in [0,1].
    prompt: the training prompt.
    masks: [S,H,W] float32 0/1, one per subject shown (S = 1 or 2), covering the image
        exactly once; a single-subject sample has one mask of ones.
    words: the word naming each region in the prompt, in mask order: the special token
        for instance samples, the class word for prior samples (which have no token).
    class_words: each region's class word, in mask order.
    tokens: each region's special token, in mask order (also for prior samples).
    subjects: indices into the training set's subjects, in mask order.
    layout: "single", "left-right" or "up-down" (what this sample actually is).
    split: fraction of the image given to the first region (1.0 for single samples).
    prior: whether this is a prior-preservation sample.
    """

    image: torch.Tensor
    prompt: str
    masks: torch.Tensor
    words: list
    class_words: list
    tokens: list = field(default_factory=list)
    subjects: list = field(default_factory=list)
    layout: str = "single"
    split: float = 1.0
    prior: bool = False

    @property
    def mixed(self) -> bool:
        return self.masks.shape[0] > 1


def _phrase(subject: Subject, prior: bool) -> str:
    return subject.class_word if prior else subject.instance_words


def single_prompt(subject: Subject, prior: bool = False) -> str:
    """"photo of a sks dog" (instance) or "photo of a dog" (prior)."""
    return f"photo of a {_phrase(subject, prior)}"


def mixed_prompt(first: Subject, second: Subject, orientation: str, and_prompt: bool,
                 prior: bool = False, and_order: Sequence[int] = (0, 1)) -> str:
    """The Cut-Mix prompt (Sec. 3.3, Fig. 3).

    ``first`` occupies the left (or top) region.  ``and_prompt``: "photo of a A and a B"
    with A, B in ``and_order``; otherwise the layout is named: "photo of a A on the left and
    a B on the right" or "photo of a A at the top and a B at the bottom".
    """
    pair = (first, second)
    if and_prompt:
        a, b = (pair[i] for i in and_order)
        return f"photo of a {_phrase(a, prior)} and a {_phrase(b, prior)}"
    if orientation == "left-right":
        where = ("on the left", "on the right")
    elif orientation == "up-down":
        where = ("at the top", "at the bottom")
    else:
        raise ValueError(f"unknown orientation {orientation!r}")
    return f"photo of a {_phrase(first, prior)} {where[0]} and a {_phrase(second, prior)} {where[1]}"


# --------------------------------------------------------------------------------------
# The training set
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What a sample shows: one subject, or two with their layout and prompt form."""

    subjects: tuple
    orientation: str = "single"
    ratio: float = 1.0
    and_prompt: bool = False
    and_order: tuple = (0, 1)


class CutMixTrainingSet:
    """Subjects + Cut-Mix settings + training resolution: draws samples by step.

    ``sample(step, prior)`` is deterministic in (config.seed, step, prior).  The prior sample
    of a step is paired with its instance sample (same subjects, layout and prompt form, see
    ``_plan``); it falls back to the subjects that have prior images when a subject of the
    instance sample has none.
    """

    def __init__(self, subjects: Sequence[Subject], config: Optional[CutMixConfig] = None, resolution: int = 512):
        subjects = list(subjects)
        if len(subjects) < 2:
            raise ValueError(f"subjects: Cut-Mix needs at least 2 subjects, got {len(subjects)}")
        tokens = [s.token for s in subjects]
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        if dup:
            raise ValueError(f"token: each subject needs its own special token; {', '.join(dup)} is used twice")
        resolution = int(resolution)
        if resolution < 2:
            raise ValueError(f"resolution: must be at least 2, got {resolution}")
        self.subjects = subjects
        self.config = config or CutMixConfig()
        self.resolution = resolution
        # Square single-subject images are reused on every step: resize them once.
        self._square = [resize_center_crop(s.images, resolution) for s in subjects]
        self._square_prior = [
            resize_center_crop(s.prior_images, resolution) if s.prior_images is not None else None for s in subjects
        ]

    # ----------------------------------------------------------------------------------
    @property
    def has_prior(self) -> bool:
        return any(s.prior_images is not None for s in self.subjects)

    def _rng(self, step: int, prior: bool) -> random.Random:
        # A string seed is hashed with SHA-512 by random.Random: stable across runs/platforms.
        return random.Random(f"svdiff-cutmix:{self.config.seed}:{int(step)}:{int(bool(prior))}")

    def _pool(self, prior: bool) -> list:
        if not prior:
            return list(range(len(self.subjects)))
        pool = [i for i, s in enumerate(self.subjects) if s.prior_images is not None]
        if not pool:
            raise ValueError("prior_images: no subject has prior images, so no prior sample can be built")
        return pool

    def _images(self, i: int, prior: bool) -> torch.Tensor:
        s = self.subjects[i]
        return s.prior_images if prior else s.images

    def _draw_plan(self, rng: random.Random, pool: list) -> "_Plan":
        """Which subjects a sample shows and how (everything but the image indices)."""
        cfg = self.config
        mix = rng.random() < cfg.probability and len(pool) >= 2
        if not mix:
            return _Plan((pool[rng.randrange(len(pool))],))
        a, b = rng.sample(pool, 2)  # without replacement; a takes the left/top region
        if cfg.layout == "random":
            orientation = "left-right" if rng.random() < 0.5 else "up-down"
            ratio = rng.uniform(*RANDOM_SPLIT_RANGE)
        else:
            orientation, ratio = cfg.layout, 0.5
        and_prompt = rng.random() < cfg.and_prompt_probability
        and_order = (0, 1) if rng.random() < 0.5 else (1, 0)
        return _Plan((a, b), orientation, ratio, and_prompt, and_order)

    def _plan(self, step: int, prior: bool) -> tuple:
        """(plan, generator for the image indices) of a step's instance or prior sample.

        The prior sample of a step is built "in a similar manner" as its instance sample
        (Sec. 3.3): it repeats the instance sample's plan (mixed when that is mixed, with the
        same two subjects in the same regions, layout, split and prompt form), from the
        subjects' prior images, so the prior term sees the class words in the same
        arrangement as the instance term sees the tokens.  Only when a subject of that plan
        has no prior images is the prior sample drawn on its own from those that have some.
        """
        if not prior:
            rng = self._rng(step, False)
            return self._draw_plan(rng, self._pool(False)), rng
        pool = self._pool(True)
        plan = self._draw_plan(self._rng(step, False), self._pool(False))
        rng = self._rng(step, True)
        if all(i in pool for i in plan.subjects):
            return plan, rng
        return self._draw_plan(rng, pool), rng

    def sample(self, step: int, prior: bool = False) -> CutMixSample:
        """The training sample of ``step`` (a prior-preservation sample when ``prior``)."""
        plan, rng = self._plan(step, prior)
        if len(plan.subjects) == 1:
            return self._single(plan.subjects[0], rng, prior)
        return self._mixed(plan, rng, prior)

    def _single(self, i: int, rng: random.Random, prior: bool) -> CutMixSample:
        R = self.resolution
        imgs = (self._square_prior if prior else self._square)[i]
        j = rng.randrange(imgs.shape[0])
        s = self.subjects[i]
        return CutMixSample(
            image=imgs[j].clone(),
            prompt=single_prompt(s, prior),
            masks=torch.ones(1, R, R),
            words=[s.class_word if prior else s.token],
            class_words=[s.class_word],
            tokens=[s.token],
            subjects=[i],
            layout="single",
            split=1.0,
            prior=prior,
        )

    def _mixed(self, plan: "_Plan", rng: random.Random, prior: bool) -> CutMixSample:
        R = self.resolution
        a, b = plan.subjects
        orientation = plan.orientation
        cut = min(R - 1, max(1, int(round(R * plan.ratio))))
        ia = rng.randrange(self._images(a, prior).shape[0])
        ib = rng.randrange(self._images(b, prior).shape[0])

        image = torch.empty(R, R, 3)
        masks = torch.zeros(2, R, R)
        if orientation == "left-right":
            image[:, :cut] = resize_cover(self._images(a, prior)[ia:ia + 1], R, cut)[0]
            image[:, cut:] = resize_cover(self._images(b, prior)[ib:ib + 1], R, R - cut)[0]
            masks[0, :, :cut] = 1.0
            masks[1, :, cut:] = 1.0
        else:
            image[:cut] = resize_cover(self._images(a, prior)[ia:ia + 1], cut, R)[0]
            image[cut:] = resize_cover(self._images(b, prior)[ib:ib + 1], R - cut, R)[0]
            masks[0, :cut] = 1.0
            masks[1, cut:] = 1.0
        sa, sb = self.subjects[a], self.subjects[b]
        return CutMixSample(
            image=image,
            prompt=mixed_prompt(sa, sb, orientation, plan.and_prompt, prior, plan.and_order),
            masks=masks,
            words=[sa.class_word, sb.class_word] if prior else [sa.token, sb.token],
            class_words=[sa.class_word, sb.class_word],
            tokens=[sa.token, sb.token],
            subjects=[a, b],
            layout=orientation,
            split=cut / R,
            prior=prior,
        )

    def preview(self, count: int = 4, prior: bool = False) -> list:
        """The first ``count`` samples (steps 0..count-1): what training starts with."""
        return [self.sample(i, prior) for i in range(int(count))]

    def __repr__(self) -> str:
        names = ", ".join(s.instance_words for s in self.subjects)
        c = self.config
        return (f"CutMixTrainingSet([{names}], probability={c.probability}, layout={c.layout}, "
                f"and_prompt_probability={c.and_prompt_probability}, seed={c.seed}, resolution={self.resolution})")


def preview_grid(samples: Sequence[CutMixSample], columns: int = 4, gap: int = 2) -> torch.Tensor:
    """Samples laid out in a grid with white gaps: [1, H', W', 3] (a ComfyUI IMAGE)."""
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to show")
    R = samples[0].image.shape[0]
    cols = max(1, min(int(columns), len(samples)))
    rows = (len(samples) + cols - 1) // cols
    grid = torch.ones(rows * R + (rows - 1) * gap, cols * R + (cols - 1) * gap, 3)
    for n, s in enumerate(samples):
        r, c = divmod(n, cols)
        y, x = r * (R + gap), c * (R + gap)
        grid[y:y + R, x:x + R] = s.image
    return grid.unsqueeze(0)


def stack_masks(samples: Sequence[CutMixSample], size: Optional[tuple] = None) -> torch.Tensor:
    """The region masks of a batch of samples as one [B, S_max, H, W] tensor.

    Samples with fewer regions are padded with all-zero masks (unused slots), the layout
    ``svdiff.attention.unmix_loss`` expects; ``size`` (h, w) optionally area-resizes them
    (e.g. to the latent size).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("no samples")
    s_max = max(s.masks.shape[0] for s in samples)
    h, w = samples[0].masks.shape[-2:]
    out = torch.zeros(len(samples), s_max, h, w)
    for b, s in enumerate(samples):
        if s.masks.shape[-2:] != (h, w):
            raise ValueError("samples of one batch must share their resolution")
        out[b, : s.masks.shape[0]] = s.masks
    if size is not None and tuple(size) != (h, w):
        out = F.interpolate(out, size=tuple(size), mode="area")
    return out
