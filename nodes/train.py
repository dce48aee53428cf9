"""SVDiff Train: DreamBooth-style spectral-shift training inside the ComfyUI graph.

Glue only: the math is in ``svdiff.layers`` (shifted layers, side path / recompose),
``svdiff.losses`` (Eq. 3) and ``svdiff.training`` (optimizer, per-step randomness, state).

Mechanism: a CLONE of the MODEL (and of the CLIP when its text encoder is trained) gets a
module injection (``ModelPatcher.set_injections``) that replaces the forward of every
Linear / Conv2d / GroupNorm / LayerNorm on the gradient path while the clone is loaded;
ComfyUI ejects it on unpatch, and this node unloads the clone when it is done.  Frozen
layers compute dx from the frozen weight without copying it; trained layers add their
spectral shift by the cheaper of the two routes (``svdiff.layers.choose_route``).  No base
weight is ever written, copied or given a gradient.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import folder_paths
from comfy.patcher_extension import PatcherInjection
from comfy_api.latest import io, ui

from ..svdiff import attention as attn
from ..svdiff import layers as L
from ..svdiff import losses, training
from ..svdiff.cutmix import CutMixTrainingSet, Subject, single_prompt, stack_masks
from ..svdiff.shift import SpectralShift, delta_length, is_spectral_shape
from ..svdiff.subsets import SUBSET_NAMES, select
from . import comfy_compat as compat
from .adapter import (UNET_PREFIX, architecture_of, base_weight, combined_fingerprint, shiftable_shapes, svd_cache,
                      weight_fingerprint)
from .attention_capture import AttentionCapture, token_positions
from .common import (CATEGORY, SpectralShiftType, SVDiffNodeError, TrainingSetType, check_interrupt, log, progress,
                     shift_files)
from .shifts import apply_shift, read_shift_file, save_shift_numbered

NODE = "SVDiff Train"
INJECTION_KEY = "svdiff_train"
NONE = "[None]"
LossMapType = io.Custom("LOSS_MAP")


def err(field: str, msg: str) -> SVDiffNodeError:
    return SVDiffNodeError(NODE, f"{field}: {msg}")


# ---------------------------------------------------------------------------------------
# Injected forwards
# ---------------------------------------------------------------------------------------
def _weight_bias(mod, x):
    """The layer's weight and bias as ComfyUI would use them (casts, low-VRAM patches), no copy."""
    return compat.layer_weight_bias(mod, x)


def _geometry(mod) -> L.ConvGeometry:
    return L.ConvGeometry(tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation), int(mod.groups))


def _make_forward(mod, kind: str, layer: Optional[L.ShiftedLayer], vdelta: Optional[torch.Tensor], clone_input: bool = False):
    if kind in ("linear", "conv2d"):
        geo = _geometry(mod) if kind == "conv2d" else None

        def forward(x, *args, **kwargs):
            w, b = _weight_bias(mod, x)
            if layer is not None:
                return layer.forward(x, w, b)
            return L.frozen_forward(kind, x, w, b, geo)

        return forward

    def norm_forward(x, *args, **kwargs):
        if clone_input:
            x = x.clone()  # the caller may update x in place afterwards (ComfyUI's CLIP: x += attn(ln(x)))
        w, b = _weight_bias(mod, x)
        if w is not None:
            w = L.shifted_vector(w, vdelta)
        if b is not None and b.is_inference():
            b = b.clone()
        if kind == "groupnorm":
            return F.group_norm(x, mod.num_groups, w, b, mod.eps)
        return F.layer_norm(x, mod.normalized_shape, w, b, mod.eps)

    return norm_forward


def _kind(mod) -> Optional[str]:
    if isinstance(mod, torch.nn.Linear):
        return "linear"
    if isinstance(mod, torch.nn.Conv2d) and getattr(mod, "padding_mode", "zeros") == "zeros":
        return "conv2d"
    if isinstance(mod, torch.nn.GroupNorm):
        return "groupnorm"
    if isinstance(mod, torch.nn.LayerNorm):
        return "layernorm"
    return None


def _checkpoint_targets(root: torch.nn.Module) -> list:
    """The outermost non-container children of ``root`` (each becomes one checkpointed segment)."""
    out = []
    for child in root.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            out.extend(_checkpoint_targets(child))
        else:
            out.append(child)
    return out


class TrainInjection:
    """Install / remove the training forwards on the shared modules (a PatcherInjection pair)."""

    def __init__(self, forwards: list, checkpoint_roots: list):
        self.forwards = forwards  # [(module, forward)]
        self.checkpoint_roots = checkpoint_roots
        self.saved: list = []

    def inject(self, patcher):
        if self.saved:
            return
        for mod, fwd in self.forwards:
            self.saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = fwd
        for root in self.checkpoint_roots:
            for mod in _checkpoint_targets(root):
                inner = mod.forward
                self.saved.append((mod, mod.__dict__.get("forward")))

                def ckpt(*args, _inner=inner, **kwargs):
                    # dict arguments (transformer_options) are copied: ComfyUI updates them in place
                    # as it walks the blocks ("block", "block_index"), and the recomputation in the
                    # backward pass must see the values this block was called with, not the last ones
                    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                    return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

                mod.forward = ckpt

    def eject(self, patcher):
        for mod, prev in reversed(self.saved):
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = prev
        self.saved = []

    def patcher_injection(self) -> PatcherInjection:
        return PatcherInjection(inject=self.inject, eject=self.eject)


# ---------------------------------------------------------------------------------------
# Trainable state
# ---------------------------------------------------------------------------------------
class Trainable:
    """delta Parameters for a set of keys of one patcher, and the injection that uses them."""

    def __init__(self, patcher, keys: list, rank: int, device, force_route: Optional[str], scope_prefix: str,
                 skip_modules=(), clone_norm_input: bool = False):
        self.patcher = patcher
        self.params: "OrderedDict[str, torch.nn.Parameter]" = OrderedDict()
        self.layers: dict = {}
        self.shapes: dict = {}
        self.fps: dict = {}
        modules = dict(patcher.model.named_modules())
        wanted = set(keys)
        cache = svd_cache()
        pbar = progress(max(1, len(keys)))
        forwards = []
        for name, mod in modules.items():
            if not name.startswith(scope_prefix.rstrip(".")):
                continue
            if any(name.startswith(s) for s in skip_modules):
                continue
            kind = _kind(mod)
            if kind is None or getattr(mod, "weight", None) is None:
                continue
            key = f"{name}.weight"
            layer, vdelta = None, None
            if key in wanted:
                check_interrupt()
                w = base_weight(patcher, key)
                shape = tuple(w.shape)
                self.shapes[key] = shape
                self.fps[key] = weight_fingerprint(w)
                if is_spectral_shape(shape):
                    dec = cache.get(w, device=mm.get_torch_device(), fp=self.fps[key])
                    r = delta_length(shape, rank)
                    delta = torch.nn.Parameter(torch.zeros(r, dtype=torch.float32, device=device))
                    layer = L.ShiftedLayer(
                        delta=delta, S=dec.S[:r].to(device), U=dec.U[:, :r].contiguous().to(device),
                        Vh=dec.Vh[:r].contiguous().to(device), shape=shape,
                        kind=kind, geo=_geometry(mod) if kind == "conv2d" else None, force_route=force_route,
                    )
                    self.layers[key] = layer
                    self.params[key] = delta
                else:
                    vdelta = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
                    self.params[key] = vdelta
                pbar.update(1)
            forwards.append((mod, _make_forward(mod, kind, layer, vdelta, clone_norm_input)))
        self.missing = [k for k in keys if k not in self.params]
        self.injection = TrainInjection(forwards, [])

    def spectral_params(self):
        return [p for k, p in self.params.items() if k in self.layers]

    def vector_params(self):
        return [p for k, p in self.params.items() if k not in self.layers]

    def routes(self) -> dict:
        out = {}
        for layer in self.layers.values():
            out[layer.route or "unused"] = out.get(layer.route or "unused", 0) + 1
        return out


# ---------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------
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


def _unload(patcher) -> None:
    """Unload a training clone: ComfyUI ejects the injection and restores the weights."""
    compat.unload_patcher(patcher)


# ---------------------------------------------------------------------------------------
# Cut-Mix-Unmix data and the attention regularisers (Sec. 3.3, appendix D.1)
# ---------------------------------------------------------------------------------------
def parse_resolutions(text) -> Optional[set]:
    """``attention_resolutions``: "all" (or empty) -> None; "16" / "16, 32" -> {16, 32}."""
    t = str(text or "").strip().lower()
    if t in ("", "all", "*"):
        return None
    out = set()
    for part in re.split(r"[,;\s]+", t):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise err("attention_resolutions", f"{text!r} is not 'all' or a list of map side lengths such as '16' or '8, 16'")
        out.add(int(part))
    return out


def single_subject_words(prompt: str, class_prompt: str) -> tuple:
    """(special words, class word) of a single-subject instance prompt, for Eq. 10.

    The special words are those the class prompt lacks ('sks'); the class word is the word
    right after the last of them when the class prompt has it ('dog'), else the last word of
    the class prompt that the instance prompt also has.
    """
    words = re.findall(r"[\w\[\]<>]+", prompt.lower())
    cls_words = re.findall(r"[\w\[\]<>]+", class_prompt.lower())
    specials = special_tokens(prompt, class_prompt)
    if not specials:
        raise err("prompt", f"attention_reg_weight needs a special token in the prompt that the class prompt lacks "
                            f"(e.g. 'sks' in 'photo of a sks dog'); {prompt!r} has none")
    last = max(i for i, w in enumerate(words) if w in specials)
    if last + 1 < len(words) and words[last + 1] in cls_words:
        return specials, words[last + 1]
    for w in reversed(cls_words):
        if w in words:
            return specials, w
    raise err("class_prompt", f"attention_reg_weight needs the class word (e.g. 'dog') in both the prompt and the class "
                              f"prompt; {class_prompt!r} shares no word with {prompt!r}")


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
            self._pos[key] = token_positions(self.clip, prompt, word)
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


def concat_maps(parts: list) -> dict:
    """Captured maps of several forwards (block -> [b_i, P, T]) joined along the batch."""
    if len(parts) == 1:
        return parts[0]
    keys = set(parts[0])
    return {k: torch.cat([p[k] for p in parts], 0) for k in keys if all(k in p for p in parts)}


def select_maps(maps: dict, idx: list) -> dict:
    ix = torch.tensor(idx, dtype=torch.long)
    return {k: m[ix.to(m.device)] for k, m in maps.items()}


# ---------------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------------
def train(node_inputs: dict) -> tuple:
    """Run SVDiff training from already-unwrapped node inputs; returns the node's outputs."""
    a = node_inputs
    notes: list = []
    model, clip, vae = a["model"], a.get("clip"), a.get("vae")
    steps, batch_size, seed = int(a["steps"]), int(a["batch_size"]), int(a["seed"])
    lr, lr_1d = a["learning_rate"], a["learning_rate_1d"]
    prior_weight = float(a["prior_weight"])
    resolution = int(a["resolution"])
    subset, rank = a["subset"], int(a["rank"])

    # --- validation of scalar inputs ---
    if model is None:
        raise err("model", "no MODEL connected")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise err("learning_rate", f"must be a positive finite number, got {lr}")
    if not isinstance(lr_1d, (int, float)) or not math.isfinite(lr_1d) or lr_1d < 0:
        raise err("learning_rate_1d", f"must be a finite number >= 0 (0 freezes 1-D weights), got {lr_1d}")
    if not math.isfinite(prior_weight) or prior_weight < 0:
        raise err("prior_weight", f"must be a finite number >= 0, got {prior_weight}")
    if steps < 0:
        raise err("steps", f"must be >= 0, got {steps}")
    if batch_size < 1:
        raise err("batch_size", f"must be >= 1, got {batch_size}")
    if resolution % 64 or resolution < 64:
        raise err("resolution", f"must be a positive multiple of 64, got {resolution}")
    if subset not in SUBSET_NAMES:
        raise err("subset", f"unknown subset {subset!r}; one of {', '.join(SUBSET_NAMES)}")
    if rank < 0:
        raise err("rank", f"must be >= 0 (0 = all singular values), got {rank}")
    prompt, class_prompt = a.get("prompt") or "", a.get("class_prompt") or ""
    unmix_weight = a.get("unmix_weight", 0.0)
    reg_weight = a.get("attention_reg_weight", 0.0)
    threshold = a.get("attention_threshold", 0.5)
    for field, v in (("unmix_weight", unmix_weight), ("attention_reg_weight", reg_weight)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise err(field, f"must be a finite number >= 0 (0 = off), got {v}")
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise err("attention_threshold", f"must be in [0, 1) (a fraction of the class token's peak attention), got {threshold}")
    unmix_weight, reg_weight, threshold = float(unmix_weight), float(reg_weight), float(threshold)
    att_res = parse_resolutions(a.get("attention_resolutions", "all"))
    training_set = a.get("training_set")
    if training_set is not None and not isinstance(training_set, CutMixTrainingSet):
        raise err("training_set", f"expected a training set from the Cut-Mix Builder, got {type(training_set).__name__}")
    target, sigma_data = prediction_target(model)
    unet_ctx = (getattr(model.model, "model_config", None) and model.model.model_config.unet_config.get("context_dim")) or None

    train_te = bool(a.get("train_text_encoder")) and clip is not None
    images = _split_images(a.get("images"))
    latents_in = a.get("latents") or []
    positive_in = a.get("positive") or []

    def check_clip(entry, field="clip"):
        if unet_ctx is not None and entry[0].shape[-1] != unet_ctx:
            raise err(field, f"this CLIP gives {entry[0].shape[-1]}-wide embeddings but the MODEL expects {unet_ctx}: "
                             "connect the CLIP of the same checkpoint")
        return entry

    with torch.inference_mode(False):
        # --- instance data ---
        cutmix = None
        cutmix_meta = None
        if training_set is not None:
            route = "cutmix"
            if latents_in:
                raise err("training_set", "Cut-Mix is unavailable with pre-encoded latents + positive (the images must be "
                                          "cut and mixed before encoding, and each prompt is written per sample): "
                                          "disconnect latents/positive, or the training_set")
            if clip is None:
                raise err("clip", "a CLIP is needed to encode the prompts of the Cut-Mix training set")
            if vae is None:
                raise err("vae", "a VAE is needed to encode the images of the Cut-Mix training set")
            if images:
                notes.append("images: ignored because a training_set is connected (its subjects are the training images)")
            if training_set.resolution != resolution:
                notes.append(f"training_set: built at {training_set.resolution} px, resized to the training resolution "
                             f"{resolution}; give the Cut-Mix Builder the same resolution to avoid resampling twice")
            cutmix = CutMixData(training_set, model, vae, clip, resolution, batch_size)
            first = cutmix.samples(0)[0]
            inst_latents = cutmix.latent(first)  # shape and a first check of the VAE
            inst_entries = [check_clip(cutmix.cond(first.prompt))]
            inst_cond_idx = [0]
        elif images:
            route = "images"
            if clip is None:
                raise err("clip", "a CLIP is needed to encode the prompt of the images (or use latents + positive)")
            if not prompt.strip():
                raise err("prompt", "the instance prompt is empty")
            pixels = prepare_images([im.clone() for im in images], resolution, "images", notes)
            inst_latents = encode_images(vae, pixels, "images")
            inst_entries = [check_clip(_clone_cond(encode_prompt(clip, prompt)))]
            inst_cond_idx = [0] * inst_latents.shape[0]
        elif latents_in:
            route = "latents"
            lats = []
            for d in latents_in:
                s = d["samples"] if isinstance(d, dict) else d
                lats.extend([s[i : i + 1].clone().float() for i in range(s.shape[0])])
            if len({tuple(t.shape) for t in lats}) != 1:
                raise err("latents", "latents of different sizes cannot be trained together in this version; encode them at one resolution")
            inst_latents = torch.cat(lats, 0)
            flat = []
            for c in positive_in:
                flat.extend(c if isinstance(c, list) and c and isinstance(c[0], (list, tuple)) else [c])
            if not flat:
                raise err("positive", "the latents route needs the positive CONDITIONING list (from Make/Load Training Dataset)")
            inst_entries = [check_clip(_clone_cond(e), "positive") for e in flat]
            if len(inst_entries) == 1:
                inst_cond_idx = [0] * inst_latents.shape[0]
            elif len(inst_entries) == inst_latents.shape[0]:
                inst_cond_idx = list(range(len(inst_entries)))
            else:
                raise err("positive", f"{len(inst_entries)} conditionings for {inst_latents.shape[0]} latents; give one or one per latent")
            if train_te:
                notes.append("train_text_encoder: not possible with pre-encoded latents + positive; only the UNet is trained")
                train_te = False
        else:
            raise err("images", "no training images: connect images (with vae and clip) or latents + positive")
        if images and latents_in and route == "images":
            notes.append("latents: ignored because images are connected")
        if route != "cutmix":
            inst_latents = model.model.process_latent_in(inst_latents)

        # --- the attention regularisers: what they need ---
        if unmix_weight > 0 and route != "cutmix":
            raise err("unmix_weight", "the unmix regularisation needs a Cut-Mix training_set (two or more subjects in one "
                                      "image); connect one, or set unmix_weight to 0")
        if reg_weight > 0 and route == "latents":
            raise err("attention_reg_weight", "Eq. 10 needs the prompt text to find the special and class tokens, which "
                                              "pre-encoded latents + positive lack; use images (or a training_set), or set it to 0")
        single_pos = None
        if reg_weight > 0 and route == "images":
            specials, class_word = single_subject_words(prompt, class_prompt)
            sp = sorted({p for w in specials for p in token_positions(clip, prompt, w)})
            cp = token_positions(clip, prompt, class_word)
            if not sp:
                raise err("prompt", f"the special token(s) {specials} are not found by the CLIP tokenizer in {prompt!r}")
            if not cp:
                raise err("class_prompt", f"the class word {class_word!r} is not found by the CLIP tokenizer in {prompt!r}")
            single_pos = (sp, cp)
        if route == "cutmix" and (unmix_weight > 0 or reg_weight > 0):
            for i, s_ in enumerate(training_set.subjects):
                p_ = single_prompt(s_)
                cutmix.positions_or_fail(p_, s_.token, f"subject {i + 1}'s token")
                if reg_weight > 0:
                    cutmix.positions_or_fail(p_, s_.class_word, f"subject {i + 1}'s class word")
            if unmix_weight > 0 and training_set.config.probability == 0:
                notes.append("unmix_weight: the training set never mixes two subjects (probability 0), so the unmix term is never used")

        # --- prior data ---
        prior_latents, prior_entry = None, None
        if prior_weight > 0 and route == "cutmix":
            if _split_images(a.get("prior_images")):
                notes.append("prior_images: ignored because a training_set is connected (give each subject's prior images to the Cut-Mix Builder)")
            n = int(a.get("num_prior_images", 8))
            if n < 1:
                raise err("num_prior_images", "must be >= 1 when prior_weight > 0 and a subject has no prior images")
            ts2, generated = with_generated_priors(training_set, model, vae, clip, resolution, n, seed,
                                                   int(a.get("prior_steps", 20)), float(a.get("prior_cfg", 7.0)), check_clip)
            if generated:
                notes.append(f"prior_weight: generated {n} prior images for subject(s) "
                             f"{', '.join(str(i + 1) for i in sorted(generated))} from their class prompts")
            cutmix.ts = ts2
            cutmix_meta = cutmix_settings(ts2, generated)
        elif route == "cutmix":
            cutmix_meta = cutmix_settings(training_set, {})
        elif prior_weight > 0:
            if clip is not None and class_prompt.strip():
                prior_entry = check_clip(_clone_cond(encode_prompt(clip, class_prompt)))
            elif a.get("prior_conditioning"):
                pc = a["prior_conditioning"]
                prior_entry = check_clip(_clone_cond(pc[0] if isinstance(pc[0], (list, tuple)) else pc), "prior_conditioning")
            else:
                raise err("class_prompt", "prior preservation (prior_weight > 0) needs a class prompt with a CLIP, or prior_conditioning")
            if route == "images" and not special_tokens(prompt, class_prompt):
                notes.append(f"prompt: {prompt!r} has no word that the class prompt lacks (no rare identifier such as 'sks'); "
                             "training anyway (editing prompts have none on purpose)")
            pimgs = _split_images(a.get("prior_images"))
            if pimgs:
                ppix = prepare_images([im.clone() for im in pimgs], resolution, "prior_images", notes)
                prior_raw = encode_images(vae, ppix, "prior_images")
            else:
                n = int(a.get("num_prior_images", 8))
                if n < 1:
                    raise err("num_prior_images", "must be >= 1 when prior_weight > 0 and no prior_images are connected")
                if clip is not None:
                    neg = _clone_cond(encode_prompt(clip, ""))
                else:
                    neg = [torch.zeros_like(prior_entry[0]), {}]
                prior_raw = generate_priors(model, prior_entry, neg, n, resolution, seed, int(a.get("prior_steps", 20)),
                                            float(a.get("prior_cfg", 7.0)), (class_prompt, bool(clip is not None)))
            prior_latents = model.model.process_latent_in(prior_raw.float())
            if prior_latents.shape[1:] != inst_latents.shape[1:]:
                raise err("prior_images", f"prior latents are {list(prior_latents.shape[1:])} but the instance latents are {list(inst_latents.shape[1:])}")

        for n_ in notes:
            log.warning("[%s] %s", NODE, n_)

        # --- what to train ---
        unet_shapes = shiftable_shapes(model, UNET_PREFIX)
        unet_keys = select(unet_shapes, subset)
        if not unet_keys:
            raise err("subset", f"the subset {subset} selects no weight of this model")
        force_route = a.get("side_path") if a.get("side_path") in L.ROUTES else None

        mp = compat.training_clone(model)
        tdt = training_dtype(a.get("training_dtype", "auto"), mp.load_device)
        if tdt != mp.model.get_dtype():
            mp.set_model_compute_dtype(tdt)
        device = mp.load_device
        unet = Trainable(mp, unet_keys, rank, device, force_route, "diffusion_model")
        if a.get("gradient_checkpointing"):
            unet.injection.checkpoint_roots = [mp.model.diffusion_model]
        mp.set_injections(INJECTION_KEY, [unet.injection.patcher_injection()])
        capture = None
        if unmix_weight > 0 or reg_weight > 0:
            # attn2 replacement on the training clone only (before it is loaded); nothing when both weights are 0
            prev = mp.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
            if prev:
                notes.append("unmix_weight/attention_reg_weight: the MODEL's own cross-attention replacement patches "
                             f"({len(prev)}) are not used while training (the attention capture replaces them on the training copy)")
            capture = AttentionCapture(att_res)
            capture.install(mp)

        te = None
        clip_t = None
        if train_te:
            clip_t = compat.training_clone(clip)
            cshapes = shiftable_shapes(clip_t.patcher)
            ckeys = [k for k in cshapes if ".encoder." in k or "final_layer_norm" in k]
            te = Trainable(clip_t.patcher, ckeys, rank, clip_t.patcher.load_device, force_route, "", clone_norm_input=True)
            clip_t.patcher.set_injections(INJECTION_KEY, [te.injection.patcher_injection()])
            if not te.params:
                notes.append("train_text_encoder: no trainable text-encoder weights found")
                te = None

        all_params = OrderedDict(unet.params)
        if te is not None:
            all_params.update(te.params)

        # --- resume ---
        start_step = 0
        opt_tensors = {}
        settings = {
            "subset": subset, "rank": rank, "learning_rate": lr, "learning_rate_1d": lr_1d, "optimizer": a["optimizer"],
            "seed": seed, "batch_size": batch_size, "prior_weight": prior_weight, "resolution": resolution,
            "train_text_encoder": te is not None, "prompt": prompt if route != "cutmix" else "",
            "class_prompt": class_prompt if route != "cutmix" else "", "target": target,
        }
        if cutmix_meta is not None:
            settings["cutmix"] = cutmix_meta
        if capture is not None:
            settings.update({"unmix_weight": unmix_weight, "attention_reg_weight": reg_weight,
                             "attention_threshold": threshold,
                             "attention_resolutions": sorted(att_res) if att_res else "all"})
        resume = a.get("resume_from") or NONE
        if resume != NONE:
            try:
                rpath = folder_paths.get_full_path_or_raise("svdiff", resume)
            except Exception:
                raise err("resume_from", f"file {resume!r} not found in models/svdiff") from None
            spath = training.state_path_for(rpath)
            if os.path.isfile(spath):
                try:
                    start_step, deltas, opt_tensors, saved = training.load_training_state(spath)
                except Exception as e:
                    raise err("resume_from", f"training state {os.path.basename(spath)} is unusable: {e}") from None
                diff = training.settings_mismatch(saved, settings, ["subset", "rank", "optimizer", "seed", "batch_size", "train_text_encoder",
                                                                     "cutmix", "unmix_weight", "attention_reg_weight"])
                if diff:
                    notes.append(f"resume_from: settings differ from the saved run ({', '.join(diff)}); resuming anyway, the result will not match an uninterrupted run")
            else:
                sh = read_shift_file(NODE, rpath)
                deltas = {k: sh.deltas[k].float() for k in sh.deltas}
                notes.append(f"resume_from: {resume} has no training state beside it; starting from its delta with a fresh optimizer at step 0")
            missing = [k for k in all_params if k not in deltas]
            extra = [k for k in deltas if k not in all_params]
            if extra:
                notes.append(f"resume_from: {len(extra)} weights of the file are not trained with this subset/setting and were dropped")
            with torch.no_grad():
                for k, p in all_params.items():
                    if k in deltas:
                        d = deltas[k].float()
                        if d.shape != p.shape:
                            full = torch.zeros_like(p)
                            n_ = min(d.shape[0], p.shape[0])
                            full[:n_] = d[:n_].to(full.device)
                            d = full
                        p.copy_(d.to(p.device))
            if missing and len(missing) == len(all_params):
                raise err("resume_from", f"{resume} shares no weight with the subset {subset}")

        optimizer = training.make_optimizer(a["optimizer"], unet.spectral_params() + (te.spectral_params() if te else []),
                                            unet.vector_params() + (te.vector_params() if te else []), lr, lr_1d)
        if opt_tensors:
            training.restore_optimizer(optimizer, all_params, opt_tensors)

        metadata_base = {
            "architecture": architecture_of(model), "subset": subset, "rank": rank,
            "base_fingerprint": combined_fingerprint(unet.fps),
            "trigger_words": (" ".join(s_.token for s_ in training_set.subjects) if route == "cutmix"
                              else " ".join(special_tokens(prompt, class_prompt)) if prompt else ""),
        }
        if te is not None:
            metadata_base["clip_fingerprint"] = combined_fingerprint(te.fps)

        def current_shift(step_done: int) -> SpectralShift:
            deltas = {k: p.detach().float().cpu().clone() for k, p in all_params.items()}
            shapes = dict(unet.shapes)
            if te is not None:
                shapes.update(te.shapes)
            meta = dict(metadata_base)
            meta["training"] = dict(settings, steps=step_done, routes=unet.routes(), lr_schedule="constant")
            sh = SpectralShift(deltas, shapes, meta)
            sh.add_history("train", steps=step_done, subset=subset, rank=rank)
            return sh

        loss_map = {"loss": []}
        save_every = int(a.get("save_every", 0) or 0)
        prefix = a.get("filename_prefix") or "svdiff/train"
        saved_paths = []

        def save(step_done: int):
            sh = current_shift(step_done)
            path = save_shift_numbered(NODE, sh, prefix)
            training.save_training_state(training.state_path_for(path), step_done, all_params, optimizer, settings)
            saved_paths.append(path)
            log.info("[%s] saved %s at step %d", NODE, os.path.basename(path), step_done)

        cutmix_kw: dict = {}

        def attention_terms(maps: dict, shapes: dict, inst_samples, bi: int, step: int):
            """unmix_weight * Sec. 3.3 unmix loss (mixed instance samples) + attention_reg_weight * Eq. 10
            (single-subject instance samples), on this step's captured cross-attention maps."""
            if not maps:
                raise err("attention_resolutions", f"no cross-attention map of side {sorted(att_res or [])} at resolution "
                                                   f"{resolution}; this model's maps here have sides {sorted(capture.seen)} (or use 'all')")
            total = 0.0
            if unmix_weight > 0:
                mixed = [j for j, s_ in enumerate(inst_samples) if s_.mixed]
                lu = None
                if mixed:
                    ms_ = [inst_samples[j] for j in mixed]
                    ids = [[cutmix.positions_or_fail(s_.prompt, w, "the token") for w in s_.words] for s_ in ms_]
                    lu = attn.unmix_loss(select_maps(maps, mixed), ids, stack_masks(ms_).to(device), shapes)
                    total = total + unmix_weight * lu
                loss_map.setdefault("unmix", []).append(float(lu.detach()) if lu is not None else 0.0)
            if reg_weight > 0:
                if route == "cutmix":
                    single = [j for j, s_ in enumerate(inst_samples) if not s_.mixed]
                    sp = [cutmix.positions_or_fail(inst_samples[j].prompt, inst_samples[j].tokens[0], "the token") for j in single]
                    cp = [cutmix.positions_or_fail(inst_samples[j].prompt, inst_samples[j].class_words[0], "the class word")
                          for j in single]
                else:
                    single = list(range(bi))
                    sp, cp = [single_pos[0]] * bi, [single_pos[1]] * bi
                lr_ = None
                if single:
                    lr_ = attn.attention_reg_loss(select_maps(maps, single), sp, cp, threshold)
                    total = total + reg_weight * lr_
                loss_map.setdefault("attention_reg", []).append(float(lr_.detach()) if lr_ is not None else 0.0)
            return total

        # --- the loop ---
        ms = mp.get_model_object("model_sampling")
        num_t = len(ms.sigmas)
        topts = mp.model_options.get("transformer_options", {})
        n_inst = inst_latents.shape[0]
        n_prior = prior_latents.shape[0] if prior_latents is not None else 0
        pbar = progress(max(1, steps))
        t0 = time.perf_counter()
        try:
            if steps > 0:
                mm.load_models_gpu([mp], memory_required=0, force_full_load=True)
                inst_latents_d = inst_latents.to(device)
                prior_latents_d = prior_latents.to(device) if prior_latents is not None else None
                sigmas_all = ms.sigmas.detach().clone().to(device)
                static_inst_kw = None
                if te is None:
                    static_inst_kw = [model_kwargs(mp, e, inst_latents_d[:1]) for e in inst_entries]
                    static_prior_kw = model_kwargs(mp, prior_entry, inst_latents_d[:1]) if prior_entry is not None else None
                    tok_inst = tok_prior = None
                else:
                    tok_inst = [clip_t.tokenize(prompt)] if route == "images" else None
                    tok_prior = clip_t.tokenize(class_prompt) if prior_entry is not None and class_prompt.strip() else None
                with torch.enable_grad():
                    for i in range(steps):
                        check_interrupt()
                        step = start_step + i
                        inst_samples = None
                        if route == "cutmix":
                            inst_samples = cutmix.samples(step)
                            all_samples = inst_samples + (cutmix.samples(step, prior=True) if prior_weight > 0 else [])
                            grown = cutmix.encoded + len(cutmix._cond)
                            x0 = torch.cat([cutmix.latent(s_) for s_ in all_samples], 0).to(device)
                            prompts = [s_.prompt for s_ in all_samples]
                            if te is not None:
                                enc = {p_: encode_prompt(clip_t, p_, grad=True) for p_ in dict.fromkeys(prompts)}
                                mm.load_models_gpu([mp], force_full_load=True)
                                kwp = {p_: model_kwargs(mp, e_, x0[:1]) for p_, e_ in enc.items()}
                            else:
                                for p_ in dict.fromkeys(prompts):
                                    if p_ not in cutmix_kw:
                                        cutmix_kw[p_] = model_kwargs(mp, check_clip(cutmix.cond(p_)), x0[:1])
                                if cutmix.encoded + len(cutmix._cond) != grown:
                                    mm.load_models_gpu([mp], force_full_load=True)  # the VAE/CLIP may have displaced it
                                kwp = cutmix_kw
                            kw_parts = [kwp[p_] for p_ in prompts]
                            bi = len(inst_samples)
                        else:
                            idx = training.data_indices(seed, step, batch_size, n_inst)
                            x0_parts = [inst_latents_d[idx]]
                            if te is not None:
                                entry = encode_prompt(clip_t, prompt, grad=True)
                                if prior_weight > 0:
                                    pe = encode_prompt(clip_t, class_prompt, grad=True) if tok_prior is not None else prior_entry
                                mm.load_models_gpu([mp], force_full_load=True)
                                kw_inst = [model_kwargs(mp, entry, inst_latents_d[:1])] * len(idx)
                                kw_prior_one = model_kwargs(mp, pe, inst_latents_d[:1]) if prior_weight > 0 else None
                            else:
                                kw_inst = [static_inst_kw[inst_cond_idx[j]] for j in idx]
                                kw_prior_one = static_prior_kw
                            kw_parts = list(kw_inst)
                            if prior_weight > 0:
                                pidx = training.data_indices(seed, step, batch_size, n_prior, training.STREAM_PRIOR_DATA)
                                x0_parts.append(prior_latents_d[pidx])
                                kw_parts += [kw_prior_one] * len(pidx)
                            x0 = torch.cat(x0_parts, 0)
                            bi = len(idx)
                        g = training.generator(seed, step, training.STREAM_NOISE)
                        noise = torch.randn(x0.shape, generator=g).to(device)
                        tidx = training.timestep_draw(g, x0.shape[0], num_t).to(device)
                        sigma = sigmas_all[tidx].float()
                        kwargs = concat_kwargs(kw_parts)
                        map_parts = []
                        if capture is not None:
                            capture.clear()
                        if kwargs is not None:
                            x0p = denoise_x0(mp, x0, noise, sigma, kwargs, topts)
                            if capture is not None:
                                map_parts.append(capture.maps())
                        else:
                            outs = []
                            for j in range(x0.shape[0]):
                                outs.append(denoise_x0(mp, x0[j:j + 1], noise[j:j + 1], sigma[j:j + 1], kw_parts[j], topts))
                                if capture is not None:
                                    map_parts.append(capture.maps())
                                    capture.clear()
                            x0p = torch.cat(outs, 0)
                        e2 = losses.target_error(x0p.float(), x0.float(), sigma, target, sigma_data).pow(2)
                        inst_loss = e2[:bi].mean()
                        prior_loss = e2[bi:].mean() if prior_weight > 0 else None
                        loss = losses.svdiff_loss(inst_loss, prior_loss, prior_weight)
                        if capture is not None:
                            loss_map.setdefault("denoise", []).append(float(loss.detach()))
                            loss = loss + attention_terms(concat_maps(map_parts), capture.shapes(), inst_samples, bi, step)
                        if not torch.isfinite(loss):
                            raise err("learning_rate", f"the loss became {float(loss)} at step {step + 1}; lower the learning rate or use fp32")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        lv = float(loss.detach())
                        loss_map["loss"].append(lv)
                        pbar.update_absolute(i + 1, steps)
                        if (i + 1) % 10 == 0 or i == 0 or i + 1 == steps:
                            log.info("[%s] step %d/%d loss %.5f (%.2f s/step)", NODE, step + 1, start_step + steps, lv,
                                     (time.perf_counter() - t0) / (i + 1))
                        if save_every > 0 and ((step + 1) % save_every == 0 or i + 1 == steps):
                            save(step + 1)
        finally:
            _unload(mp)
            if clip_t is not None:
                _unload(clip_t.patcher)
        done = start_step + steps
        shift = current_shift(done)
        shift.metadata["training"]["seconds"] = round(time.perf_counter() - t0, 3)
        out_model, out_clip = apply_shift(NODE, model, clip, _without_fp(shift), 1.0, 1.0, "the trained shift")
        if capture is not None:
            capture.clear()
        report = {"notes": notes, "routes": unet.routes(), "saved": saved_paths, "steps": done, "missing": unet.missing,
                  "cutmix": cutmix, "attention_capture": capture is not None,
                  "instance_latents": inst_latents.cpu(), "instance_entry": inst_entries[0],
                  "prior_latents": prior_latents.cpu() if prior_latents is not None else None, "prior_entry": prior_entry}
        return out_model, out_clip, shift, loss_map, done, report


def _without_fp(shift: SpectralShift) -> SpectralShift:
    """The shift as applied right here: the base is the one it was trained on, skip the fingerprint check."""
    s = SpectralShift(shift.deltas, shift.shapes, {k: v for k, v in shift.metadata.items() if k != "base_fingerprint"})
    return s


def training_dtype(name: str, device) -> torch.dtype:
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type == "cpu":
            raise err("training_dtype", "fp16 training is not supported on the CPU; use fp32 or bf16")
        return torch.float16
    if device.type != "cpu" and mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------------------
def _first(v, default=None):
    if isinstance(v, list):
        return v[0] if v else default
    return default if v is None else v


class SVDiffTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffTrain",
            display_name="SVDiff Train",
            category=CATEGORY,
            description="Fine-tune only the singular values of the weights (SVDiff, Eq. 2-3): DreamBooth-style training "
                        "with prior preservation inside the graph. Outputs the patched MODEL/CLIP and the SPECTRAL_SHIFT.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base diffusion model. It is never modified: training runs on a clone."),
                io.Vae.Input("vae", optional=True, tooltip="VAE used to encode the subject images (and prior images)."),
                io.Image.Input("images", optional=True, tooltip="The 3-5 subject photos (any sizes: each is resized on the shorter side and centre-cropped to resolution)."),
                io.String.Input("prompt", default="photo of a sks dog", multiline=True,
                                tooltip="Instance prompt with a rare identifier, e.g. 'photo of a sks dog' (for single-image editing: a plain description)."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder of the same checkpoint: encodes the prompts; trained too when train_text_encoder is on."),
                io.Boolean.Input("train_text_encoder", default=False, tooltip="Also train spectral shifts of the text encoder's layers (needs clip and images)."),
                io.Latent.Input("latents", optional=True, tooltip="Pre-encoded training latents (list from Make/Load Training Dataset) instead of images."),
                io.Conditioning.Input("positive", optional=True, tooltip="Conditioning for the latents route (one, or one per latent)."),
                io.Conditioning.Input("prior_conditioning", optional=True, tooltip="Class conditioning for prior preservation when no CLIP is connected (latents route)."),
                io.String.Input("class_prompt", default="photo of a dog", multiline=True, tooltip="Class prompt for prior preservation, e.g. 'photo of a dog'."),
                io.Image.Input("prior_images", optional=True, tooltip="Class images for prior preservation. When absent (and prior_weight > 0) they are generated with the base model and cached."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="lambda of Eq. 3: weight of the prior-preservation loss. 0 turns it off (single-image editing)."),
                io.Int.Input("num_prior_images", default=8, min=1, max=1000, tooltip="How many class images to generate when prior_images is not connected."),
                io.Int.Input("prior_steps", default=20, min=1, max=200, tooltip="Sampling steps (euler) used to generate prior images."),
                io.Combo.Input("subset", options=SUBSET_NAMES, default="UNet", tooltip="Which weights get spectral shifts (Table 1 of the paper)."),
                io.Int.Input("rank", default=0, min=0, max=4096, tooltip="0 = shift all singular values; r > 0 = only the r largest (appendix E.1)."),
                io.Int.Input("steps", default=500, min=0, max=100000, tooltip="Training steps to run now (added to the resumed step count). 0 = no training: outputs the resumed (or a zero) shift."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Instance images per step (as many prior images are added when prior_weight > 0)."),
                io.Float.Input("learning_rate", default=0.001, min=0.0, max=1.0, step=0.00001, tooltip="Learning rate of the spectral shifts (paper: 1e-3)."),
                io.Float.Input("learning_rate_1d", default=0.000001, min=0.0, max=1.0, step=0.000001, tooltip="Learning rate of the additive shifts of 1-D weights (norm scales; paper: 1e-6). 0 freezes them."),
                io.Combo.Input("optimizer", options=list(training.OPTIMIZERS), default="AdamW", tooltip="Optimizer for the shifts."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the noise, timesteps, data order and generated prior images (same seed, same result on the CPU)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64, tooltip="Training resolution in pixels (a multiple of 64)."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute activations in the backward pass: less memory, about a third slower."),
                io.Combo.Input("training_dtype", options=["auto", "fp32", "bf16", "fp16"], default="auto", tooltip="Compute precision: auto = bf16 on GPUs that support it, fp32 on the CPU. delta is always kept in fp32."),
                io.Combo.Input("side_path", options=["auto", "side", "recompose"], default="auto", tooltip="How a shifted layer is computed: auto picks per layer the cheaper of the side path U(Delta*(V^T x)) and recomposing W + U diag(Delta) V^T."),
                io.Int.Input("save_every", default=0, min=0, max=100000, tooltip="Save the shift (and a resumable training state beside it) every N steps and at the end; 0 = never."),
                io.String.Input("filename_prefix", default="svdiff/train", tooltip="File name prefix for saves inside models/svdiff (a number is appended)."),
                io.Combo.Input("resume_from", options=[NONE] + shift_files(), default=NONE, tooltip="Continue training from a shift file in models/svdiff (exactly, when its training state is beside it)."),
                TrainingSetType.Input("training_set", optional=True, tooltip="Multi-subject training set from the Cut-Mix Builder, used instead of images + prompt: each step draws a cut-mixed pair of subjects with the set's probability, else one subject (prior samples likewise). Not available with latents + positive."),
                io.Float.Input("unmix_weight", optional=True, default=0.0, min=0.0, max=1000.0, step=0.01, tooltip="Weight of the 'unmix' cross-attention regularisation (Sec. 3.3, needs a training_set): penalises each subject token's attention on the other subject's region of a cut-mixed image. 0 = off (no attention capture, no cost)."),
                io.Float.Input("attention_reg_weight", optional=True, default=0.0, min=0.0, max=1000.0, step=0.01, tooltip="Weight of the cross-attention regularisation of appendix D.1 (Eq. 10) on single-subject samples: the special token may not attend outside the class word's attention mask. 0 = off (no cost)."),
                io.Float.Input("attention_threshold", optional=True, default=0.5, min=0.0, max=0.99, step=0.01, tooltip="Eq. 10: the class word's attention map, divided by its maximum, above this value is the subject mask M."),
                io.String.Input("attention_resolutions", optional=True, default="all", tooltip="Which cross-attention maps the attention losses use, by side length of the map: 'all', or e.g. '16' or '8, 16' (SD1.5 at 512 px has 64, 32, 16 and 8)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model patched with the trained shift."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP, patched when the text encoder was trained."),
                SpectralShiftType.Output(display_name="SPECTRAL_SHIFT", tooltip="The trained spectral shift."),
                LossMapType.Output(display_name="LOSS_MAP", tooltip="Per-step training loss (for Plot Loss Graph)."),
                io.Int.Output(display_name="steps", tooltip="Total steps trained (including resumed ones)."),
            ],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        list_inputs = {"images", "latents", "positive", "prior_images", "prior_conditioning"}
        a = {}
        for k, v in kwargs.items():
            if k in list_inputs:
                a[k] = v if isinstance(v, list) else [v]
            else:
                a[k] = _first(v)
        if a.get("prior_conditioning"):
            a["prior_conditioning"] = a["prior_conditioning"][0]
        m, c, shift, loss_map, done, report = train(a)
        text = f"trained {done} steps; routes {report['routes']}"
        if report["notes"]:
            text += "\n" + "\n".join(report["notes"])
        return io.NodeOutput(m, c, shift, loss_map, done, ui=ui.PreviewText(text))


NODES = [SVDiffTrain]
