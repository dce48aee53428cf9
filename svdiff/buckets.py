"""Aspect-ratio buckets for training images of any shape (plain Python).

Training at one square resolution crops away the sides of wide and tall images.  Buckets keep
their shape instead: a set of sizes (h, w) with sides that are multiples of 64 (8 latent
pixels) and an area close to resolution², from square to ``MAX_RATIO``:1; each image goes to
the bucket nearest its aspect ratio (log ratio), is resized to cover it and centre-cropped by
at most a sliver.  A training step draws all its images from one bucket, so they stack.
"""

from __future__ import annotations

import math

SIDE_STEP = 64
MAX_RATIO = 4.0


def bucket_sizes(resolution: int, step: int = SIDE_STEP, max_ratio: float = MAX_RATIO) -> list:
    """(h, w) sizes with sides multiple of ``step`` and h*w about resolution², square included."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = max(step, int(round(area / w / step)) * step)
        if max(h, w) / min(h, w) <= max_ratio + 1e-9:
            out.add((h, w))
        w += step
    out.add((resolution, resolution))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(h: int, w: int, sizes: list) -> tuple:
    """The bucket whose aspect ratio is nearest the image's (on a log scale; ties: the larger area)."""
    r = math.log(w / h)
    return min(sizes, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - r), -hw[0] * hw[1]))


def aspect_ratio(h: int, w: int) -> float:
    return max(h, w) / max(1, min(h, w))
