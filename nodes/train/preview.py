"""Watching SVDiff Train: validation samples with the current shift, loss, s/step and ETA.

A preview samples ``validation_prompt`` (default: the instance prompt) at a fixed seed with
ComfyUI's own sampler on the training clone, whose injected layers carry the current delta:
what the shift gives right now, with no copy of the model.  The first preview is taken before
the first step (the base model, or the resumed shift: the reference), then one every
``preview_every`` steps.  Each shows on the node as ComfyUI's progress preview; together they
are the node's ``previews`` IMAGE output (samples over time).  Previews draw their noise from
their own seed and run without gradients, so they never change what is trained.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import comfy.model_management as mm
import comfy.sample

from .. import comfy_compat as compat
from .data import _clone_cond, encode_prompt
from .settings import PRIOR_CFG

PREVIEW_SAMPLER, PREVIEW_SCHEDULER = "euler", "normal"


class Previewer:
    """Validation samples during training (``enabled`` only with a VAE to decode them)."""

    def __init__(self, run, s, inputs: dict, d):
        self.run, self.s, self.vae = run, s, inputs.get("vae")
        self.clip = run.clip_t if run.te is not None else inputs.get("clip")
        self.text = s.validation_prompt.strip() or (d.prompts[0] if d.prompts else None)
        if self.text is None and d.cutmix is not None:
            self.text = d.cutmix.samples(0)[0].prompt
        self.fallback_entry = d.entries[0]
        self.enabled = s.preview_every > 0 and self.vae is not None
        self.images: list = []
        self.at_steps: list = []

    def due(self, step_done: int, first: bool) -> bool:
        return self.enabled and (first or step_done % self.s.preview_every == 0)

    def _conds(self) -> tuple:
        if self.clip is not None and self.text:
            pos = _clone_cond(encode_prompt(self.clip, self.text))
            neg = _clone_cond(encode_prompt(self.clip, ""))
        else:
            pos = self.fallback_entry
            neg = [torch.zeros_like(pos[0]), {}]
        return pos, neg

    @torch.no_grad()
    def sample(self, step_done: int) -> torch.Tensor:
        """One validation image [1, H, W, 3] of the current shift (also kept for the output)."""
        run, s = self.run, self.s
        capture = run.capture
        if capture is not None:
            capture.enabled = False
        try:
            pos, neg = self._conds()
            chans = run.mp.get_model_object("latent_format").latent_channels
            latent = torch.zeros(1, chans, s.resolution // 8, s.resolution // 8)
            noise = comfy.sample.prepare_noise(latent, s.seed)
            out = comfy.sample.sample(run.mp, noise, s.prior_steps, PRIOR_CFG, PREVIEW_SAMPLER, PREVIEW_SCHEDULER, [pos], [neg],
                                      latent, disable_pbar=True, seed=s.seed)
            img = self.vae.decode(out.float()).float().clamp(0, 1)
        finally:
            if capture is not None:
                capture.enabled = True
                capture.clear()
        mm.load_models_gpu([run.mp], force_full_load=True)  # the VAE may have displaced the training clone
        img = img.reshape(-1, *img.shape[-3:])[:1].cpu()
        self.images.append(img)
        self.at_steps.append(step_done)
        return img

    def output(self) -> torch.Tensor:
        """The previews as an IMAGE batch (a black image when there were none)."""
        if not self.images:
            r = self.s.resolution
            return torch.zeros(1, r, r, 3)
        return torch.cat(self.images, 0)


def pil_preview(img: torch.Tensor):
    """("JPEG", PIL image, max side) as ComfyUI's progress bar sends previews."""
    from PIL import Image

    arr = (img[0].numpy() * 255.0).round().astype(np.uint8)
    return ("JPEG", Image.fromarray(arr), 512)


class StatusText:
    """Loss, s/step and ETA as the node's progress text (at most about once a second), below
    ``header`` (the run's memory plan)."""

    def __init__(self, start: int, steps: int, header: str = ""):
        self.start, self.steps, self.header = start, steps, header
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.node_id = compat.executing_node_id()

    def text(self, i: int, loss: float, previews: int) -> str:
        per = (time.perf_counter() - self.t0) / max(1, i + 1)
        eta = per * (self.steps - i - 1)
        live = (f"step {self.start + i + 1}/{self.start + self.steps}  loss {loss:.4f}  {per:.2f} s/step  "
                f"ETA {int(eta // 60)}:{int(eta % 60):02d}  previews {previews}")
        return f"{self.header}\n{live}" if self.header else live

    def update(self, i: int, loss: float, previews: int) -> None:
        now = time.perf_counter()
        if now - self.last < 1.0 and i + 1 < self.steps:
            return
        self.last = now
        compat.progress_text(self.text(i, loss, previews), self.node_id)
