"""The SVDiff Train node: its schema (defaults from ``TrainSettings``) and execute()."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ...svdiff import training
from ...svdiff.training import LR_SCHEDULES
from ...svdiff.subsets import SUBSET_NAMES
from ..common import CATEGORY, SpectralShiftType, TrainingSetType, shift_files
from .run import train
from .settings import DEFAULTS, IMAGE_FITS, NODE, NONE

LossMapType = io.Custom("LOSS_MAP")


def _first(v, default=None):
    if isinstance(v, list):
        return v[0] if v else default
    return default if v is None else v


class SVDiffTrain(io.ComfyNode):
    NODE_NAME = NODE

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffTrain",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Fine-tune only the singular values of the weights (SVDiff, Eq. 2-3): DreamBooth-style training "
                        "with prior preservation inside the graph. Outputs the patched MODEL/CLIP and the SPECTRAL_SHIFT.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base diffusion model. It is never modified: training runs on a clone."),
                io.Vae.Input("vae", optional=True, tooltip="VAE used to encode the subject images (and prior images)."),
                io.Image.Input("images", optional=True, tooltip="The 3-5 subject photos, any sizes and shapes (see image_fit)."),
                io.String.Input("prompt", default=DEFAULTS.prompt, multiline=True,
                                tooltip="Instance prompt with a rare identifier, e.g. 'photo of a sks dog' (for single-image editing: a plain description)."),
                io.String.Input("captions", optional=True, default=DEFAULTS.captions, multiline=True,
                                tooltip="Optional: one caption per subject image, one line each in the images' order, each with the "
                                        "prompt's instance token (e.g. 'photo of a sks dog on a sofa'); replaces the prompt for that "
                                        "image. Empty: every image uses the prompt. Prior preservation keeps the class prompt."),
                io.Combo.Input("image_fit", optional=True, options=list(IMAGE_FITS), default=DEFAULTS.image_fit,
                               tooltip="aspect buckets: each image keeps its shape in the bucket nearest its aspect ratio (sides "
                                       "multiples of 64, about resolution^2 pixels, up to 4:1), and each step trains on one bucket. "
                                       "centre-crop: every image is resized on its shorter side and cropped to a resolution square. "
                                       "Cut-Mix training sets always use squares."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder of the same checkpoint: encodes the prompts; trained too when train_text_encoder is on."),
                io.Boolean.Input("train_text_encoder", default=DEFAULTS.train_text_encoder, tooltip="Also train spectral shifts of the text encoder's layers (needs clip and images)."),
                io.Boolean.Input("train_t5", optional=True, default=DEFAULTS.train_t5,
                                 tooltip="With train_text_encoder on SD3.x/Flux: also train T5-XXL's layers. Off by default: T5-XXL's "
                                         "4.7 G weights need about 14 GiB of U/V factors in fp16 (more than the DiT's on SD3.5), "
                                         "and the CLIP encoders (the whole pooled vector, and SD3's first 77 tokens) already "
                                         "learn the new word. No effect on models without T5."),
                io.Latent.Input("latents", optional=True, tooltip="Pre-encoded training latents (list from Make/Load Training Dataset) instead of images."),
                io.Conditioning.Input("positive", optional=True, tooltip="Conditioning for the latents route (one, or one per latent)."),
                io.Conditioning.Input("prior_conditioning", optional=True, tooltip="Class conditioning for prior preservation when no CLIP is connected (latents route)."),
                io.String.Input("class_prompt", default=DEFAULTS.class_prompt, multiline=True, tooltip="Class prompt for prior preservation, e.g. 'photo of a dog'."),
                io.Image.Input("prior_images", optional=True, tooltip="Class images for prior preservation. When absent (and prior_weight > 0) they are generated with the base model and cached."),
                io.Float.Input("prior_weight", default=DEFAULTS.prior_weight, min=0.0, max=10.0, step=0.05, tooltip="lambda of Eq. 3: weight of the prior-preservation loss. 0 turns it off (single-image editing)."),
                io.Int.Input("num_prior_images", default=DEFAULTS.num_prior_images, min=1, max=1000, tooltip="How many class images to generate when prior_images is not connected. The default 8 keeps a first run short; DreamBooth-style real runs use 100-200 class images."),
                io.Int.Input("prior_steps", default=DEFAULTS.prior_steps, min=1, max=200, tooltip="Sampling steps (euler) used to generate prior images."),
                io.Combo.Input("subset", options=SUBSET_NAMES, default=DEFAULTS.subset, tooltip="Which weights get spectral shifts. UNets (SD1.x/SD2.x/SDXL): Table 1 of the paper (UNet...Mid-CA). "
                                      "DiTs (SD3.5: MMDiT, Flux): DiT, DiT-Attn, DiT-Text-QKV, DiT-MLP, DiT-1D, block thirds, Flux-Double/Single-Blocks. "
                                      "A subset of another family is refused (README, Model families)."),
                io.Int.Input("rank", default=DEFAULTS.rank, min=0, max=4096, tooltip="0 = shift all singular values; r > 0 = only the r largest (appendix E.1)."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=0, max=100000, tooltip="Training steps to run now (added to the resumed step count). 0 = no training: outputs the resumed (or a zero) shift."),
                io.Int.Input("batch_size", default=DEFAULTS.batch_size, min=1, max=64, tooltip="Instance images per step (as many prior images are added when prior_weight > 0)."),
                io.Float.Input("learning_rate", default=DEFAULTS.learning_rate, min=0.0, max=1.0, step=0.00001, tooltip="Learning rate of the spectral shifts (paper: 1e-3). When only 1-D weights train (subset UNet-1D) it is their learning rate too."),
                io.Float.Input("learning_rate_1d", default=DEFAULTS.learning_rate_1d, min=0.0, max=1.0, step=0.000001, tooltip="Learning rate of the additive shifts of 1-D weights (norm scales) beside the spectral shifts (paper: 1e-6). 0 freezes them. Not used when only 1-D weights train (subset UNet-1D): then learning_rate applies (the paper's faster setting uses 2e-3 for 1-D weights, appendix D.2)."),
                io.Combo.Input("lr_schedule", optional=True, options=list(LR_SCHEDULES), default=DEFAULTS.lr_schedule,
                               tooltip="Learning-rate schedule over the run's optimizer steps (resumed steps included): constant, "
                                       "linear decay to 0 or cosine decay to 0, after the warmup. Resumed exactly by resume_from."),
                io.Int.Input("warmup_steps", optional=True, default=DEFAULTS.warmup_steps, min=0, max=100000,
                             tooltip="Optimizer steps over which the learning rates rise linearly to their value (0 = none). "
                                     "Must be fewer than the run's steps."),
                io.Int.Input("grad_accumulation", optional=True, default=DEFAULTS.grad_accumulation, min=1, max=256,
                             tooltip="Micro-batches per optimizer step: each step averages the gradients of this many batches "
                                     "(effective batch = batch_size x this; one step then costs as many forward/backward passes)."),
                io.Combo.Input("optimizer", options=list(training.OPTIMIZERS), default=DEFAULTS.optimizer, tooltip="Optimizer for the shifts."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the noise, timesteps, data order and generated prior images (same seed, same result on the CPU)."),
                io.Int.Input("resolution", default=DEFAULTS.resolution, min=64, max=4096, step=64, tooltip="Training resolution in pixels (a multiple of 64)."),
                io.Boolean.Input("gradient_checkpointing", default=DEFAULTS.gradient_checkpointing, tooltip="Recompute activations in the backward pass: less memory, about a third slower."),
                io.Combo.Input("training_dtype", options=["auto", "fp32", "bf16", "fp16"], default=DEFAULTS.training_dtype, tooltip="Compute precision: auto = bf16 on GPUs that support it, fp32 on the CPU. delta is always kept in fp32."),
                io.Combo.Input("side_path", options=["auto", "side", "recompose"], default=DEFAULTS.side_path, tooltip="How a shifted layer is computed: auto picks per layer the cheaper of the side path U(Delta*(V^T x)) and recomposing W + U diag(Delta) V^T."),
                io.Int.Input("save_every", default=DEFAULTS.save_every, min=0, max=100000, tooltip="Save the shift (and a resumable training state beside it) into models/svdiff every N steps and at the end, so a cancelled or failed run keeps its last save and resume_from continues it exactly. The default 100 loses at most 100 steps (minutes on a GPU); 0 = never."),
                io.Int.Input("preview_every", optional=True, default=DEFAULTS.preview_every, min=0, max=100000,
                             tooltip="Sample validation_prompt with the current shift before the first step and then every N steps; "
                                     "shown on the node while it trains and output as the previews IMAGE batch. One preview costs "
                                     "prior_steps sampling steps with CFG plus a VAE decode, about as much as 7-15 training steps "
                                     "at batch size 1 with prior preservation: the default 100 keeps previews near 10 % of the "
                                     "training time. 0 = no previews. Needs the VAE."),
                io.String.Input("validation_prompt", optional=True, default=DEFAULTS.validation_prompt, multiline=True,
                                tooltip="Prompt of the previews (fixed seed: the seed input). Empty: the instance prompt (the first "
                                        "caption with captions, the first sample's prompt with a Cut-Mix set)."),
                io.String.Input("filename_prefix", default=DEFAULTS.filename_prefix, tooltip="File name prefix for saves inside models/svdiff (a number is appended)."),
                io.Combo.Input("resume_from", options=[NONE] + shift_files(), default=DEFAULTS.resume_from, tooltip="Continue training from a shift file in models/svdiff (exactly, when its training state is beside it)."),
                TrainingSetType.Input("training_set", optional=True, tooltip="Multi-subject training set from the Cut-Mix Builder, used instead of images + prompt: each step draws a cut-mixed pair of subjects with the set's probability, else one subject (prior samples likewise). Not available with latents + positive."),
                io.Float.Input("unmix_weight", optional=True, default=DEFAULTS.unmix_weight, min=0.0, max=1000.0, step=0.01, tooltip="Weight of the 'unmix' cross-attention regularisation (Sec. 3.3, needs a training_set): penalises each subject token's attention on the other subject's region of a cut-mixed image. 0 = off (no attention capture, no cost)."),
                io.Float.Input("attention_reg_weight", optional=True, default=DEFAULTS.attention_reg_weight, min=0.0, max=1000.0, step=0.01, tooltip="Weight of the cross-attention regularisation of appendix D.1 (Eq. 10) on single-subject samples: the special token may not attend outside the class word's attention mask. 0 = off (no cost)."),
                io.Float.Input("attention_threshold", optional=True, default=DEFAULTS.attention_threshold, min=0.0, max=0.99, step=0.01, tooltip="Eq. 10: the class word's attention map, divided by its maximum, above this value is the subject mask M."),
                io.String.Input("attention_resolutions", optional=True, default=DEFAULTS.attention_resolutions, tooltip="Which cross-attention maps the attention losses use, by side length of the map: 'all', or e.g. '16' or '8, 16' (SD1.5 at 512 px has 64, 32, 16 and 8)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model patched with the trained shift."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP, patched when the text encoder was trained."),
                SpectralShiftType.Output(display_name="SPECTRAL_SHIFT", tooltip="The trained spectral shift."),
                LossMapType.Output(display_name="LOSS_MAP", tooltip="Per-step training loss (for Plot Loss Graph)."),
                io.Int.Output(display_name="steps", tooltip="Total steps trained (including resumed ones)."),
                io.Image.Output(display_name="previews", tooltip="The validation samples taken during training, in order "
                                                                 "(samples over time); a black image when there were none."),
            ],
        )

    @classmethod
    def validate_inputs(cls, resume_from=None):
        """A missing resume_from file is refused when the prompt is queued (only resume_from is
        named here, so ComfyUI still checks every other input's range itself)."""
        from ..common import queued_file_check

        return queued_file_check(cls.NODE_NAME, "resume_from", "svdiff", resume_from, "models/svdiff", none=NONE)

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
        r = train(a)
        text = f"{r.report['memory_plan']}\ntrained {r.steps} steps; routes {r.report['routes']}"
        if r.report["notes"]:
            text += "\n" + "\n".join(r.report["notes"])
        if r.report["preview_steps"]:
            text += f"\npreviews at steps {', '.join(str(n) for n in r.report['preview_steps'])}"
        return io.NodeOutput(r.model, r.clip, r.shift, r.loss_map, r.steps, r.report["previews"], ui=ui.PreviewText(text))


NODES = [SVDiffTrain]
