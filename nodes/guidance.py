"""Negative-Prompt Guider (appendix C.3, Eq. 9) as a ComfyUI GUIDER.

Glue only: the combination is ``svdiff.guidance``; this module evaluates the predictions
(positive, one to four weighted negatives, empty) through ComfyUI's own ``calc_cond_batch``
(one batched call, like ``Guider_PerpNeg``) and then goes through ComfyUI's ``cfg_function``, so the model's
``sampler_cfg_function`` and ``sampler_post_cfg_function`` hooks run exactly as they do for
``CFGGuider``; ``sampler_pre_cfg_function`` hooks are applied by hand (as ``Guider_PerpNeg``
does) to ``[cond, blended uncond]``, the pair they expect.
"""

from __future__ import annotations

import math

import comfy.samplers
import node_helpers
from comfy_api.latest import io

from ..svdiff.guidance import blended_unconditional, check_negative_weights, weighted_negative
from .common import CATEGORY, SVDiffNodeError

NODE_NAME = "Negative-Prompt Guider (Eq. 9)"


class NegativePromptGuider(comfy.samplers.CFGGuider):
    """CFG whose unconditional branch is beta * eps(empty) + (1 - beta) * eps(c_neg) (Eq. 9),
    with eps(c_neg) = sum_i w_i eps(c_neg_i) / sum_i w_i for several negatives (appendix C.3).

    Call :meth:`set_cfg` before :meth:`set_conds`: at beta = 1 (or 0) the negatives (or
    the empty) conditioning are not even registered, and a negative of weight 0 never is,
    so with one negative left the guider is today's Eq. 9 guider, and at beta = 1 (or 0
    with one negative) ComfyUI's CFGGuider with the empty (or the negative) prompt,
    evaluation for evaluation.
    """

    beta = 0.5
    neg_keys = ("negative",)  # the registered negatives' keys in self.conds, in order
    neg_weights = (1.0,)

    def set_cfg(self, cfg, beta=0.5):
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise SVDiffNodeError(NODE_NAME, f"beta: must be in [0, 1], got {beta}")
        self.cfg = cfg
        self.beta = beta

    def set_conds(self, positive, negative, empty, more_negatives=(), weights=None):
        """``negative`` and ``more_negatives`` are the c_neg_i, ``weights`` their w_i (all 1 if None)."""
        negatives = [negative, *more_negatives]
        weights = check_negative_weights([1.0] * len(negatives) if weights is None else weights)
        if len(weights) != len(negatives):
            raise ValueError(f"{len(negatives)} negatives but {len(weights)} weights")
        used = [(c, w) for c, w in zip(negatives, weights) if w > 0.0]
        self.neg_keys = tuple("negative" if i == 0 else f"negative_{i + 1}" for i in range(len(used)))
        self.neg_weights = tuple(w for _, w in used)
        conds = {"positive": positive}
        if self.beta < 1.0:
            for key, (c, _) in zip(self.neg_keys, used):
                # ComfyUI tags a cond by its key; tag the further negatives as negatives too
                conds[key] = c if key == "negative" else node_helpers.conditioning_set_values(c, {"prompt_type": "negative"})
        if self.beta > 0.0:
            # the empty prompt plays the unconditional role: tag it as ComfyUI tags negatives
            conds["empty"] = node_helpers.conditioning_set_values(empty, {"prompt_type": "negative"})
        self.inner_set_conds(conds)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive = self.conds.get("positive", None)
        negatives = [self.conds.get(k, None) if self.beta < 1.0 else None for k in self.neg_keys]
        empty = self.conds.get("empty", None) if self.beta > 0.0 else None
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            negatives, empty = [None] * len(negatives), None  # the unconditional branch has weight 0, as in CFGGuider

        out = comfy.samplers.calc_cond_batch(self.inner_model, [positive, *negatives, empty], x, timestep, model_options)
        cond_pred, neg_preds, empty_pred = out[0], out[1:-1], out[-1]
        if negatives[0] is None and empty is None:
            uncond_pred = neg_preds[0]  # unused (weight 0); what CFGGuider gets for a skipped uncond
            uncond = None
        else:
            uncond = negatives[0] if self.beta < 1.0 else empty
            uncond_pred = blended_unconditional(
                empty_pred if empty is not None else None,
                weighted_negative(neg_preds, self.neg_weights) if negatives[0] is not None else None,
                self.beta,
            )

        conds = [positive, uncond]
        outs = [cond_pred, uncond_pred]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": outs, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            outs = fn(args)
        return comfy.samplers.cfg_function(self.inner_model, outs[0], outs[1], self.cfg, x, timestep,
                                           model_options=model_options, cond=positive, uncond=uncond)


class SVDiffNegativeGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffNegativeGuider",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Classifier-free guidance whose unconditional branch blends the empty prompt and a "
                "negative prompt (SVDiff appendix C.3, Eq. 9): beta*eps(empty) + (1-beta)*eps(negative). "
                "Use the prior prompt (e.g. 'photo of a dog and a sculpture') as the negative to "
                "suppress Cut-Mix stitching seams. Up to three more negatives (negative_2..4) with "
                "weights: eps(negative) becomes sum_i w_i*eps(negative_i) / sum_i w_i. "
                "Connect to SamplerCustomAdvanced."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (e.g. with a spectral shift applied)."),
                io.Conditioning.Input("positive", tooltip="The prompt to generate."),
                io.Conditioning.Input(
                    "negative",
                    tooltip="The negative prompt c_neg; SVDiff uses the prior-preservation (class) prompt.",
                ),
                io.Conditioning.Input("empty", tooltip="The empty prompt (encode an empty text)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale s (Eq. 8)."),
                io.Float.Input("beta", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend beta of Eq. 9: 1 = ordinary CFG with the empty prompt, "
                                       "0 = ordinary CFG with the negative prompt(s)."),
                weight_input(1),
                *[i for k in (2, 3, 4) for i in (
                    io.Conditioning.Input(f"negative_{k}", optional=True,
                                          tooltip=f"A further negative prompt c_neg_{k} (appendix C.3: several negative "
                                                  f"prompts), mixed with the others by weight_{k}."),
                    weight_input(k))],
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, empty, cfg, beta, weight_1=1.0, negative_2=None, weight_2=1.0,
                negative_3=None, weight_3=1.0, negative_4=None, weight_4=1.0) -> io.NodeOutput:
        negatives = {"negative": negative, "negative_2": negative_2, "negative_3": negative_3, "negative_4": negative_4}
        weights = {"negative": weight_1, "negative_2": weight_2, "negative_3": weight_3, "negative_4": weight_4}
        connected = [k for k, c in negatives.items() if k == "negative" or c is not None]
        for name, c in [("positive", positive), ("empty", empty)] + [(k, negatives[k]) for k in connected]:
            if not c:
                raise SVDiffNodeError(NODE_NAME, f"{name}: the conditioning is empty; connect a CLIP Text Encode")
        w = check_weights([(f"weight_{i + 1}", weights[k]) for i, k in enumerate(negatives) if k in connected])
        guider = NegativePromptGuider(model)
        guider.set_cfg(cfg, beta)
        guider.set_conds(positive, negative, empty, [negatives[k] for k in connected[1:]], w)
        return io.NodeOutput(guider)


def weight_input(k: int):
    return io.Float.Input(
        f"weight_{k}", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
        tooltip=f"Weight w_{k} of {'negative' if k == 1 else f'negative_{k}'} (used only when it is connected). The "
                "unconditional branch is beta*eps(empty) + (1-beta)*sum_i w_i*eps(negative_i) / sum_i w_i: the "
                "weights are normalised by the sum of the connected negatives' weights; 0 leaves a negative out.",
    )


def check_weights(named: list) -> list:
    """The weights of the connected negatives, as (field, value) pairs: each >= 0, not all 0."""
    for field, w in named:
        w = float(w)
        if not math.isfinite(w) or w < 0.0:
            raise SVDiffNodeError(NODE_NAME, f"{field}: must be a finite number >= 0, got {w}")
    if not any(float(w) > 0.0 for _, w in named):
        fields = ", ".join(f for f, _ in named)
        raise SVDiffNodeError(NODE_NAME, f"{fields}: the weights of the connected negatives are all zero; give at least one a positive weight")
    return [float(w) for _, w in named]


NODES = [SVDiffNegativeGuider]
