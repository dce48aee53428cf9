"""Negative-prompt guidance (appendix C.3, Eq. 8 and Eq. 9).

Classifier-free guidance (Eq. 8) extrapolates from the unconditional prediction:
    eps_s = s * eps(z | c) + (1 - s) * eps(z | empty) = eps(z|empty) + s * (eps(z|c) - eps(z|empty)).
Eq. 9 replaces the unconditional prediction by a blend with a negative prompt c_neg
(SVDiff uses the prior-preservation prompt, which carries the Cut-Mix stitching style):
    eps~_beta = beta * eps(z | empty) + (1 - beta) * eps(z | c_neg).
Appendix C.3 notes that this "can be easily extended to including multiple negative
prompts": with weights w_i >= 0 (not all 0), normalised to sum 1,
    eps(z | c_neg) := sum_i w_i eps(z | c_neg_i) / sum_i w_i.

Both are affine combinations (weights summing to 1), so they hold unchanged for any
prediction that is affine in eps at fixed z_t and sigma, e.g. ComfyUI's denoised x0 =
z - sigma * eps.  Plain PyTorch; imports nothing from ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch


def check_negative_weights(weights: Sequence[float]) -> list:
    """The weights as floats; each must be finite and >= 0, and at least one > 0."""
    w = [float(x) for x in weights]
    for i, x in enumerate(w):
        if not math.isfinite(x) or x < 0.0:
            raise ValueError(f"negative-prompt weight {i + 1} must be finite and >= 0, got {x}")
    if not any(x > 0.0 for x in w):
        raise ValueError("the negative-prompt weights are all 0; at least one must be positive")
    return w


def weighted_negative(preds: Sequence[Optional[torch.Tensor]], weights: Sequence[float]) -> torch.Tensor:
    """Several negative prompts (appendix C.3): sum_i w_i pred(c_neg_i) / sum_i w_i.

    The weights are normalised by their sum, so the result is an affine combination and
    Eq. 8/9 keep their meaning.  A negative of weight 0 is left out (its prediction may be
    None, i.e. not evaluated); when only one has a positive weight its prediction is
    returned itself, bit for bit.
    """
    w = check_negative_weights(weights)
    if len(preds) != len(w):
        raise ValueError(f"{len(preds)} negative-prompt predictions but {len(w)} weights")
    used = [(p, x) for p, x in zip(preds, w) if x > 0.0]
    if any(p is None for p, _ in used):
        raise ValueError("a negative prompt with a positive weight needs its prediction")
    if len(used) == 1:
        return used[0][0]
    total = sum(x for _, x in used)
    out = used[0][0] * (used[0][1] / total)
    for p, x in used[1:]:
        out = out + p * (x / total)
    return out


def blended_unconditional(pred_empty: Optional[torch.Tensor], pred_negative: Optional[torch.Tensor],
                          beta: float) -> torch.Tensor:
    """Eq. 9: beta * pred(empty) + (1 - beta) * pred(c_neg).

    beta = 1 returns ``pred_empty`` itself and beta = 0 ``pred_negative`` itself (bit for
    bit; the other may then be None, so callers can skip evaluating it).
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 1.0:
        if pred_empty is None:
            raise ValueError("beta = 1 needs the empty-prompt prediction")
        return pred_empty
    if beta == 0.0:
        if pred_negative is None:
            raise ValueError("beta = 0 needs the negative-prompt prediction")
        return pred_negative
    if pred_empty is None or pred_negative is None:
        raise ValueError("0 < beta < 1 needs both the empty- and the negative-prompt predictions")
    return pred_negative + beta * (pred_empty - pred_negative)


def classifier_free_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 8: uncond + s * (cond - uncond) (the form ComfyUI's own CFG uses)."""
    return pred_uncond + (pred_cond - pred_uncond) * scale


def negative_prompt_guidance(pred_cond: torch.Tensor, pred_empty: Optional[torch.Tensor],
                             pred_negative: Optional[torch.Tensor], scale: float, beta: float) -> torch.Tensor:
    """Eq. 8 with the unconditional prediction replaced by Eq. 9's blend."""
    return classifier_free_guidance(pred_cond, blended_unconditional(pred_empty, pred_negative, beta), scale)
