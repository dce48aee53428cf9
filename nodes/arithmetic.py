"""Combine/Scale Shifts, Inspect Spectral Shift, Spectral Shift from LoRA, Export as LoRA."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..svdiff import arithmetic as A
from ..svdiff import inspect as I
from ..svdiff import shiftfile
from ..svdiff.shift import SpectralShift
from ..svdiff.subsets import LAYER_PRESET_NAMES
from . import comfy_compat as compat
from . import interchange as X
from .adapter import architecture_of
from .common import CATEGORY, SpectralShiftType, SVDiffNodeError, log, require_shift, resolve_file

MODES = ["add", "interpolate", "scale", "select layers", "rank limit"]
NO_PRESET = "(pattern only)"
SLOTS = ["shift_a", "shift_b", "shift_c", "shift_d"]


def _shift_inputs(first_required: bool = False):
    out = []
    for i, s in enumerate(SLOTS):
        letter = s[-1].upper()
        out.append(SpectralShiftType.Input(
            s, optional=not (first_required and i == 0),
            tooltip=f"Spectral shift {letter}. " + {
                0: "For 'select layers' the selected layers come from A; for 'scale' and 'rank limit' A is the shift changed.",
                1: "For 'select layers' every layer not selected comes from B.",
            }.get(i, "Optional extra input for add / interpolate.")))
    return out


def _connected(kw: dict) -> list:
    return [(s[-1].upper(), kw[s]) for s in SLOTS if kw.get(s) is not None]


class SVDiffCombineShifts(io.ComfyNode):
    NODE_NAME = "Combine/Scale Shifts"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffCombineShifts",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Arithmetic on spectral shifts before patching (Eq. 4/5, Sec. 4.4, appendix E): one merged delta per weight.",
            inputs=[
                io.Combo.Input("mode", options=MODES, default="add",
                               tooltip="add: sum of w_i*delta_i (Eq. 4). interpolate: alpha*A + (1-alpha)*B (Eq. 5), or weights summing to 1 for 3-4 inputs. "
                                       "scale: s*A (negative reverses the concept). select layers: chosen layers from A, the rest from B. "
                                       "rank limit: keep the shifts of the r largest singular values of each matrix of A."),
                *_shift_inputs(),
                io.Float.Input("weight_a", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Weight of A in add (and in interpolate with 3-4 inputs)."),
                io.Float.Input("weight_b", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Weight of B in add (and in interpolate with 3-4 inputs)."),
                io.Float.Input("weight_c", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Weight of C in add (and in interpolate with 3-4 inputs)."),
                io.Float.Input("weight_d", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Weight of D in add (and in interpolate with 3-4 inputs)."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="interpolate with two inputs: alpha*A + (1-alpha)*B. 1 gives A, 0 gives B. "
                                       "With 3-4 inputs the weights are used and must sum to 1 (they are refused, not normalised, otherwise)."),
                io.Float.Input("scale", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="scale: delta' = s*delta of A (appendix E.3). 1 = unchanged, 0 = off, negative reverses the concept."),
                io.Int.Input("rank", default=4, min=1, max=4096,
                             tooltip="rank limit: keep the shifts of the r largest singular values of every matrix of A (appendix E.1); smaller matrices are kept whole."),
                io.Combo.Input("preset", options=[NO_PRESET] + LAYER_PRESET_NAMES, default=LAYER_PRESET_NAMES[0],
                               tooltip="select layers: which layers come from A. Style presets follow XTI's layer names (SD1.x/SD2.x, and 'style SDXL:' for SDXL; "
                                       "DiTs have none); the others are the subsets of SVDiff Train (Table 1 for UNets, DiT-* for SD3.5 and Flux), "
                                       "refused on a shift of another family. The mapping of XTI's names to this UNet is this pack's "
                                       "reading, not the paper's: Fig. 10 names (16, down', 1)-(8, down', 0), but SD1.x has no cross-attention "
                                       "at 8x8 on the way down, so the geometry preset ends at the 8x8 middle block (README, style mixing)."),
                io.String.Input("pattern", default="", optional=True,
                                tooltip="select layers: a regular expression searched in each weight key (e.g. 'input_blocks\\.[78]\\.1\\.'). "
                                        "With a preset, a key must match both."),
            ],
            outputs=[SpectralShiftType.Output(display_name="SPECTRAL_SHIFT"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, mode, weight_a, weight_b, weight_c, weight_d, alpha, scale, rank, preset, pattern="",
                shift_a=None, shift_b=None, shift_c=None, shift_d=None) -> io.NodeOutput:
        node = cls.NODE_NAME
        kw = dict(shift_a=shift_a, shift_b=shift_b, shift_c=shift_c, shift_d=shift_d)
        conn = _connected(kw)
        for letter, s in conn:
            require_shift(node, s, f"shift_{letter.lower()}")
        weights = {"A": weight_a, "B": weight_b, "C": weight_c, "D": weight_d}
        try:
            if mode in ("add", "interpolate"):
                if len(conn) < 2:
                    raise SVDiffNodeError(node, f"shift_b: {mode} needs at least two shifts, {len(conn)} connected")
                shifts = [s for _, s in conn]
                if mode == "add":
                    out = A.add(shifts, [weights[l] for l, _ in conn])
                elif len(conn) == 2:
                    out = A.interpolate(shifts, alpha=alpha)
                else:
                    try:
                        out = A.interpolate(shifts, weights=[weights[l] for l, _ in conn])
                    except A.ShiftArithmeticError as e:
                        raise SVDiffNodeError(node, f"weight_a..weight_d: {e}") from None
            elif mode in ("scale", "rank limit"):
                if shift_a is None:
                    raise SVDiffNodeError(node, f"shift_a: {mode} changes shift A, which is not connected")
                if len(conn) > 1:
                    raise SVDiffNodeError(node, f"shift_{conn[1][0].lower()}: {mode} takes one shift (A); disconnect the others")
                if mode == "scale":
                    out = A.scale(shift_a, scale)
                else:
                    try:
                        out = A.rank_limit(shift_a, rank)
                    except A.ShiftArithmeticError as e:
                        raise SVDiffNodeError(node, f"rank: {e}") from None
            elif mode == "select layers":
                if shift_a is None or shift_b is None:
                    missing = "shift_a" if shift_a is None else "shift_b"
                    raise SVDiffNodeError(node, f"{missing}: select layers takes the chosen layers from A and the rest from B; both are needed")
                p = None if preset == NO_PRESET else preset
                try:
                    out = A.select_layers(shift_a, shift_b, preset=p, pattern=(pattern or "").strip() or None)
                except A.ShiftArithmeticError as e:
                    raise SVDiffNodeError(node, f"{'pattern' if pattern and 'pattern' in str(e) else 'preset'}: {e}") from None
            else:
                raise SVDiffNodeError(node, f"mode: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        except A.ShiftArithmeticError as e:
            raise SVDiffNodeError(node, f"shift inputs: {e}") from None
        h = out.metadata["history"][-1]
        info = f"{mode}: {len(out)} weights, {out.num_values()} values; " + json.dumps({k: v for k, v in h.items() if k != "inputs"}, default=str)
        return io.NodeOutput(out, info, ui=ui.PreviewText(info))


def _source_size(shift: SpectralShift):
    name = shift.metadata.get("source_file")
    if name:
        p = folder_paths.get_full_path("svdiff", str(name))
        if p and os.path.isfile(p):
            return os.path.getsize(p), "file"
    try:
        return shiftfile.predicted_file_size(shift, "float16"), "float16 if saved"
    except ValueError:
        return None, ""


class SVDiffInspectShift(io.ComfyNode):
    NODE_NAME = "Inspect Spectral Shift"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffInspectShift",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Per-block norm of delta as a bar chart, the cosine-similarity matrix of several shifts as a heat map (Fig. 15), and a text summary.",
            is_output_node=True,
            inputs=[
                SpectralShiftType.Input("shift_a", tooltip="The shift to inspect."),
                *[SpectralShiftType.Input(s, optional=True, tooltip="Another shift to compare with A (optional).") for s in SLOTS[1:]],
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, shift_a, shift_b=None, shift_c=None, shift_d=None) -> io.NodeOutput:
        node = cls.NODE_NAME
        conn = _connected(dict(shift_a=shift_a, shift_b=shift_b, shift_c=shift_c, shift_d=shift_d))
        for letter, s in conn:
            require_shift(node, s, f"shift_{letter.lower()}")
        labels = [f"{l}: {s.metadata.get('source_file') or 'shift'}"[:32] for l, s in conn]
        shifts = [s for _, s in conn]
        img = I.render(shifts, labels)
        texts = []
        for (l, s) in conn:
            size, how = _source_size(s)
            t = I.summary(s, l, size)
            if how and how != "file":
                t = t.replace("file size:", f"file size ({how}):")
            texts.append(t)
        if len(shifts) > 1:
            m = A.cosine_similarity_matrix(shifts)
            rows = ["cosine similarity (mean over shared layers):"]
            for i, (l, _) in enumerate(conn):
                rows.append(f"  {l}: " + "  ".join("  n/a" if v != v else f"{v:+.3f}" for v in m[i].tolist()))
            texts.append("\n".join(rows))
        text = "\n\n".join(texts)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(image, text, ui=ui.PreviewImage(image, cls=cls))


# --------------------------------------------------------------------------------------
# LoRA interchange
# --------------------------------------------------------------------------------------
NO_LORA = "(none)"


def _lora_files():
    return [NO_LORA] + folder_paths.get_filename_list("loras")


class SVDiffFromLoRA(io.ComfyNode):
    NODE_NAME = "Spectral Shift from LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffFromLoRA",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Project a LoRA (any kind ComfyUI loads) or a fine-tune's weight change onto the base model's singular basis: "
                        "delta_i = u_i^T (W + dW) v_i - sigma_i, with a report of how much of dW is kept.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was made for (its SVD defines the spectral shift)."),
                io.Clip.Input("clip", optional=True, tooltip="The base text encoder, to convert the LoRA's text-encoder part too (optional)."),
                io.Combo.Input("lora_name", options=_lora_files(), default=NO_LORA,
                               tooltip="A LoRA file from models/loras. Leave at (none) when a LORA_MODEL or a fine-tuned MODEL is connected."),
                io.LoraModel.Input("lora", optional=True, tooltip="A LORA_MODEL from ComfyUI's training nodes, instead of a file (optional)."),
                io.Model.Input("finetuned_model", optional=True,
                               tooltip="A fully fine-tuned model of the same architecture: its weight difference to MODEL is projected (optional)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength used to compute its weight change dW before the projection."),
            ],
            outputs=[SpectralShiftType.Output(display_name="SPECTRAL_SHIFT"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, clip=None, lora=None, finetuned_model=None) -> io.NodeOutput:
        node = cls.NODE_NAME
        sources = [n for n, v in (("lora_name", lora_name not in (None, "", NO_LORA)), ("lora", lora is not None),
                                  ("finetuned_model", finetuned_model is not None)) if v]
        if not sources:
            raise SVDiffNodeError(node, "lora_name: choose a LoRA file, or connect a LORA_MODEL or a fine-tuned MODEL")
        if len(sources) > 1:
            raise SVDiffNodeError(node, f"{sources[1]}: give one source only ({' and '.join(sources)} are set)")
        arch = architecture_of(model)
        ignored = []
        if sources[0] == "finetuned_model":
            items = X.weight_deltas_from_models(model, finetuned_model)
            src = "a fine-tuned model"
        else:
            if sources[0] == "lora_name":
                path = resolve_file(node, "lora_name", "loras", lora_name, "models/loras")
                sd = comfy.utils.load_torch_file(path, safe_load=True)
                src = os.path.basename(path)
            else:
                if not isinstance(lora, dict):
                    raise SVDiffNodeError(node, f"lora: expected a LORA_MODEL dict, got {type(lora).__name__}")
                sd, src = lora, "a LORA_MODEL"
            items, info = X.weight_deltas_from_lora(model, clip, sd, strength)
            ignored = info["ignored"]
        if not items:
            raise SVDiffNodeError(node, f"{sources[0]}: {src} changes no weight of this model that a spectral shift can carry")
        shift, rep = X.shift_from_weight_deltas(items, arch, src)
        t = rep["total"]
        worst = sorted(rep["per_key"].items(), key=lambda kv: kv[1]["kept"] / kv[1]["energy"] if kv[1]["energy"] else 1.0)[:3]
        lines = [
            f"{src} -> spectral shift: {t['weights']} weights, {shift.num_values()} values",
            f"kept {100 * t['kept_fraction']:.2f}% of the weight change's energy (||P(dW)||^2 / ||dW||^2)",
            f"relative error of the applied shift ||dW - dW_shift|| / ||dW||: {t['applied_relative_error']:.4f}"
            + (f" ({t['clamped']} singular values clamped at 0 by the ReLU)" if t["clamped"] else ""),
        ]
        if ignored:
            lines.append(f"not representable (biases etc.): {len(ignored)} tensors, e.g. {ignored[0]}")
        for k, st in worst:
            if st["energy"] > 0:
                lines.append(f"  least kept: {k}: {100 * st['kept'] / st['energy']:.2f}%")
        text = "\n".join(lines)
        shift.metadata["conversion_report"] = {k: v for k, v in t.items()}
        return io.NodeOutput(shift, text, ui=ui.PreviewText(text))


LORA_FOLDERS = ["models/loras", "output/loras"]


def lora_save_dir(choice: str) -> str:
    if choice == "output/loras":
        d = os.path.join(folder_paths.get_output_directory(), "loras")
    else:
        d = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(d, exist_ok=True)
    return d


def save_lora_numbered(node: str, sd: dict, metadata: dict, folder: str, filename_prefix: str) -> str:
    from safetensors.torch import save

    from .common import save_numbered

    data = save(sd, metadata={k: str(v) for k, v in metadata.items()})
    path = save_numbered(node, data, folder, filename_prefix)
    compat.forget_file_list("loras")
    return path


class SVDiffToLoRA(io.ComfyNode):
    NODE_NAME = "Export Spectral Shift as LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffToLoRA",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Write dW = U diag(ReLU(sigma+delta) - sigma) V^T as a standard LoRA file (exact at full rank), "
                        "readable by ComfyUI's LoraLoader and kohya-style tools where this pack is not installed.",
            is_output_node=True,
            inputs=[
                SpectralShiftType.Input("shift", tooltip="The spectral shift to export."),
                io.Model.Input("model", tooltip="The base model the shift belongs to (its SVD gives U and V)."),
                io.Clip.Input("clip", optional=True, tooltip="The base text encoder, needed when the shift also covers it (optional)."),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="LoRA rank per weight: 0 = exact (rank = number of changed singular values); r keeps the r largest "
                                     "|ReLU(sigma+delta)-sigma|. A rank above a matrix's size keeps that matrix whole."),
                io.String.Input("filename_prefix", default="svdiff/shift_lora",
                                tooltip="File name (optionally with sub-folders) inside the chosen folder; a number is appended, nothing is overwritten."),
                io.Combo.Input("folder", options=LORA_FOLDERS, default=LORA_FOLDERS[0],
                               tooltip="models/loras: LoraLoader lists it at once. output/loras: where ComfyUI's own SaveLoRA writes."),
            ],
            outputs=[io.String.Output(display_name="path"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, shift, model, rank, filename_prefix, folder, clip=None) -> io.NodeOutput:
        node = cls.NODE_NAME
        require_shift(node, shift)
        if folder not in LORA_FOLDERS:
            raise SVDiffNodeError(node, f"folder: {folder!r} is not one of {LORA_FOLDERS}")
        has_te = any(not k.startswith("diffusion_model.") for k in shift.deltas)
        if has_te and clip is None:
            raise SVDiffNodeError(node, "clip: the shift covers the text encoder; connect the CLIP it belongs to")
        try:
            sd, rep = X.shift_to_lora(shift, model, clip, rank)
        except ValueError as e:
            raise SVDiffNodeError(node, f"model: {e}") from None
        if not sd:
            raise SVDiffNodeError(node, "shift: the shift changes no weight (all deltas zero or clamped); there is nothing to export")
        if rep["skipped"]:
            log.warning("[%s] %d weights have no LoRA name in this model and were skipped (first: %s)", node, len(rep["skipped"]), rep["skipped"][0])
        meta = {
            "svdiff_source": shift.metadata.get("source_file", ""),
            "svdiff_rank": rank,
            "svdiff_relative_error": f"{rep['relative_error']:.6g}",
            "svdiff_history": json.dumps(shift.metadata.get("history", []), default=str),
            "ss_network_module": "networks.lora",
            "ss_network_dim": rep["max_rank"],
        }
        path = save_lora_numbered(node, sd, meta, lora_save_dir(folder), filename_prefix)
        text = (f"wrote {os.path.basename(path)} ({os.path.getsize(path) / 1024:.1f} KiB, {rep['weights']} weights, "
                f"rank {'exact' if rank == 0 else rank}, max rank {rep['max_rank']}) in {os.path.dirname(path)}; "
                f"relative Frobenius error {rep['relative_error']:.4g} (worst weight {rep['max_error']:.4g})")
        if rep["skipped"]:
            text += f"; {len(rep['skipped'])} weights skipped (no LoRA name)"
        return io.NodeOutput(path, text, ui=ui.PreviewText(text))


class SVDiffExportPytorchLayout(io.ComfyNode):
    NODE_NAME = "Export Spectral Shift (svdiff-pytorch)"

    """Write a shift in the layout of the widely used svdiff-pytorch implementation."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffExportPytorchLayout",
            display_name=cls.NODE_NAME,
            category=CATEGORY,
            description="Write a shift as svdiff-pytorch files: diffusers module names + '.delta', float32, UNet and text "
                        "encoder in two files. Its 1-D layers carry one scalar each, so per-element 1-D deltas are projected "
                        "(the report says how much is lost).",
            is_output_node=True,
            inputs=[
                SpectralShiftType.Input("shift", tooltip="The spectral shift to export."),
                io.Model.Input("model", tooltip="The base model the shift belongs to (key names and the 1-D weights the projection needs)."),
                io.Clip.Input("clip", optional=True, tooltip="The base text encoder, needed when the shift also covers it (optional)."),
                io.String.Input("filename_prefix", default="svdiff_pytorch/spectral_shifts",
                                tooltip="File name (optionally with sub-folders) inside ComfyUI's output folder; a number is "
                                        "appended; the text-encoder file gets '_te' after it. Nothing is overwritten."),
            ],
            outputs=[io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, shift, model, filename_prefix, clip=None) -> io.NodeOutput:
        from safetensors.torch import save

        from .common import save_numbered

        node = cls.NODE_NAME
        require_shift(node, shift)
        try:
            unet_sd, te_sd, rep = X.shift_to_pytorch_layout(shift, model, clip)
        except ValueError as e:
            raise SVDiffNodeError(node, f"clip: {e}" if "CLIP" in str(e) else f"model: {e}") from None
        out = folder_paths.get_output_directory()
        written = []
        if unet_sd:
            written.append(save_numbered(node, save({k: v.float().contiguous() for k, v in unet_sd.items()}), out, filename_prefix))
        if te_sd:
            written.append(save_numbered(node, save({k: v.float().contiguous() for k, v in te_sd.items()}), out, filename_prefix + "_te"))
        if not written:
            raise SVDiffNodeError(node, "shift: no weight of the shift has a name in the svdiff-pytorch layout")
        parts = [f"wrote {os.path.relpath(p, out)} ({os.path.getsize(p) / 1024:.1f} KiB)" for p in written]
        for what, r in rep.items():
            if r.get("projected"):
                parts.append(f"{what}: {len(r['projected'])} 1-D deltas projected to svdiff-pytorch's scalar form "
                             f"(up to {100 * r['max_lost']:.0f}% of a delta lost)")
            if r.get("unmapped"):
                parts.append(f"{what}: {len(r['unmapped'])} weights have no svdiff-pytorch name and were left out")
        text = "; ".join(parts)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [SVDiffCombineShifts, SVDiffInspectShift, SVDiffFromLoRA, SVDiffToLoRA, SVDiffExportPytorchLayout]
