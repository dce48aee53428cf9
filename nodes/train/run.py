"""One SVDiff Train run: settings -> data -> trainable clone -> steps -> shift.

``train(node_inputs)`` reads the settings (``TrainSettings``), prepares the instance and prior
data of the route (``sources``), builds the training clones with their delta parameters
(``build_run``), restores a resumed state, then runs ``train_step`` per step: the Eq. 3
denoising loss with prior preservation plus the attention losses, one optimizer step.
Periodic saves go through ``ShiftWriter``.  The input MODEL and CLIP are never modified.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

import comfy.model_management as mm

from ...svdiff import losses, training
from ...svdiff.cutmix import CutMixTrainingSet
from ...svdiff.shift import SpectralShift
from ...svdiff.subsets import SubsetError, select
from .. import comfy_compat as compat
from ..adapter import UNET_PREFIX, architecture_of, carried_shift_keys, combined_fingerprint, shiftable_shapes
from ..attention_capture import AttentionCapture
from ..common import check_interrupt, log, progress, resolve_file
from ..shifts import apply_shift, read_shift_file, save_shift_numbered
from .attention import attention_loss, concat_maps, parse_resolutions
from .data import concat_kwargs, denoise_x0, prediction_target, special_tokens
from . import plan as memory
from .layers import T5_PREFIX, Trainable, text_encoder_keys
from .preview import Previewer, StatusText, pil_preview
from .settings import INJECTION_KEY, NODE, NONE, TrainSettings, err, training_dtype
from .sources import ClipCheck, attention_positions, instance_data, make_source, positions_of, prior_data


class TrainResult(NamedTuple):
    """What SVDiff Train returns (the node's outputs and a report)."""

    model: object
    clip: object
    shift: SpectralShift
    loss_map: dict
    steps: int
    report: dict


@dataclass
class Run:
    """The training clones and what trains on them."""

    mp: object                      # the UNet's training clone
    unet: Trainable
    device: object
    te: Optional[Trainable] = None  # text-encoder deltas (on clip_t's patcher)
    clip_t: object = None
    capture: Optional[AttentionCapture] = None
    params: "OrderedDict[str, torch.nn.Parameter]" = field(default_factory=OrderedDict)
    dtype: torch.dtype = torch.float32  # the UNet's compute dtype while training


# ---------------------------------------------------------------------------------------
# Trainable clones
# ---------------------------------------------------------------------------------------
def _unet_clone(model, s: TrainSettings, notes: list, resolutions) -> Run:
    try:
        unet_keys = select(shiftable_shapes(model, UNET_PREFIX), s.subset)
    except SubsetError as e:
        raise err("subset", str(e)) from None
    if not unet_keys:
        raise err("subset", f"the subset {s.subset} selects no weight of this model")
    mp = compat.training_clone(model)
    tdt = training_dtype(s.training_dtype, mp.load_device, mm.should_use_bf16)
    if tdt != mp.model.get_dtype():
        mp.set_model_compute_dtype(tdt)
    unet = Trainable(mp, unet_keys, s.rank, mp.load_device, s.force_route, "diffusion_model")
    if s.gradient_checkpointing:
        unet.injection.checkpoint_roots = [mp.model.diffusion_model]
    mp.set_injections(INJECTION_KEY, [unet.injection.patcher_injection()])
    run = Run(mp, unet, mp.load_device, dtype=tdt)
    if s.attention:
        # attn2 replacement on the training clone only (before it is loaded); nothing when both weights are 0
        prev = mp.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
        if prev:
            notes.append("unmix_weight/attention_reg_weight: the MODEL's own cross-attention replacement patches "
                         f"({len(prev)}) are not used while training (the attention capture replaces them on the training copy)")
        run.capture = AttentionCapture(resolutions)
        run.capture.install(mp)
    return run


T5_NOTE = ("train_text_encoder: T5-XXL is not trained (train_t5 is off: its 4.7 G weights need about 14 GiB of U/V "
           "factors in fp16); the CLIP encoders are trained")


def _text_encoder_clone(run: Run, clip, s: TrainSettings, notes: list) -> None:
    clip_t = compat.training_clone(clip)
    cshapes = shiftable_shapes(clip_t.patcher)
    ckeys = text_encoder_keys(cshapes, s.train_t5)
    if not s.train_t5 and any(k.startswith(T5_PREFIX) for k in cshapes):
        notes.append(T5_NOTE)
    te = Trainable(clip_t.patcher, ckeys, s.rank, clip_t.patcher.load_device, s.force_route, "", clone_norm_input=True)
    clip_t.patcher.set_injections(INJECTION_KEY, [te.injection.patcher_injection()])
    run.clip_t = clip_t
    if not te.params:
        notes.append("train_text_encoder: no trainable text-encoder weights found")
        return
    run.te = te


def _note_carried_shifts(model, clip, train_te: bool, notes: list) -> None:
    """Training on a MODEL/CLIP that already carries a spectral shift stacks the new one on it."""
    for what, patcher in (("model", model), ("clip", clip.patcher if train_te else None)):
        carried = carried_shift_keys(patcher) if patcher is not None else []
        if carried:
            notes.append(f"{what}: the {what.upper()} already carries a spectral shift on {len(carried)} weights; the trained "
                         "shift is learnt on top of it (W + R1 + R2, not Eq. 4's ReLU(sigma + delta1 + delta2)) and saved "
                         "alone. Connect the unshifted one to train from the base; merge shifts with Combine/Scale Shifts.")


def build_run(model, clip, s: TrainSettings, train_te: bool, notes: list, resolutions) -> Run:
    """Training clones of MODEL (and CLIP when its text encoder trains) with delta parameters."""
    _note_carried_shifts(model, clip, train_te, notes)
    run = _unet_clone(model, s, notes, resolutions)
    if train_te:
        _text_encoder_clone(run, clip, s, notes)
    run.params = OrderedDict(run.unet.params)
    if run.te is not None:
        run.params.update(run.te.params)
    return run


# ---------------------------------------------------------------------------------------
# Resumed state
# ---------------------------------------------------------------------------------------
RESUME_COMPARED = ["subset", "rank", "optimizer", "seed", "batch_size", "train_text_encoder", "train_t5", "cutmix", "unmix_weight",
                   "attention_reg_weight", "lr_schedule", "warmup_steps", "grad_accumulation"]


def _resumed_deltas(resume: str, recorded: dict, notes: list) -> tuple:
    rpath = resolve_file(NODE, "resume_from", "svdiff", resume, "models/svdiff")
    spath = training.state_path_for(rpath)
    if not os.path.isfile(spath):
        sh = read_shift_file(NODE, rpath)
        notes.append(f"resume_from: {resume} has no training state beside it; starting from its delta with a fresh optimizer at step 0")
        return 0, {k: sh.deltas[k].float() for k in sh.deltas}, {}, {}
    try:
        start, deltas, opt_tensors, saved = training.load_training_state(spath)
    except Exception as e:  # a damaged or foreign file, whatever the reader trips over: named, never a traceback
        raise err("resume_from", f"training state {os.path.basename(spath)} is unusable: {e}") from None
    diff = training.settings_mismatch(saved, recorded, RESUME_COMPARED)
    if diff:
        notes.append(f"resume_from: settings differ from the saved run ({', '.join(diff)}); resuming anyway, the result will not match an uninterrupted run")
    return start, deltas, opt_tensors, saved


@torch.no_grad()
def _load_deltas(params: dict, deltas: dict) -> None:
    for k, p in params.items():
        if k in deltas:
            d = deltas[k].float()
            if d.shape != p.shape:
                full = torch.zeros_like(p)
                n = min(d.shape[0], p.shape[0])
                full[:n] = d[:n].to(full.device)
                d = full
            p.copy_(d.to(p.device))


def resume(s: TrainSettings, params: dict, recorded: dict, notes: list) -> tuple:
    """(start step, optimizer tensors) of ``resume_from``, its deltas copied into ``params``."""
    if s.resume_from == NONE:
        return 0, {}
    start, deltas, opt_tensors, saved = _resumed_deltas(s.resume_from, recorded, notes)
    horizon = saved.get("schedule_steps")
    if horizon and horizon != start + s.steps and (s.lr_schedule != "constant" or s.warmup_steps):
        notes.append(f"resume_from: the saved run planned {horizon} steps and this one ends at {start + s.steps}; the "
                     f"{s.lr_schedule} schedule follows the new end, so the result differs from one uninterrupted run")
    missing = [k for k in params if k not in deltas]
    extra = [k for k in deltas if k not in params]
    if extra:
        notes.append(f"resume_from: {len(extra)} weights of the file are not trained with this subset/setting and were dropped")
    _load_deltas(params, deltas)
    if missing and len(missing) == len(params):
        raise err("resume_from", f"{s.resume_from} shares no weight with the subset {s.subset}")
    return start, opt_tensors


def recorded_settings(s: TrainSettings, run: Run, route: str, target: str, cutmix_meta, resolutions) -> dict:
    """The settings written into the shift's training metadata and compared on resume."""
    out = {
        "subset": s.subset, "rank": s.rank, "learning_rate": s.learning_rate, "learning_rate_1d": s.learning_rate_1d,
        "optimizer": s.optimizer, "seed": s.seed, "batch_size": s.batch_size, "prior_weight": s.prior_weight,
        "resolution": s.resolution, "train_text_encoder": run.te is not None,
        "prompt": s.prompt if route != "cutmix" else "", "class_prompt": s.class_prompt if route != "cutmix" else "",
        "captions": s.captions.strip() if route == "images" and s.captions.strip() else "",
        "target": target, "lr_schedule": s.lr_schedule, "warmup_steps": s.warmup_steps,
        "grad_accumulation": s.grad_accumulation,
    }
    if cutmix_meta is not None:
        out["cutmix"] = cutmix_meta
    if run.te is not None and s.train_t5:
        out["train_t5"] = True
    if run.capture is not None:
        out.update({"unmix_weight": s.unmix_weight, "attention_reg_weight": s.attention_reg_weight,
                    "attention_threshold": s.attention_threshold,
                    "attention_resolutions": sorted(resolutions) if resolutions else "all"})
    return out


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------
class ShiftWriter:
    """The current shift of a run, and its periodic saves (shift + resumable training state)."""

    def __init__(self, run: Run, optimizer, metadata: dict, recorded: dict, s: TrainSettings):
        self.run, self.optimizer, self.metadata, self.recorded, self.s = run, optimizer, metadata, recorded, s
        self.saved: list = []
        self.total_steps = 0  # the schedule's horizon, recorded in the training state

    def current(self, step_done: int) -> SpectralShift:
        run = self.run
        deltas = {k: p.detach().float().cpu().clone() for k, p in run.params.items()}
        shapes = dict(run.unet.shapes)
        if run.te is not None:
            shapes.update(run.te.shapes)
        meta = dict(self.metadata)
        meta["training"] = dict(self.recorded, steps=step_done, routes=run.unet.routes())
        sh = SpectralShift(deltas, shapes, meta)
        sh.add_history("train", steps=step_done, subset=self.s.subset, rank=self.s.rank)
        return sh

    def save(self, step_done: int) -> None:
        path = save_shift_numbered(NODE, self.current(step_done), self.s.filename_prefix)
        training.save_training_state(training.state_path_for(path), step_done, self.run.params, self.optimizer,
                                     dict(self.recorded, schedule_steps=self.total_steps))
        self.saved.append(path)
        log.info("[%s] saved %s at step %d", NODE, os.path.basename(path), step_done)

    def due(self, step_done: int, last: bool) -> bool:
        every = self.s.save_every
        return every > 0 and (step_done % every == 0 or last)


# ---------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What every step needs besides its batch."""

    run: Run
    s: TrainSettings
    optimizer: object
    sigmas: torch.Tensor
    target: str
    sigma_data: float
    transformer_options: dict
    loss_map: dict
    positions_of: object = None
    single_pos: object = None
    resolutions: object = None
    base_lrs: list = field(default_factory=list)   # each parameter group's rate before the schedule
    total_steps: int = 0                           # the schedule's horizon: resumed + new steps
    plan_text: str = ""                            # the memory plan, shown above the live figures
    scaler: Optional[object] = None                # torch.amp.GradScaler when training in fp16
    skipped_steps: int = 0                         # optimizer steps the scaler skipped (fp16 overflow)

    @property
    def device(self):
        return self.run.device

    def seen(self) -> set:
        return self.run.capture.seen


def _predict(ctx: StepContext, batch, noise, sigma) -> tuple:
    """x0 predictions of the batch (one forward when the conditionings stack, else per sample)
    and the cross-attention maps captured meanwhile."""
    run, capture = ctx.run, ctx.run.capture
    if capture is not None and not capture.enabled:
        capture = None  # resting (a prior forward of another size): what it holds stays
    kwargs = concat_kwargs(batch.kw_parts)
    maps = []
    if capture is not None:
        capture.clear()
    if kwargs is not None:
        x0p = denoise_x0(run.mp, batch.x0, noise, sigma, kwargs, ctx.transformer_options)
        if capture is not None:
            maps.append(capture.maps())
        return x0p, maps
    outs = []
    for j in range(batch.x0.shape[0]):
        outs.append(denoise_x0(run.mp, batch.x0[j:j + 1], noise[j:j + 1], sigma[j:j + 1], batch.kw_parts[j],
                               ctx.transformer_options))
        if capture is not None:
            maps.append(capture.maps())
            capture.clear()
    return torch.cat(outs, 0), maps


def _squared_errors(ctx: StepContext, batch, g) -> tuple:
    """Eq. 1's squared target errors of a batch of one latent size (noise and timesteps from
    ``g``, in that order) and the cross-attention maps captured meanwhile."""
    x0 = batch.x0
    noise = torch.randn(x0.shape, generator=g).to(ctx.device)
    tidx = training.timestep_draw(g, x0.shape[0], len(ctx.sigmas)).to(ctx.device)
    sigma = ctx.sigmas[tidx].float()
    x0p, maps = _predict(ctx, batch, noise, sigma)
    return losses.target_error(x0p.float(), x0.float(), sigma, ctx.target, ctx.sigma_data).pow(2), maps


def _instance_and_prior_errors(ctx: StepContext, batch, g) -> tuple:
    """Squared errors of the instance and the prior samples, and the instance samples' maps."""
    n = batch.n_instance
    if isinstance(batch.x0, torch.Tensor):
        e2, maps = _squared_errors(ctx, batch, g)
        return e2[:n], e2[n:], maps
    # an aspect bucket that is not the priors' square: two forwards; the attention losses only
    # look at instance samples, so the capture rests during the prior one
    x_inst, x_prior = batch.x0
    e_inst, maps = _squared_errors(ctx, batch._replace(x0=x_inst, kw_parts=batch.kw_parts[:n]), g)
    capture = ctx.run.capture
    if capture is not None:
        capture.enabled = False
    try:
        e_prior, _ = _squared_errors(ctx, batch._replace(x0=x_prior, kw_parts=batch.kw_parts[n:]), g)
    finally:
        if capture is not None:
            capture.enabled = True
    return e_inst, e_prior, maps


def micro_loss(ctx: StepContext, batch, micro: int, step: int) -> torch.Tensor:
    """Eq. 3 (+ the attention losses) of one micro-batch; ``micro`` keys its noise and timesteps."""
    s = ctx.s
    g = training.generator(s.seed, micro, training.STREAM_NOISE)
    e_inst, e_prior, maps = _instance_and_prior_errors(ctx, batch, g)
    inst_loss = e_inst.mean()
    prior_loss = e_prior.mean() if s.prior_weight > 0 else None
    loss = losses.svdiff_loss(inst_loss, prior_loss, s.prior_weight)
    if ctx.run.capture is not None:
        ctx.loss_map.setdefault("denoise", []).append(float(loss.detach()))
        loss = loss + attention_loss(concat_maps(maps), ctx.run.capture.shapes(), batch, s, ctx)
    if not torch.isfinite(loss):
        raise err("learning_rate", f"the loss became {float(loss)} at step {step + 1}; lower the learning rate or use fp32")
    return loss


def train_step(ctx: StepContext, source, step: int) -> float:
    """One optimizer step: ``grad_accumulation`` micro-batches (micro-step index
    step * grad_accumulation + m picks their data and noise), their mean loss backpropagated,
    the learning rate of the schedule at ``step``; returns the mean loss."""
    acc = ctx.s.grad_accumulation
    ctx.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for m in range(acc):
        micro = step * acc + m
        loss = micro_loss(ctx, source.batch(micro), micro, step)
        scaled = loss / acc if acc > 1 else loss
        (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
        total += float(loss.detach())
    training.set_learning_rates(ctx.optimizer, ctx.base_lrs,
                                training.lr_factor(ctx.s.lr_schedule, step, ctx.total_steps, ctx.s.warmup_steps))
    if ctx.scaler is None:
        ctx.optimizer.step()
    else:
        _scaled_step(ctx)
    return total / acc


def gradient_scaler(dtype: torch.dtype, device) -> Optional[object]:
    """``torch.amp.GradScaler`` for fp16 training (fp16 gradients of small losses underflow:
    the loss is scaled up before backward, the fp32 delta gradients unscaled before the step,
    a step with an overflow skipped and the scale lowered); None for fp32 and bf16."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _scaled_step(ctx: StepContext) -> None:
    before = ctx.scaler.get_scale()
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    if ctx.scaler.get_scale() < before:
        ctx.skipped_steps += 1


def _run_steps(ctx: StepContext, source, writer: ShiftWriter, previewer: Previewer, start: int, steps: int, pbar, t0: float) -> None:
    status = StatusText(start, steps, ctx.plan_text)
    if previewer.due(start, first=True):
        pbar.update_absolute(0, steps, pil_preview(previewer.sample(start)))
    with torch.enable_grad():
        for i in range(steps):
            check_interrupt()
            step = start + i
            lv = train_step(ctx, source, step)
            ctx.loss_map["loss"].append(lv)
            preview = pil_preview(previewer.sample(step + 1)) if previewer.due(step + 1, first=False) else None
            pbar.update_absolute(i + 1, steps, preview)
            status.update(i, lv, len(previewer.images))
            if (i + 1) % 10 == 0 or i == 0 or i + 1 == steps:
                log.info("[%s] step %d/%d loss %.5f (%.2f s/step)", NODE, step + 1, start + steps, lv,
                         (time.perf_counter() - t0) / (i + 1))
            if writer.due(step + 1, i + 1 == steps):
                writer.save(step + 1)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def _metadata(model, s: TrainSettings, run: Run, route: str, training_set) -> dict:
    meta = {
        "architecture": architecture_of(model), "subset": s.subset, "rank": s.rank,
        "base_fingerprint": combined_fingerprint(run.unet.fps),
        "trigger_words": (" ".join(subj.token for subj in training_set.subjects) if route == "cutmix"
                          else " ".join(special_tokens(s.prompt, s.class_prompt)) if s.prompt else ""),
    }
    if run.te is not None:
        meta["clip_fingerprint"] = combined_fingerprint(run.te.fps)
    return meta


def _check_inputs(inputs: dict) -> tuple:
    if inputs.get("model") is None:
        raise err("model", "no MODEL connected")
    s = TrainSettings.from_inputs(inputs)
    resolutions = parse_resolutions(s.attention_resolutions)
    ts = inputs.get("training_set")
    if ts is not None and not isinstance(ts, CutMixTrainingSet):
        raise err("training_set", f"expected a training set from the Cut-Mix Builder, got {type(ts).__name__}")
    return s, resolutions


def _optimizer(s: TrainSettings, run: Run, opt_tensors: dict, notes: list):
    te = run.te
    spectral = run.unet.spectral_params() + (te.spectral_params() if te else [])
    vectors = run.unet.vector_params() + (te.vector_params() if te else [])
    lr_1d = s.learning_rate_1d
    if not spectral:
        # only additive 1-D shifts train (subset UNet-1D): learning_rate_1d (1e-6, meant for the norm
        # scales beside the spectral shifts) would move them by about 5e-4 in 500 Adam steps
        lr_1d = s.learning_rate
        notes.append(f"subset {s.subset}: only 1-D weights train, so they use learning_rate ({s.learning_rate:g}); "
                     "learning_rate_1d is not used (the paper's faster setting uses 2e-3 for 1-D weights, appendix D.2)")
    optimizer = training.make_optimizer(s.optimizer, spectral, vectors, s.learning_rate, lr_1d)
    if opt_tensors:
        training.restore_optimizer(optimizer, run.params, opt_tensors)
    return optimizer


def train(node_inputs: dict) -> TrainResult:
    """Run SVDiff training from already-unwrapped node inputs; returns the node's outputs."""
    s, resolutions = _check_inputs(node_inputs)
    model, clip = node_inputs["model"], node_inputs.get("clip")
    notes: list = []
    plan_text = memory.check(model, clip, s, notes)  # before any work: refuses a run that cannot fit
    target, sigma_data = prediction_target(model)
    check_clip = ClipCheck(model)
    with torch.inference_mode(False):
        d = instance_data(node_inputs, s, check_clip, notes)
        single_pos = attention_positions(node_inputs, s, d, notes)
        prior = prior_data(node_inputs, s, d, check_clip, notes)
        for n in notes:
            log.warning("[%s] %s", NODE, n)
        run = build_run(model, clip, s, d.train_te, notes, resolutions)
        recorded = recorded_settings(s, run, d.route, target, prior.cutmix_meta, resolutions)
        start, opt_tensors = resume(s, run.params, recorded, notes)
        optimizer = _optimizer(s, run, opt_tensors, notes)
        writer = ShiftWriter(run, optimizer, _metadata(model, s, run, d.route, node_inputs.get("training_set")), recorded, s)
        writer.total_steps = start + s.steps
        if s.steps and s.warmup_steps >= start + s.steps:
            raise err("warmup_steps", f"{s.warmup_steps} warmup steps leave no step at the full learning rate in a run that "
                                      f"ends at step {start + s.steps}; use fewer warmup steps")
        loss_map = {"loss": []}
        previewer = Previewer(run, s, node_inputs, d)
        pbar = progress(max(1, s.steps))
        t0 = time.perf_counter()
        try:
            if s.steps > 0:
                mm.load_models_gpu([run.mp], memory_required=0, force_full_load=True)
                ms = run.mp.get_model_object("model_sampling")
                source = make_source(run, d, prior, s, check_clip)
                ctx = StepContext(run, s, optimizer, ms.sigmas.detach().clone().to(run.device), target, sigma_data,
                                  run.mp.model_options.get("transformer_options", {}), loss_map, positions_of(d),
                                  single_pos, resolutions, [g["lr"] for g in optimizer.param_groups], start + s.steps,
                                  plan_text, scaler=gradient_scaler(run.dtype, run.device))
                with compat.training_mode():
                    _run_steps(ctx, source, writer, previewer, start, s.steps, pbar, t0)
                if ctx.skipped_steps:
                    notes.append(f"training_dtype fp16: the gradient scaler skipped {ctx.skipped_steps} of {s.steps} "
                                 "optimizer steps on overflowing gradients (fp16 range); bf16 or fp32 skip none")
        finally:
            # ComfyUI ejects the injections and restores the weights
            compat.unload_patcher(run.mp)
            if run.clip_t is not None:
                compat.unload_patcher(run.clip_t.patcher)
        result = _finish(node_inputs, run, writer, start + s.steps, t0, loss_map, notes, d, prior, previewer)
        result.report["memory_plan"] = plan_text
        return result


def _without_fp(shift: SpectralShift) -> SpectralShift:
    """The shift as applied right here: the base is the one it was trained on, skip the fingerprint check."""
    return SpectralShift(shift.deltas, shift.shapes, {k: v for k, v in shift.metadata.items() if k != "base_fingerprint"})


def _finish(node_inputs: dict, run: Run, writer: ShiftWriter, done: int, t0: float, loss_map: dict, notes: list, d, prior,
            previewer):
    shift = writer.current(done)
    shift.metadata["training"]["seconds"] = round(time.perf_counter() - t0, 3)
    # stacked, not composed: the output is the model the shift was trained on (see _note_carried_shifts)
    out_model, out_clip = apply_shift(NODE, node_inputs["model"], node_inputs.get("clip"), _without_fp(shift), 1.0, 1.0,
                                      "the trained shift", compose=False)
    if run.capture is not None:
        run.capture.clear()
    report = {"notes": notes, "routes": run.unet.routes(), "saved": writer.saved, "steps": done, "missing": run.unet.missing,
              "cutmix": d.cutmix, "attention_capture": run.capture is not None,
              "instance_latents": d.latents.cpu(), "instance_entry": d.entries[0],
              "prior_latents": prior.latents.cpu() if prior.latents is not None else None, "prior_entry": prior.entry,
              "previews": previewer.output(), "preview_steps": list(previewer.at_steps)}
    return TrainResult(out_model, out_clip, shift, loss_map, done, report)
