"""Negative-Prompt Guider (appendix C.3, Eq. 9) as a ComfyUI GUIDER.

Glue only: the combination is ``svdiff.guidance``; this module evaluates the three
predictions through ComfyUI's own ``calc_cond_batch`` (one batched call, like
``Guider_PerpNeg``) and then goes through ComfyUI's ``cfg_function``, so the model's
``sampler_cfg_function`` and ``sampler_post_cfg_function`` hooks run exactly as they do for
``CFGGuider``; ``sampler_pre_cfg_function`` hooks are applied by hand (as ``Guider_PerpNeg``
does) to ``[cond, blended uncond]``, the pair they expect.
"""

from __future__ import annotations

import math

import comfy.samplers
import node_helpers
from comfy_api.latest import io

from ..svdiff.guidance import blended_unconditional
from .common import CATEGORY, SVDiffNodeError

NODE_NAME = "Negative-Prompt Guider (Eq. 9)"


class NegativePromptGuider(comfy.samplers.CFGGuider):
    """CFG whose unconditional branch is beta * eps(empty) + (1 - beta) * eps(c_neg) (Eq. 9).

    Call :meth:`set_cfg` before :meth:`set_conds`: at beta = 1 (or 0) the negative (or
    empty) conditioning is not even registered, so the guider is then ComfyUI's CFGGuider
    with the empty (or the negative) prompt, evaluation for evaluation.
    """

    beta = 0.5

    def set_cfg(self, cfg, beta=0.5):
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise SVDiffNodeError(NODE_NAME, f"beta: must be in [0, 1], got {beta}")
        self.cfg = cfg
        self.beta = beta

    def set_conds(self, positive, negative, empty):
        conds = {"positive": positive}
        if self.beta < 1.0:
            conds["negative"] = negative
        if self.beta > 0.0:
            # the empty prompt plays the unconditional role: tag it as ComfyUI tags negatives
            conds["empty"] = node_helpers.conditioning_set_values(empty, {"prompt_type": "negative"})
        self.inner_set_conds(conds)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive = self.conds.get("positive", None)
        negative = self.conds.get("negative", None) if self.beta < 1.0 else None
        empty = self.conds.get("empty", None) if self.beta > 0.0 else None
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            negative = empty = None  # the unconditional branch has weight 0, as in CFGGuider

        out = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative, empty], x, timestep, model_options)
        cond_pred, neg_pred, empty_pred = out
        if negative is None and empty is None:
            uncond_pred = neg_pred  # unused (weight 0); what CFGGuider gets for a skipped uncond
            uncond = None
        else:
            uncond = negative if self.beta < 1.0 else empty
            uncond_pred = blended_unconditional(
                empty_pred if empty is not None else None,
                neg_pred if negative is not None else None,
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
                "suppress Cut-Mix stitching seams. Connect to SamplerCustomAdvanced."
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
                                       "0 = ordinary CFG with the negative prompt."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, empty, cfg, beta) -> io.NodeOutput:
        for name, c in (("positive", positive), ("negative", negative), ("empty", empty)):
            if not c:
                raise SVDiffNodeError(NODE_NAME, f"{name}: the conditioning is empty; connect a CLIP Text Encode")
        guider = NegativePromptGuider(model)
        guider.set_cfg(cfg, beta)
        guider.set_conds(positive, negative, empty)
        return io.NodeOutput(guider)


NODES = [SVDiffNegativeGuider]
