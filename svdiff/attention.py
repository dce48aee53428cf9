"""Cross-attention regularisers: the "unmix" loss (Sec. 3.3) and Eq. 10 (appendix D.1).

Both read cross-attention probability maps captured during the UNet forward pass:
``maps`` is a dict ``block -> Tensor[B, H*W, T]``, softmax(q k^T / sqrt(d)) averaged over
heads, for a block whose latent is H x W, with T text tokens (77 for SD1).  Any block key
works (the ComfyUI glue uses ``("input", 1, 0)``-style tuples).  The spatial shape of a map
is inferred from the masks' aspect ratio (or given in ``shapes``).

Token positions say which of the T tokens name a subject; :func:`token_positions` finds a
word's tokens in a tokenised prompt.

Plain PyTorch; imports nothing from ComfyUI.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------
# Token positions
# --------------------------------------------------------------------------------------
def token_positions(tokenizer_output_ids: Sequence[int], word_ids: Sequence[int],
                    is_word_end: Optional[Callable[[int], bool]] = None) -> list:
    """Positions of every occurrence of ``word_ids`` inside ``tokenizer_output_ids``.

    A word may span several tokens (e.g. a rare special token); every token of every
    occurrence is returned, in order.  ``is_word_end(id)`` (optional) tells whether a token
    ends a word (CLIP's "</w>" tokens); then a match must start at a word boundary, so the
    tail of a longer word is not mistaken for the word.
    """
    ids = [int(t) for t in tokenizer_output_ids]
    w = [int(t) for t in word_ids]
    if not w:
        return []
    out = []
    n = len(w)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] != w:
            continue
        if is_word_end is not None and i > 0 and not is_word_end(ids[i - 1]):
            continue
        out.extend(range(i, i + n))
    return out


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def map_shape(n: int, height: int, width: int) -> tuple:
    """(h, w) with h*w == n and h/w closest to height/width: the shape of an n-pixel map."""
    target = height / width
    best = None
    for h in range(1, n + 1):
        if n % h:
            continue
        err = abs(math.log((h / (n // h)) / target))
        if best is None or err < best[0]:
            best = (err, h, n // h)
    if best is None or best[0] > math.log(1.2):
        raise ValueError(f"an attention map with {n} pixels does not fit the masks' {height}x{width} aspect ratio")
    return best[1], best[2]


def downsample_masks(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B,S,H,W] region masks averaged onto an h x w grid (area interpolation).

    Each cell gets the fraction of its area covered by each region, so masks that cover the
    image exactly once still do after downsampling.
    """
    if masks.shape[-2:] == (h, w):
        return masks.float()
    return F.interpolate(masks.float(), size=(h, w), mode="area")


def _per_sample(ids, batch: int) -> list:
    """Normalise per-subject token positions to one entry per batch sample.

    Shared by the batch: ``[[positions of subject 0], [subject 1], ...]``; per sample: a
    list of B such entries (recognised by its third level of nesting).
    """
    ids = list(ids)
    nested = [x for x in ids if isinstance(x, (list, tuple)) and len(x) > 0]
    if nested and all(isinstance(x[0], (list, tuple)) for x in nested):
        if len(ids) != batch:
            raise ValueError(f"got token positions for {len(ids)} samples, the batch has {batch}")
        return [[list(p) for p in x] for x in ids]
    return [[list(p) for p in ids]] * batch


def _spatial(m: torch.Tensor, masks_hw: tuple, shape: Optional[tuple]) -> tuple:
    n = m.shape[1]
    if shape is not None:
        h, w = shape
        if h * w != n:
            raise ValueError(f"map shape {shape} does not match its {n} pixels")
        return h, w
    return map_shape(n, *masks_hw)


# --------------------------------------------------------------------------------------
# Unmix loss (Sec. 3.3)
# --------------------------------------------------------------------------------------
def unmix_loss(maps: Mapping, token_ids_per_subject, masks: torch.Tensor,
               shapes: Optional[Mapping] = None) -> torch.Tensor:
    """Cut-Mix-Unmix attention regularisation (Sec. 3.3): MSE on non-corresponding regions.

    For every block, every sample b and every subject s shown in it, each token t naming
    s contributes mean_pixels((A_t ⊙ O_s)^2), where A_t is token t's attention map and
    O_s = sum of the *other* subjects' masks (downsampled to the block's resolution).  The
    loss is the mean over tokens and subjects, then over samples, then over blocks: 0 when
    every token attends only inside its own region, positive as soon as it attends to
    another subject's region.

    maps: block -> Tensor[B, H*W, T] (head-averaged cross-attention probabilities).
    token_ids_per_subject: ``[[positions of subject 0's tokens], [subject 1's], ...]``
        shared by the batch, or a list with one such entry per sample.  A subject with no
        positions (e.g. a padded slot) is skipped.
    masks: Tensor[B, S, H, W] region masks in the same subject order (zeros for a slot a
        sample does not use).  Samples with a single region contribute 0.
    shapes: optional block -> (h, w) of each map (otherwise inferred from the masks).
    """
    if masks.ndim != 4:
        raise ValueError(f"masks must be [B, S, H, W], got {tuple(masks.shape)}")
    if not maps:
        raise ValueError("no attention maps were captured (is the attention capture installed and enabled?)")
    B, S = masks.shape[:2]
    ids = _per_sample(token_ids_per_subject, B)
    total = None
    for key, m in maps.items():
        if m.shape[0] != B:
            raise ValueError(f"attention map {key} has batch {m.shape[0]}, masks have {B}")
        h, w = _spatial(m, tuple(masks.shape[-2:]), shapes.get(key) if shapes else None)
        small = downsample_masks(masks, h, w).to(m.device, m.dtype).flatten(2)  # [B,S,h*w]
        union = small.sum(1)  # [B,h*w]
        per_sample = []
        for b in range(B):
            terms = []
            for s in range(min(S, len(ids[b]))):
                pos = list(ids[b][s])
                if not pos:
                    continue
                other = (union[b] - small[b, s]).clamp_min(0)  # other subjects' regions
                a = m[b, :, pos]  # [h*w, n_tokens]
                terms.append(((a * other[:, None]) ** 2).mean())
            per_sample.append(torch.stack(terms).mean() if terms else m.new_zeros(()))
        layer = torch.stack(per_sample).mean()
        total = layer if total is None else total + layer
    return total / len(maps)


# --------------------------------------------------------------------------------------
# Eq. 10 (appendix D.1)
# --------------------------------------------------------------------------------------
def class_mask(class_attention: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """M of Eq. 10: the class token's attention normalised to its maximum, > threshold.

    class_attention: [B, P] (one map per sample); returns a float 0/1 mask, no gradient.
    """
    a = class_attention.detach()
    peak = a.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return (a / peak > threshold).to(a.dtype)


def attention_reg_loss(maps: Mapping, special_ids, class_ids, threshold: float = 0.5) -> torch.Tensor:
    """Cross-attention regularisation of appendix D.1, Eq. 10: ||A_V - sg(A_V ⊙ M)||².

    For each block and sample, M thresholds the class word's attention (averaged over its
    tokens, normalised to its maximum) at ``threshold``; A_V is the attention map of each
    special-token position.  The squared norm is averaged over pixels (so the weight does
    not depend on the map size), then over special tokens, samples and blocks.  sg is a
    stop-gradient: only the attention outside M is pushed down.

    special_ids / class_ids: positions shared by the batch (``[5]``, ``[6, 7]``) or one
    list per sample (``[[5], [5]]``).  Samples with no special or class position are skipped.
    """
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if not maps:
        raise ValueError("no attention maps were captured (is the attention capture installed and enabled?)")
    total = None
    for key, m in maps.items():
        B = m.shape[0]
        sp = _ids_per_sample(special_ids, B)
        cl = _ids_per_sample(class_ids, B)
        per_sample = []
        for b in range(B):
            if not sp[b] or not cl[b]:
                continue
            M = class_mask(m[b, :, cl[b]].mean(-1, keepdim=True).T, threshold)[0]  # [P]
            A = m[b, :, sp[b]]  # [P, n_special]
            per_sample.append(((A - (A * M[:, None]).detach()) ** 2).mean())
        layer = torch.stack(per_sample).mean() if per_sample else m.new_zeros(())
        total = layer if total is None else total + layer
    return total / len(maps)


def _ids_per_sample(ids, batch: int) -> list:
    ids = list(ids)
    if ids and all(isinstance(x, (list, tuple)) for x in ids):
        if len(ids) != batch:
            raise ValueError(f"got token positions for {len(ids)} samples, the batch has {batch}")
        return [[int(t) for t in x] for x in ids]
    return [[int(t) for t in ids]] * batch
