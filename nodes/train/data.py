"""SVDiff Train's data: images and prompts to latents and conditionings, prior images,
Cut-Mix-Unmix samples, and the model calls of a denoising step."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.sample
import comfy.utils

from ...svdiff import buckets, losses, training
from ...svdiff.cutmix import CutMixTrainingSet, Subject, single_prompt
from .. import comfy_compat as compat
from ..attention_capture import token_positions, with_latent_shape
from ..common import check_interrupt, log, progress
from .settings import NODE, err


def _split_images(items) -> list:
    out = []
    for t in items or []:
        if t is None:
            continue
        if t.ndim == 3:
            t = t[None]
        for i in range(t.shape[0]):
            out.append(t[i : i + 1])
    return out


def prepare_images(images: list, resolution: int, field: str, notes: list) -> torch.Tensor:
    """Resize on the shorter side and centre-crop each image to resolution x resolution."""
    out = []
    sizes = {tuple(im.shape[1:3]) for im in images}
    if len(sizes) > 1:
        notes.append(f"{field}: images of {len(sizes)} different sizes were each resized and centre-cropped to {resolution}x{resolution}")
    for i, im in enumerate(images):
        h, w = int(im.shape[1]), int(im.shape[2])
        if max(h, w) / max(1, min(h, w)) > 1.5:
            notes.append(f"{field}: image {i + 1} is {w}x{h}, far from square; its centre crop loses {100 * (1 - min(h, w) / max(h, w)):.0f}% of it")
        x = im[..., :3].movedim(-1, 1).float()
        x = comfy.utils.common_upscale(x, resolution, resolution, "area" if min(h, w) >= resolution else "bilinear", "center")
        out.append(x.movedim(1, -1).clamp(0, 1))
    return torch.cat(out, 0)


def prepare_bucketed(images: list, resolution: int, field: str) -> list:
    """Each image resized to cover its aspect-ratio bucket (``svdiff.buckets``) and centre-cropped
    to it: a list of [1, h, w, 3].  Square images get resolution x resolution, exactly as
    ``prepare_images`` makes them."""
    sizes = buckets.bucket_sizes(resolution)
    out = []
    for i, im in enumerate(images):
        h, w = int(im.shape[1]), int(im.shape[2])
        if buckets.aspect_ratio(h, w) > buckets.MAX_RATIO:
            raise err(field, f"image {i + 1} is {w}x{h}, more than {buckets.MAX_RATIO:g}:1; crop it first, or use image_fit centre-crop")
        bh, bw = buckets.nearest_bucket(h, w, sizes)
        if h < bh / 2 or w < bw / 2:
            raise err(field, f"image {i + 1} is {w}x{h}, less than half of its {bw}x{bh} bucket at resolution {resolution}: "
                             "use a lower resolution or a larger image")
        x = im[..., :3].movedim(-1, 1).float()
        x = comfy.utils.common_upscale(x, bw, bh, "area" if h >= bh and w >= bw else "bilinear", "center")
        out.append(x.movedim(1, -1).clamp(0, 1))
    return out


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, field: str) -> torch.Tensor:
    if vae is None:
        raise err("vae", f"a VAE is needed to encode {field}")
    lat = [vae.encode(pixels[i : i + 1]) for i in range(pixels.shape[0])]
    return torch.cat(lat, 0).float()


def encode_prompt(clip, text: str, grad: bool = False):
    """ComfyUI conditioning entry [tensor, dict] for ``text`` (differentiable when ``grad``)."""
    with torch.set_grad_enabled(grad):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)
    return cond[0]


def _clone_cond(entry):
    t, d = entry
    d2 = {}
    for k, v in d.items():
        d2[k] = v.clone() if torch.is_tensor(v) else v
    return [t.clone(), d2]


def special_tokens(prompt: str, class_prompt: str) -> list:
    """Words of the instance prompt that the class prompt lacks (the likely identifier, e.g. 'sks')."""
    words = lambda s: re.findall(r"[\w\[\]<>]+", s.lower())
    cls = set(words(class_prompt))
    return [w for w in words(prompt) if w not in cls]


_PRIOR_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PRIOR_CACHE_MAX = 8


@torch.no_grad()
def generate_priors(model, positive, negative, count: int, resolution: int, seed: int, steps: int, cfg: float, key_extra) -> torch.Tensor:
    """num_prior_images latents of the class prompt from the base model (ComfyUI's sampler), cached."""
    key = (id(model.model), compat.patches_version(model), key_extra, int(count), int(resolution), int(seed), int(steps), float(cfg))
    hit = _PRIOR_CACHE.get(key)
    if hit is not None:
        _PRIOR_CACHE.move_to_end(key)
        log.info("[%s] using %d cached prior images", NODE, count)
        return hit.clone()
    pbar = progress(count * steps)
    chans = model.get_model_object("latent_format").latent_channels
    down = 8
    out = []
    for i in range(count):
        check_interrupt()
        latent = torch.zeros(1, chans, resolution // down, resolution // down)
        noise = comfy.sample.prepare_noise(latent, training.mix_seed(seed, i, training.STREAM_PRIOR_GEN) % (1 << 32))
        cb = lambda step, x0, x, total: pbar.update(1)
        s = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", [positive], [negative], latent,
                                callback=cb, disable_pbar=True, seed=seed + i)
        out.append(s.float().cpu())
    lat = torch.cat(out, 0)
    _PRIOR_CACHE[key] = lat
    while len(_PRIOR_CACHE) > _PRIOR_CACHE_MAX:
        _PRIOR_CACHE.popitem(last=False)
    return lat.clone()


def model_kwargs(patcher, entry, x: torch.Tensor) -> dict:
    """apply_model keyword arguments (c_crossattn, y, ...) for one conditioning entry, batch of x."""
    return compat.model_condition_kwargs(patcher, entry, x)


def concat_kwargs(parts: list) -> Optional[dict]:
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        return None
    out = {}
    for k in keys:
        ts = [p[k] for p in parts]
        if any(not torch.is_tensor(t) for t in ts) or len({tuple(t.shape[1:]) for t in ts}) != 1:
            return None
        out[k] = torch.cat(ts, 0)
    return out


def prediction_target(patcher) -> tuple[str, float]:
    ms = patcher.get_model_object("model_sampling")
    sd = float(getattr(ms, "sigma_data", 1.0))
    kind = compat.prediction_kind(ms)
    if kind in ("eps", "v", "flow"):
        return kind, sd
    raise err("model", f"prediction type {type(ms).__name__} is not supported (eps, v and flow models are)")


def denoise_x0(patcher, x0, noise, sigma, kwargs, transformer_options):
    ms = patcher.get_model_object("model_sampling")
    xt = ms.noise_scaling(sigma, noise, x0)
    transformer_options = with_latent_shape(transformer_options, xt)  # a DiT attention capture's map grid
    return patcher.model.apply_model(xt, sigma, transformer_options=transformer_options, **kwargs)


@torch.no_grad()
def evaluate_denoising_loss(patcher, latents: torch.Tensor, entry, seed: int = 1234, draws: int = 8, timesteps=None) -> float:
    """Mean Eq. 1 loss of ``patcher`` on model-space ``latents`` with fixed noise and timesteps.

    A held-out measurement (its own seed stream): used by tests and the benchmark.
    """
    mm.load_models_gpu([patcher], force_full_load=True)
    target, sd = prediction_target(patcher)
    ms = patcher.get_model_object("model_sampling")
    device = patcher.load_device
    total = 0.0
    for d in range(draws):
        g = training.generator(seed, d, 99)
        x0 = latents.to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = (timesteps[d % len(timesteps)] * torch.ones(x0.shape[0], dtype=torch.long)) if timesteps else training.timestep_draw(g, x0.shape[0], len(ms.sigmas))
        sigma = ms.sigmas.to(device)[t.to(device)].float()
        kw = model_kwargs(patcher, entry, x0)
        x0p = denoise_x0(patcher, x0, noise, sigma, kw, patcher.model_options.get("transformer_options", {}))
        total += float(losses.denoising_loss(x0p.float(), x0.float(), sigma, target, sd))
    return total / draws


class CutMixData:
    """Training batches drawn from a Cut-Mix training set (Sec. 3.3, Fig. 3).

    Sample ``j`` of step ``s`` is ``training_set.sample(s * batch_size + j, prior)``: a
    deterministic function of the set's seed and the step, so resuming draws the same data.
    Latents (VAE, no gradient), conditionings and token positions are cached.
    """

    LATENT_CACHE = 512

    def __init__(self, ts: CutMixTrainingSet, model, vae, clip, resolution: int, batch_size: int):
        self.ts, self.model, self.vae, self.clip = ts, model, vae, clip
        self.resolution, self.batch_size = int(resolution), int(batch_size)
        self._lat: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self._cond: dict = {}
        self._pos: dict = {}
        self.encoded = 0

    def samples(self, step: int, prior: bool = False) -> list:
        return [self._fit(self.ts.sample(step * self.batch_size + j, prior)) for j in range(self.batch_size)]

    def _fit(self, s):
        """The sample at the training resolution (when the Builder used another one)."""
        R = self.resolution
        if s.image.shape[0] == R and s.image.shape[1] == R:
            return s
        img = F.interpolate(s.image.movedim(-1, 0)[None].float(), size=(R, R), mode="bilinear", align_corners=False,
                            antialias=s.image.shape[0] > R)[0].movedim(0, -1).clamp(0, 1)
        masks = F.interpolate(s.masks[None].float(), size=(R, R), mode="area" if s.masks.shape[-1] > R else "nearest")[0]
        s.image, s.masks = img, masks
        return s

    def latent(self, s) -> torch.Tensor:
        """Model-space latent [1, C, h, w] of a sample's image (VAE-encoded once per distinct image)."""
        import hashlib

        img = s.image.detach().float().contiguous().cpu()
        key = hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest()
        hit = self._lat.get(key)
        if hit is None:
            hit = self.model.model.process_latent_in(encode_images(self.vae, img[None], "training_set")).float()
            self.encoded += 1
            self._lat[key] = hit
            while len(self._lat) > self.LATENT_CACHE:
                self._lat.popitem(last=False)
        else:
            self._lat.move_to_end(key)
        return hit

    def cond(self, prompt: str):
        e = self._cond.get(prompt)
        if e is None:
            e = self._cond[prompt] = _clone_cond(encode_prompt(self.clip, prompt))
        return e

    def positions(self, prompt: str, word: str) -> list:
        key = (prompt, word)
        if key not in self._pos:
            self._pos[key] = token_positions(self.clip, prompt, word, lambda: self.cond(prompt)[0].shape[1])
        return self._pos[key]

    def positions_or_fail(self, prompt: str, word: str, what: str) -> list:
        pos = self.positions(prompt, word)
        if not pos:
            raise err("training_set", f"{what} {word!r} is not found by the CLIP tokenizer in the prompt {prompt!r}: "
                                      "use a plain word as the token (no 'embedding:' names, brackets or weights)")
        return pos


def with_generated_priors(ts: CutMixTrainingSet, model, vae, clip, resolution: int, count: int, seed: int,
                          steps: int, cfg: float, check_clip) -> tuple:
    """The set with prior images for every subject: the Builder's, or ``count`` images generated
    from the subject's class prompt ("photo of a dog") with the base model (cached).

    Returns (training set, {subject index: number generated}).
    """
    generated = {}
    subjects = []
    neg = None
    for i, s in enumerate(ts.subjects):
        prior = s.prior_images
        if prior is None:
            if neg is None:
                neg = _clone_cond(encode_prompt(clip, ""))
            entry = check_clip(_clone_cond(encode_prompt(clip, single_prompt(s, prior=True))))
            raw = generate_priors(model, entry, neg, count, resolution, training.mix_seed(seed, i, training.STREAM_CUTMIX),
                                  steps, cfg, (single_prompt(s, prior=True), True))
            with torch.no_grad():
                prior = vae.decode(raw.float()).float().clamp(0, 1)
            if prior.ndim == 5:
                prior = prior.reshape(-1, *prior.shape[-3:])
            generated[i] = int(prior.shape[0])
        subjects.append(Subject(s.images, s.token, s.class_word, prior))
    if not generated:
        return ts, generated
    return CutMixTrainingSet(subjects, ts.config, ts.resolution), generated


def cutmix_settings(ts: CutMixTrainingSet, generated: dict) -> dict:
    """The Cut-Mix settings recorded in the shift's training metadata."""
    c = ts.config
    return {
        "probability": c.probability, "layout": c.layout, "and_prompt_probability": c.and_prompt_probability,
        "seed": c.seed, "resolution": ts.resolution,
        "subjects": [{"token": s.token, "class_word": s.class_word, "images": int(s.images.shape[0]),
                      "prior_images": int(s.prior_images.shape[0]) if s.prior_images is not None else 0,
                      "prior_generated": i in generated} for i, s in enumerate(ts.subjects)],
    }


