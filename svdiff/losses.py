"""The fine-tuning loss of Sec. 3.2, Eq. 3 (with Eq. 1 as its denoising term).

    L(delta) = E[ || eps_hat(z*_t | c*) - eps ||^2 ] + lambda * E[ || eps_hat(z^pr_t | c^pr) - eps ||^2 ]

The model is evaluated in k-diffusion form: x_sigma = x0 + sigma*eps (eps- and v-models) or
(1 - sigma) x0 + sigma*eps (rectified flow), and returns its denoised estimate x0_hat.
The error on the target the model was trained with follows from x0_hat alone:

* eps-prediction: eps_hat - eps = (x0 - x0_hat) / sigma;
* v-prediction (sigma_data s_d): v_hat - v = (x0 - x0_hat) * sqrt(sigma^2 + s_d^2) / (sigma s_d);
* flow (velocity eps - x0): v_hat - v = (x0 - x0_hat) / sigma.

Plain PyTorch.
"""

from __future__ import annotations

import torch

TARGETS = ("eps", "v", "flow")


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1)) if sigma.ndim else sigma


def target_error(x0_pred: torch.Tensor, x0: torch.Tensor, sigma, target: str = "eps", sigma_data: float = 1.0) -> torch.Tensor:
    """Per-element error of the model's prediction on its training target (see module doc)."""
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; one of {TARGETS}")
    s = _bcast(sigma, x0_pred)
    diff = x0 - x0_pred
    if target in ("eps", "flow"):
        return diff / s
    return diff * torch.sqrt(s * s + sigma_data**2) / (s * sigma_data)


def denoising_loss(x0_pred, x0, sigma, target: str = "eps", sigma_data: float = 1.0) -> torch.Tensor:
    """Eq. 1: the mean squared error on the prediction target."""
    return target_error(x0_pred, x0, sigma, target, sigma_data).float().pow(2).mean()


def svdiff_loss(instance_loss: torch.Tensor, prior_loss=None, prior_weight: float = 1.0) -> torch.Tensor:
    """Eq. 3: L = L_instance + lambda * L_prior (lambda = 0 or no prior: the instance term only)."""
    if prior_loss is None or prior_weight == 0:
        return instance_loss
    return instance_loss + prior_weight * prior_loss
