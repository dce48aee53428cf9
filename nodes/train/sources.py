"""Where SVDiff Train's batches come from: one data source per route behind ``batch(step)``.

Routes: ``images`` (subject images + VAE + CLIP + instance prompt), ``latents`` (pre-encoded
latents + a conditioning each, e.g. from ComfyUI's Make Training Dataset) and ``cutmix`` (a
Cut-Mix-Unmix training set from the Cut-Mix Builder).  The instance data and the prior data
(Eq. 3's class images, given or generated) are prepared once; every step then draws its
samples as a deterministic function of (seed, step), so a resumed run draws the same data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

import comfy.model_management as mm

from ...svdiff import training
from ...svdiff.cutmix import single_prompt
from ..attention_capture import token_positions
from .attention import single_subject_words
from .data import (CutMixData, _clone_cond, _split_images, cutmix_settings, encode_images, encode_prompt, generate_priors,
                   model_kwargs, prepare_bucketed, prepare_images, special_tokens, with_generated_priors)
from .settings import PRIOR_CFG, err


class Batch(NamedTuple):
    """One step's data: clean latents ``x0`` (instance samples first), apply_model keyword
    arguments per sample, how many samples are instance samples, and the Cut-Mix instance
    samples (None on the other routes)."""

    x0: torch.Tensor
    kw_parts: list
    n_instance: int
    samples: Optional[list]
    cond_ids: Optional[list] = None  # images/latents routes: the conditioning index of each instance sample


@dataclass
class InstanceData:
    route: str                 # "images", "latents" or "cutmix"
    latents: torch.Tensor      # model-space latents (the first Cut-Mix sample's on that route)
    entries: list              # conditioning entries [tensor, options]
    cond_idx: list             # entry index of every latent
    cutmix: Optional[CutMixData] = None
    train_te: bool = False
    prompts: Optional[list] = None   # images route: the text of each entry (the prompt, or one caption per image)
    buckets: Optional[list] = None   # aspect buckets of different sizes: [(latents [n_b, C, h, w], image indices)]


class ClipCheck:
    """Refuses a conditioning whose width is not the MODEL's context width (a foreign CLIP)."""

    def __init__(self, model):
        cfg = getattr(model.model, "model_config", None)
        self.width = (cfg and cfg.unet_config.get("context_dim")) or None

    def __call__(self, entry, field: str = "clip"):
        if self.width is not None and entry[0].shape[-1] != self.width:
            raise err(field, f"this CLIP gives {entry[0].shape[-1]}-wide embeddings but the MODEL expects {self.width}: "
                             "connect the CLIP of the same checkpoint")
        return entry


# ---------------------------------------------------------------------------------------
# Instance data
# ---------------------------------------------------------------------------------------
def _cutmix_instances(inputs: dict, s, check_clip, notes: list, images: list) -> InstanceData:
    ts, clip, vae, model = inputs["training_set"], inputs.get("clip"), inputs.get("vae"), inputs["model"]
    if inputs.get("latents"):
        raise err("training_set", "Cut-Mix is unavailable with pre-encoded latents + positive (the images must be "
                                  "cut and mixed before encoding, and each prompt is written per sample): "
                                  "disconnect latents/positive, or the training_set")
    if clip is None:
        raise err("clip", "a CLIP is needed to encode the prompts of the Cut-Mix training set")
    if vae is None:
        raise err("vae", "a VAE is needed to encode the images of the Cut-Mix training set")
    if images:
        notes.append("images: ignored because a training_set is connected (its subjects are the training images)")
    if ts.resolution != s.resolution:
        notes.append(f"training_set: built at {ts.resolution} px, resized to the training resolution "
                     f"{s.resolution}; give the Cut-Mix Builder the same resolution to avoid resampling twice")
    cutmix = CutMixData(ts, model, vae, clip, s.resolution, s.batch_size)
    first = cutmix.samples(0)[0]
    latents = cutmix.latent(first)  # shape and a first check of the VAE
    return InstanceData("cutmix", latents, [check_clip(cutmix.cond(first.prompt))], [0], cutmix, s.train_text_encoder)


def parse_captions(text: str, n_images: int, s) -> Optional[list]:
    """One caption per image from a multiline text (None when it is empty).

    Each caption must carry the instance prompt's special token(s) (the words the class prompt
    lacks, e.g. 'sks'), so that the captions teach the same identifier.
    """
    if not (text or "").strip():
        return None
    lines = [ln.strip() for ln in str(text).strip("\n").split("\n")]
    if len(lines) != n_images:
        raise err("captions", f"{len(lines)} caption lines for {n_images} images; give one line per image, in the images' order")
    specials = special_tokens(s.prompt, s.class_prompt)
    for i, c in enumerate(lines):
        if not c:
            raise err("captions", f"line {i + 1} is empty; every image needs its caption")
        words = set(special_tokens(c, ""))
        missing = [w for w in specials if w not in words]
        if missing:
            raise err("captions", f"line {i + 1} ({c!r}) lacks the instance token {' '.join(missing)!r} of the prompt {s.prompt!r}")
    return lines


def _image_instances(inputs: dict, s, check_clip, notes: list, images: list) -> InstanceData:
    clip = inputs.get("clip")
    if clip is None:
        raise err("clip", "a CLIP is needed to encode the prompt of the images (or use latents + positive)")
    if not s.prompt.strip():
        raise err("prompt", "the instance prompt is empty")
    captions = parse_captions(s.captions, len(images), s)
    latents, groups = _image_latents(inputs.get("vae"), images, s, notes)
    prompts = captions or [s.prompt]
    entries = [check_clip(_clone_cond(encode_prompt(clip, p))) for p in prompts]
    cond_idx = list(range(len(prompts))) if captions else [0] * len(images)
    return InstanceData("images", latents, entries, cond_idx, None, s.train_text_encoder, prompts, groups)


def _image_latents(vae, images: list, s, notes: list) -> tuple:
    """(latents [n, C, h, w], None) when every image has the same size after fitting, else
    (the first bucket's latents, [(latents, image indices)] per bucket)."""
    if s.image_fit == "centre-crop":
        return encode_images(vae, prepare_images([im.clone() for im in images], s.resolution, "images", notes), "images"), None
    pixels = prepare_bucketed([im.clone() for im in images], s.resolution, "images")
    lats = [encode_images(vae, p, "images") for p in pixels]
    sizes = list(dict.fromkeys(tuple(t.shape[-2:]) for t in lats))
    if len(sizes) == 1:
        return torch.cat(lats, 0), None
    groups = [(torch.cat([t for t in lats if tuple(t.shape[-2:]) == hw], 0),
               [i for i, t in enumerate(lats) if tuple(t.shape[-2:]) == hw]) for hw in sizes]
    notes.append("images: aspect buckets " + ", ".join(f"{hw[1] * 8}x{hw[0] * 8} ({len(g[1])})" for hw, g in zip(sizes, groups))
                 + "; each step draws from one bucket")
    return groups[0][0], groups


def _flat_conditioning(positive_in: list) -> list:
    flat = []
    for c in positive_in:
        flat.extend(c if isinstance(c, list) and c and isinstance(c[0], (list, tuple)) else [c])
    return flat


def _latent_instances(inputs: dict, s, check_clip, notes: list, train_te: bool) -> InstanceData:
    lats = []
    for d in inputs.get("latents") or []:
        t = d["samples"] if isinstance(d, dict) else d
        lats.extend([t[i : i + 1].clone().float() for i in range(t.shape[0])])
    sizes = list(dict.fromkeys(tuple(t.shape[1:]) for t in lats))
    if len({sz[0] for sz in sizes}) != 1:
        raise err("latents", f"latents with {sorted({sz[0] for sz in sizes})} channels; they must come from one VAE")
    groups = None
    if len(sizes) > 1:  # like aspect buckets: each step draws from one size
        groups = [(torch.cat([t for t in lats if tuple(t.shape[1:]) == sz], 0),
                   [i for i, t in enumerate(lats) if tuple(t.shape[1:]) == sz]) for sz in sizes]
        notes.append("latents: " + ", ".join(f"{len(g[1])} of {sz[2] * 8}x{sz[1] * 8}" for sz, g in zip(sizes, groups))
                     + "; each step draws from one size")
    latents = groups[0][0] if groups else torch.cat(lats, 0)
    flat = _flat_conditioning(inputs.get("positive") or [])
    if not flat:
        raise err("positive", "the latents route needs the positive CONDITIONING list (from Make/Load Training Dataset)")
    entries = [check_clip(_clone_cond(e), "positive") for e in flat]
    if len(entries) == 1:
        cond_idx = [0] * len(lats)
    elif len(entries) == len(lats):
        cond_idx = list(range(len(entries)))
    else:
        raise err("positive", f"{len(entries)} conditionings for {len(lats)} latents; give one or one per latent")
    if train_te:
        notes.append("train_text_encoder: not possible with pre-encoded latents + positive; only the UNet is trained")
    return InstanceData("latents", latents, entries, cond_idx, None, False, None, groups)


def instance_data(inputs: dict, s, check_clip, notes: list) -> InstanceData:
    """The instance samples of the route the connected inputs choose (Cut-Mix set, images, latents)."""
    images = _split_images(inputs.get("images"))
    latents_in = inputs.get("latents") or []
    train_te = s.train_text_encoder and inputs.get("clip") is not None
    s_te = dataclasses.replace(s, train_text_encoder=train_te)
    if inputs.get("training_set") is not None:
        d = _cutmix_instances(inputs, s_te, check_clip, notes, images)
    elif images:
        d = _image_instances(inputs, s_te, check_clip, notes, images)
    elif latents_in:
        d = _latent_instances(inputs, s_te, check_clip, notes, train_te)
    else:
        raise err("images", "no training images: connect images (with vae and clip) or latents + positive")
    if images and latents_in and d.route == "images":
        notes.append("latents: ignored because images are connected")
    if d.route != "cutmix":
        process_in = inputs["model"].model.process_latent_in
        d.latents = process_in(d.latents)
        if d.buckets:
            d.buckets = [(process_in(t), idx) for t, idx in d.buckets]
    return d


def _eq10_positions(clip, text: str, specials: list, class_word: str, field: str, seq_len: int) -> tuple:
    sp = sorted({p for w in specials for p in token_positions(clip, text, w, seq_len)})
    cp = token_positions(clip, text, class_word, seq_len)
    if not sp:
        raise err(field, f"the special token(s) {specials} are not found by the CLIP tokenizer in {text!r}")
    if not cp:
        raise err("class_prompt" if field == "prompt" else field,
                  f"the class word {class_word!r} is not found by the CLIP tokenizer in {text!r}")
    return sp, cp


def attention_positions(inputs: dict, s, d: InstanceData, notes: list):
    """Check that the attention losses have what they need; for Eq. 10 on the images route the
    (special-token, class-word) token positions of each instance prompt (the prompt, or each
    caption), else None."""
    clip, ts = inputs.get("clip"), inputs.get("training_set")
    if s.unmix_weight > 0 and d.route != "cutmix":
        raise err("unmix_weight", "the unmix regularisation needs a Cut-Mix training_set (two or more subjects in one "
                                  "image); connect one, or set unmix_weight to 0")
    if s.attention_reg_weight > 0 and d.route == "latents":
        raise err("attention_reg_weight", "Eq. 10 needs the prompt text to find the special and class tokens, which "
                                          "pre-encoded latents + positive lack; use images (or a training_set), or set it to 0")
    single_pos = None
    if s.attention_reg_weight > 0 and d.route == "images":
        specials, class_word = single_subject_words(s.prompt, s.class_prompt)
        single_pos = [_eq10_positions(clip, p, specials, class_word, "prompt" if p == s.prompt else "captions",
                                      int(e[0].shape[1])) for p, e in zip(d.prompts, d.entries)]
    if d.route == "cutmix" and s.attention:
        for i, subj in enumerate(ts.subjects):
            p = single_prompt(subj)
            d.cutmix.positions_or_fail(p, subj.token, f"subject {i + 1}'s token")
            if s.attention_reg_weight > 0:
                d.cutmix.positions_or_fail(p, subj.class_word, f"subject {i + 1}'s class word")
        if s.unmix_weight > 0 and ts.config.probability == 0:
            notes.append("unmix_weight: the training set never mixes two subjects (probability 0), so the unmix term is never used")
    return single_pos


# ---------------------------------------------------------------------------------------
# Prior data (Eq. 3)
# ---------------------------------------------------------------------------------------
@dataclass
class PriorData:
    latents: Optional[torch.Tensor] = None   # model-space class latents (images / latents routes)
    entry: Optional[list] = None             # their conditioning
    cutmix_meta: Optional[dict] = None       # the Cut-Mix settings recorded in the shift


def _cutmix_priors(inputs: dict, s, d: InstanceData, check_clip, notes: list) -> PriorData:
    ts = inputs["training_set"]
    if s.prior_weight <= 0:
        return PriorData(cutmix_meta=cutmix_settings(ts, {}))
    if _split_images(inputs.get("prior_images")):
        notes.append("prior_images: ignored because a training_set is connected (give each subject's prior images to the Cut-Mix Builder)")
    if s.num_prior_images < 1:
        raise err("num_prior_images", "must be >= 1 when prior_weight > 0 and a subject has no prior images")
    ts2, generated = with_generated_priors(ts, inputs["model"], inputs.get("vae"), inputs.get("clip"), s.resolution,
                                           s.num_prior_images, s.seed, s.prior_steps, PRIOR_CFG, check_clip)
    if generated:
        notes.append(f"prior_weight: generated {s.num_prior_images} prior images for subject(s) "
                     f"{', '.join(str(i + 1) for i in sorted(generated))} from their class prompts")
    d.cutmix.ts = ts2
    return PriorData(cutmix_meta=cutmix_settings(ts2, generated))


def _prior_entry(inputs: dict, s, check_clip):
    clip = inputs.get("clip")
    if clip is not None and s.class_prompt.strip():
        return check_clip(_clone_cond(encode_prompt(clip, s.class_prompt)))
    if inputs.get("prior_conditioning"):
        pc = inputs["prior_conditioning"]
        return check_clip(_clone_cond(pc[0] if isinstance(pc[0], (list, tuple)) else pc), "prior_conditioning")
    raise err("class_prompt", "prior preservation (prior_weight > 0) needs a class prompt with a CLIP, or prior_conditioning")


def _prior_latents_raw(inputs: dict, s, entry, notes: list) -> torch.Tensor:
    clip, model = inputs.get("clip"), inputs["model"]
    pimgs = _split_images(inputs.get("prior_images"))
    if pimgs:
        ppix = prepare_images([im.clone() for im in pimgs], s.resolution, "prior_images", notes)
        return encode_images(inputs.get("vae"), ppix, "prior_images")
    if s.num_prior_images < 1:
        raise err("num_prior_images", "must be >= 1 when prior_weight > 0 and no prior_images are connected")
    neg = _clone_cond(encode_prompt(clip, "")) if clip is not None else [torch.zeros_like(entry[0]), {}]
    return generate_priors(model, entry, neg, s.num_prior_images, s.resolution, s.seed, s.prior_steps, PRIOR_CFG,
                           (s.class_prompt, bool(clip is not None)))


def prior_data(inputs: dict, s, d: InstanceData, check_clip, notes: list) -> PriorData:
    """Eq. 3's prior samples: per subject from the Cut-Mix set, else the class prompt's
    conditioning with given prior images or ones generated by the base model (cached)."""
    if d.route == "cutmix":
        return _cutmix_priors(inputs, s, d, check_clip, notes)
    if s.prior_weight <= 0:
        return PriorData()
    entry = _prior_entry(inputs, s, check_clip)
    if d.route == "images" and not special_tokens(s.prompt, s.class_prompt):
        notes.append(f"prompt: {s.prompt!r} has no word that the class prompt lacks (no rare identifier such as 'sks'); "
                     "training anyway (editing prompts have none on purpose)")
    latents = inputs["model"].model.process_latent_in(_prior_latents_raw(inputs, s, entry, notes).float())
    if latents.shape[1] != d.latents.shape[1] or (latents.shape[1:] != d.latents.shape[1:] and s.image_fit == "centre-crop"):
        raise err("prior_images", f"prior latents are {list(latents.shape[1:])} but the instance latents are {list(d.latents.shape[1:])}")
    return PriorData(latents, entry)


# ---------------------------------------------------------------------------------------
# Per-step batches
# ---------------------------------------------------------------------------------------
class LatentSource:
    """images and latents routes: instance latents drawn by seeded permutation, as many prior
    latents beside them; conditionings precomputed, or encoded every step with gradients when
    the text encoder trains."""

    def __init__(self, run, d: InstanceData, prior: PriorData, s):
        self.run, self.s, self.d = run, s, d
        self.inst = d.latents.to(run.device)
        self.prior = prior.latents.to(run.device) if prior.latents is not None else None
        self.prior_entry = prior.entry
        self.n_inst = len(d.cond_idx)
        self.n_prior = prior.latents.shape[0] if prior.latents is not None else 0
        self.static_inst = self.static_prior = None
        if run.te is None:
            self.static_inst = [model_kwargs(run.mp, e, self.inst[:1]) for e in d.entries]
            self.static_prior = model_kwargs(run.mp, prior.entry, self.inst[:1]) if prior.entry is not None else None
        self.encode_prior = prior.entry is not None and bool(s.class_prompt.strip())
        self.buckets = [(t.to(run.device), idx) for t, idx in d.buckets] if d.buckets else None
        self.bucket_of = {i: b for b, (_, idx) in enumerate(d.buckets or []) for i in idx}

    def _instances(self, step: int) -> tuple:
        """(instance latents, their image indices) of ``step``: a seeded permutation of the images,
        or, with aspect buckets of several sizes, the bucket of the step's first draw and a
        seeded permutation of its images."""
        s = self.s
        if self.buckets is None:
            idx = training.data_indices(s.seed, step, s.batch_size, self.n_inst)
            return self.inst[idx], idx
        first = training.data_indices(s.seed, step, 1, self.n_inst, training.STREAM_BUCKET)[0]
        b = self.bucket_of[first]
        lat, members = self.buckets[b]
        k = training.data_indices(s.seed, step, s.batch_size, len(members), training.STREAM_BUCKET + 1 + b)
        return lat[k], [members[j] for j in k]

    def _conditions(self, idx: list) -> tuple:
        run, s = self.run, self.s
        if run.te is None:
            return [self.static_inst[self.d.cond_idx[j]] for j in idx], self.static_prior
        prompts = [self.d.prompts[self.d.cond_idx[j]] for j in idx]
        enc = {p: encode_prompt(run.clip_t, p, grad=True) for p in dict.fromkeys(prompts)}
        pe = None
        if s.prior_weight > 0:
            pe = encode_prompt(run.clip_t, s.class_prompt, grad=True) if self.encode_prior else self.prior_entry
        mm.load_models_gpu([run.mp], force_full_load=True)
        kw = {p: model_kwargs(run.mp, e, self.inst[:1]) for p, e in enc.items()}
        kw_prior = model_kwargs(run.mp, pe, self.inst[:1]) if s.prior_weight > 0 else None
        return [kw[p] for p in prompts], kw_prior

    def batch(self, step: int) -> Batch:
        """x0 is one tensor, or (instance, prior) latents when an aspect bucket is not the priors' square."""
        s = self.s
        x_inst, idx = self._instances(step)
        x0_parts = [x_inst]
        kw_inst, kw_prior = self._conditions(idx)
        kw_parts = list(kw_inst)
        if s.prior_weight > 0:
            pidx = training.data_indices(s.seed, step, s.batch_size, self.n_prior, training.STREAM_PRIOR_DATA)
            x0_parts.append(self.prior[pidx])
            kw_parts += [kw_prior] * len(pidx)
        sizes = {tuple(x.shape[-2:]) for x in x0_parts}
        x0 = torch.cat(x0_parts, 0) if len(sizes) == 1 else tuple(x0_parts)
        return Batch(x0, kw_parts, len(idx), None, [self.d.cond_idx[j] for j in idx])


class CutMixSource:
    """cutmix route: the step's Cut-Mix samples (instance, then prior ones), each with the
    conditioning of its own prompt (cached; encoded with gradients when the text encoder trains)."""

    def __init__(self, run, d: InstanceData, s, check_clip):
        self.run, self.s, self.cutmix, self.check_clip = run, s, d.cutmix, check_clip
        self.kw_cache: dict = {}

    def _conditions(self, prompts: list, x0: torch.Tensor, grown: int) -> dict:
        run, cm = self.run, self.cutmix
        if run.te is not None:
            enc = {p: encode_prompt(run.clip_t, p, grad=True) for p in dict.fromkeys(prompts)}
            mm.load_models_gpu([run.mp], force_full_load=True)
            return {p: model_kwargs(run.mp, e, x0[:1]) for p, e in enc.items()}
        for p in dict.fromkeys(prompts):
            if p not in self.kw_cache:
                self.kw_cache[p] = model_kwargs(run.mp, self.check_clip(cm.cond(p)), x0[:1])
        if cm.encoded + len(cm._cond) != grown:
            mm.load_models_gpu([run.mp], force_full_load=True)  # the VAE/CLIP may have displaced it
        return self.kw_cache

    def batch(self, step: int) -> Batch:
        cm = self.cutmix
        inst = cm.samples(step)
        samples = inst + (cm.samples(step, prior=True) if self.s.prior_weight > 0 else [])
        grown = cm.encoded + len(cm._cond)  # what the VAE and CLIP have encoded so far
        x0 = torch.cat([cm.latent(smp) for smp in samples], 0).to(self.run.device)
        prompts = [smp.prompt for smp in samples]
        kwp = self._conditions(prompts, x0, grown)
        return Batch(x0, [kwp[p] for p in prompts], len(inst), inst)


def make_source(run, d: InstanceData, prior: PriorData, s, check_clip):
    """The route's batch source (call after the training clone is loaded)."""
    if d.route == "cutmix":
        return CutMixSource(run, d, s, check_clip)
    return LatentSource(run, d, prior, s)


def positions_of(d: InstanceData):
    """``positions_of(prompt, word, what)`` for the attention losses (Cut-Mix prompts only)."""
    return d.cutmix.positions_or_fail if d.cutmix is not None else None

