"""Trainable spectral shifts inside a layer's forward pass (Sec. 3.2, Eq. 2).

A shifted layer computes with W_delta = U diag(ReLU(sigma + delta)) V^T.  In residual form
(see :mod:`svdiff.shift`) that is W + U diag(Delta) V^T with Delta = ReLU(sigma + delta) - sigma,
and there are two ways to put it into a forward pass:

* **recompose**: build W + U diag(Delta) V^T once per step (m*n*k multiply-adds), then run the
  ordinary layer.  Autograd then also forms dW (m*n per token) to reach d delta.
* **side path**: keep the frozen W and add U (Delta * (V^T x)) in activation space,
  (m+n)*k per token forward and again backward; d delta = sum_t (U^T g_t) * (V^T x_t),
  masked by the ReLU.  For a convolution V^T is a convolution with the reshaped kernel
  (k, c_in, kh, kw) and U is a 1x1 convolution.

:func:`choose_route` picks the cheaper one per layer from its shapes and the number of
tokens (positions) it sees per step (:func:`route_costs`).

The frozen part of every layer on the gradient path runs through :class:`FrozenLinear` /
:func:`frozen_conv2d`, custom autograd functions that compute dx from the frozen weight
without saving it: no copy of the base weights is made, and weights created under
``torch.inference_mode`` (as ComfyUI loads them) can still sit on the gradient path.

A rank-r shift (appendix E.1) uses only the first r singular directions.
1-D weights (norm scales) get an additive delta: w + delta.
This module is plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

ROUTES = ("recompose", "side")


def spectral_change(S: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Delta = ReLU(sigma + delta) - sigma (Eq. 2 in residual form), in delta's dtype."""
    return torch.relu(S + delta) - S


# ----------------------------------------------------------------------------------------
# Frozen layers: gradient w.r.t. the input only, the weight held by reference.
# ----------------------------------------------------------------------------------------
class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W, b frozen; backward gives dx = g W only (W is not saved)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # a reference, not save_for_backward: no copy, inference tensors allowed
        out = F.linear(x, weight, bias)
        # without a bias, F.linear of a 3-D input can return a view, which autograd forbids the
        # caller to update in place (T5 does): return a tensor of its own then
        return out.clone() if out._base is not None else out

    @staticmethod
    def backward(ctx, g):
        w = ctx.weight
        return g.matmul(w.to(g.dtype)), None, None


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int = 1


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, geo: ConvGeometry):
        ctx.weight = weight
        ctx.geo = geo
        ctx.x_shape = x.shape
        return F.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)

    @staticmethod
    def backward(ctx, g):
        geo = ctx.geo
        dx = torch.nn.grad.conv2d_input(ctx.x_shape, ctx.weight.to(g.dtype), g, geo.stride, geo.padding, geo.dilation, geo.groups)
        return dx, None, None, None


def frozen_conv2d(x, weight, bias, geo: ConvGeometry):
    """conv2d with frozen weight and bias; backward gives dx only (the weight is not saved)."""
    return _FrozenConv2d.apply(x, weight, bias, geo)


# ----------------------------------------------------------------------------------------
# Side path: U (Delta * (V^T x)) with a custom backward for d delta.
# ----------------------------------------------------------------------------------------
class _SideLinear(torch.autograd.Function):
    """U (Delta * (V^T x)) for x (..., n); U (m, r), Vh (r, n) are constants held by reference.

    backward: gu = g U; d delta = sum_t gu * (V^T x) masked by sigma + delta > 0;
    dx = (gu * Delta) V^T.
    """

    @staticmethod
    def forward(ctx, x, delta, S, U, Vh):
        dt = x.dtype
        Uc, Vc = U.to(dt), Vh.to(dt)
        d32 = delta.float()
        S32 = S.float()
        change = spectral_change(S32, d32)
        p = x.matmul(Vc.t())  # (..., r)
        y = (p * change.to(dt)).matmul(Uc.t())
        ctx.save_for_backward(p)
        ctx.U, ctx.Vh = U, Vh
        ctx.change = change
        ctx.mask = (S32 + d32) > 0
        return y

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        dt = g.dtype
        gu = g.matmul(ctx.U.to(dt))  # (..., r)
        r = gu.shape[-1]
        dchange = (gu.reshape(-1, r).float() * p.reshape(-1, r).float()).sum(0)
        ddelta = dchange * ctx.mask
        dx = (gu * ctx.change.to(dt)).matmul(ctx.Vh.to(dt)) if ctx.needs_input_grad[0] else None
        return dx, ddelta, None, None, None


class _SideConv2d(torch.autograd.Function):
    """The side path of a convolution: V^T as a conv with the (r, c_in, kh, kw) kernel, then U as 1x1."""

    @staticmethod
    def forward(ctx, x, delta, S, U, Vh, geo: ConvGeometry, kernel_shape: tuple):
        dt = x.dtype
        r = Vh.shape[0]
        Vk = Vh.to(dt).reshape(r, *kernel_shape[1:])
        change = spectral_change(S.float(), delta.float())
        p = F.conv2d(x, Vk, None, geo.stride, geo.padding, geo.dilation, 1)  # (B, r, H', W')
        y = F.conv2d(p * change.to(dt)[:, None, None], U.to(dt)[:, :, None, None])
        ctx.save_for_backward(p)
        ctx.U, ctx.Vh, ctx.geo, ctx.kernel_shape, ctx.x_shape = U, Vh, geo, kernel_shape, x.shape
        ctx.change = change
        ctx.mask = (S.float() + delta.float()) > 0
        return y

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        dt = g.dtype
        U = ctx.U.to(dt)
        gu = F.conv2d(g, U.t()[:, :, None, None])  # (B, r, H', W')
        ddelta = (gu.float() * p.float()).sum((0, 2, 3)) * ctx.mask
        dx = None
        if ctx.needs_input_grad[0]:
            r = ctx.Vh.shape[0]
            Vk = ctx.Vh.to(dt).reshape(r, *ctx.kernel_shape[1:])
            geo = ctx.geo
            dx = torch.nn.grad.conv2d_input(ctx.x_shape, Vk, gu * ctx.change.to(dt)[:, None, None], geo.stride, geo.padding, geo.dilation, 1)
        return dx, ddelta, None, None, None, None, None


class _Recompose(torch.autograd.Function):
    """R = U diag(Delta) V^T (m x n) from constants U, Vh; backward d delta = rowsum(U * (dR V)) masked.

    A custom function so that no float32 copies of U and V are kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, delta, S, U, Vh, dtype):
        change = spectral_change(S.float(), delta.float())
        ctx.U, ctx.Vh, ctx.dtype = U, Vh, dtype
        ctx.mask = (S.float() + delta.float()) > 0
        return (U.to(dtype) * change.to(dtype)).matmul(Vh.to(dtype))

    @staticmethod
    def backward(ctx, gR):
        dt = gR.dtype
        t = gR.matmul(ctx.Vh.to(dt).t())  # (m, r)
        dchange = (t.float() * ctx.U.float()).sum(0)
        return dchange * ctx.mask, None, None, None, None


def recomposed_weight(weight: torch.Tensor, S, U, Vh, delta) -> torch.Tensor:
    """W + U diag(ReLU(sigma + delta) - sigma) V^T, shaped like W, differentiable in delta."""
    R = _Recompose.apply(delta, S, U, Vh, weight.dtype)
    return weight + R.reshape(weight.shape)


# ----------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------
def route_costs(m: int, n: int, r: int, tokens: int) -> dict:
    """Multiply-adds per training step (forward + backward) that each route adds to the frozen layer.

    recompose: forming U diag(Delta) V^T (m n r), d delta from dR (m n r) and the weight
    gradient dW = g^T x that autograd must form to get dR (m n tokens).
    side: V^T x and U(.) forward, U^T g and V(.) backward: 2 (m + n) r tokens.
    """
    return {"recompose": 2 * m * n * r + m * n * tokens, "side": 2 * (m + n) * r * tokens}


def choose_route(m: int, n: int, r: int, tokens: int, force: Optional[str] = None) -> str:
    """The cheaper route for a layer (or ``force`` when it names one)."""
    if force in ROUTES:
        return force
    c = route_costs(m, n, r, tokens)
    return "side" if c["side"] < c["recompose"] else "recompose"


# ----------------------------------------------------------------------------------------
# A trainable shifted layer
# ----------------------------------------------------------------------------------------
@dataclass
class ShiftedLayer:
    """The trainable state of one matrix weight: delta (Parameter) and its U, sigma, V^T.

    kind: "linear" or "conv2d"; shape: the weight's shape; U (m, r), S (r,), Vh (r, n) are
    the first r singular directions (r = len(delta)).  ``route`` is None until the first
    forward pass fixes it from the token count (or ``force_route``).
    """

    delta: torch.nn.Parameter
    S: torch.Tensor
    U: torch.Tensor
    Vh: torch.Tensor
    shape: tuple
    kind: str = "linear"
    geo: Optional[ConvGeometry] = None
    force_route: Optional[str] = None
    route: Optional[str] = None
    tokens: int = 0
    costs: dict = field(default_factory=dict)

    def to(self, device) -> "ShiftedLayer":
        self.S = self.S.to(device)
        self.U = self.U.to(device)
        self.Vh = self.Vh.to(device)
        return self

    def _decide(self, x: torch.Tensor) -> str:
        """The layer's route, fixed by its first forward pass under autograd (the costs are those
        of a training step).  A forward without gradients (a validation sample before the first
        step) gets the route for its own token count without fixing it."""
        if self.route is None and not torch.is_grad_enabled():
            route = choose_route(int(self.shape[0]), int(self.Vh.shape[1]), int(self.delta.shape[0]), self._tokens(x),
                                 self.force_route)
            return "recompose" if self.kind == "conv2d" and self.geo.groups != 1 else route
        if self.route is None:
            m = int(self.shape[0])
            n = int(self.Vh.shape[1])
            r = int(self.delta.shape[0])
            tokens = self._tokens(x)
            self.tokens = tokens
            self.costs = route_costs(m, n, r, tokens)
            self.route = choose_route(m, n, r, tokens, self.force_route)
            if self.kind == "conv2d" and self.geo.groups != 1:
                self.route = "recompose"  # the side path assumes an ungrouped convolution
        return self.route

    def _tokens(self, x: torch.Tensor) -> int:
        """Positions the layer's weight is applied at for input ``x`` (rows of the matmul)."""
        if self.kind == "linear":
            return x.numel() // max(1, int(x.shape[-1]))
        geo = self.geo
        tokens = int(x.shape[0])
        for i, size in enumerate(x.shape[2:]):
            k = int(self.shape[2 + i])
            tokens *= (int(size) + 2 * geo.padding[i] - geo.dilation[i] * (k - 1) - 1) // geo.stride[i] + 1
        return tokens

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The shifted layer on input x, with the frozen (already cast) weight and bias."""
        route = self._decide(x)
        if route == "recompose":
            w = recomposed_weight(weight, self.S, self.U, self.Vh, self.delta)
            if self.kind == "linear":
                return F.linear(x, w, bias)
            g = self.geo
            return F.conv2d(x, w, bias, g.stride, g.padding, g.dilation, g.groups)
        if self.kind == "linear":
            return FrozenLinear.apply(x, weight, bias) + _SideLinear.apply(x, self.delta, self.S, self.U, self.Vh)
        return frozen_conv2d(x, weight, bias, self.geo) + _SideConv2d.apply(
            x, self.delta, self.S, self.U, self.Vh, self.geo, tuple(self.shape)
        )


def frozen_forward(kind: str, x, weight, bias, geo: Optional[ConvGeometry] = None):
    """A frozen linear or conv2d layer on the gradient path (no weight gradient, no weight copy)."""
    if kind == "linear":
        return FrozenLinear.apply(x, weight, bias)
    return frozen_conv2d(x, weight, bias, geo)


def shifted_vector(weight: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
    """w + delta for a 1-D weight (norm scale); a plain copy when delta is None."""
    if delta is None:
        return weight.clone()
    return weight + delta.to(weight.dtype)
