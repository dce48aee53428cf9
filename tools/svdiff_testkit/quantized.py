"""The tiny SD1 model stored in reduced-precision and quantized weight formats, loaded by
ComfyUI's own UNet loader (``comfy.sd.load_diffusion_model_state_dict``, what UNETLoader uses).

Formats (:func:`formats` lists those the running ComfyUI has, :func:`missing` why others are not):

- ``fp32``, ``bf16``, ``fp16``: the model built in that dtype (no cast).
- ``fp8_e4m3fn``, ``fp8_e5m2``: plain fp8 storage (UNETLoader's ``weight_dtype``), computed in fp32.
- ``scaled_fp8``: a "scaled fp8" checkpoint (``scaled_fp8`` marker, per-layer ``scale_weight``);
  0.3.75 loads it with ``scaled_fp8_ops``, 0.33 converts it to float8_e4m3fn quantized layers.
- ``float8_e4m3fn`` (``TensorCoreFP8Layout``), ``float8_e5m2``, ``nvfp4``, ``mxfp8``,
  ``int8_tensorwise``: quantized Linear layers declared by ``_quantization_metadata`` (both
  versions read it; 0.33 turns it into per-layer ``comfy_quant`` entries).

Only the Linear layers of the transformer blocks are quantized (what ComfyUI's mixed-precision
ops quantize) but ``attn2.to_k`` (see ``_is_quantized_linear``); convolutions and norms keep fp32.  Harness only.
"""

from __future__ import annotations

import json

import torch

from svdiff_testkit import tiny

PLAIN = ("fp32", "bf16", "fp16")
FP8 = ("fp8_e4m3fn", "fp8_e5m2")
LAYOUTS = ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise")
ALL = PLAIN + FP8 + ("scaled_fp8",) + LAYOUTS

_FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _quant_ops():
    import comfy.quant_ops as q

    return q


def missing(fmt: str):
    """Why ``fmt`` cannot be built on the running ComfyUI, or None when it can."""
    if fmt in PLAIN or fmt in FP8 or fmt == "scaled_fp8":
        return None
    q = _quant_ops()
    algos = getattr(q, "QUANT_ALGOS", {})
    if fmt not in algos:
        return f"this ComfyUI's comfy.quant_ops has no {fmt!r} format (QUANT_ALGOS: {sorted(algos)})"
    return None


def formats() -> list:
    return [f for f in ALL if missing(f) is None]


def _is_quantized_linear(key: str, v: torch.Tensor) -> bool:
    # attn2.to_k stays fp32: ComfyUI detects context_dim from its stored width, which packed
    # formats (nvfp4: two values a byte) would halve
    return ".transformer_blocks." in key and key.endswith(".weight") and v.ndim == 2 and "attn2.to_k" not in key


def _layout_tensors(fmt: str, w: torch.Tensor, prefix: str) -> dict:
    """On-disk tensors of a quantized weight (``weight``, ``weight_scale``, ...)."""
    q = _quant_ops()
    if not hasattr(q.QuantizedTensor, "state_dict"):  # 0.3.75: per-tensor fp8 only
        dtype = torch.float8_e4m3fn
        scale = w.abs().amax().float() / torch.finfo(dtype).max
        return {prefix + "weight": (w / scale).to(dtype), prefix + "weight_scale": scale}
    layout = q.QUANT_ALGOS[fmt]["comfy_tensor_layout"]
    kw = {"scale": "recalculate"} if fmt in ("float8_e4m3fn", "float8_e5m2") else {}
    qt = q.QuantizedTensor.from_float(w.float(), layout, **kw)
    return {k: v.contiguous() for k, v in qt.state_dict(prefix + "weight").items()}


def unet_state_dict(fmt: str, seed: int = 0) -> tuple:
    """(state dict, metadata) of the tiny UNet in ``fmt`` as a UNet file would carry it."""
    mp, _ = tiny.build(seed)
    sd = {k: v.detach().clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    if fmt == "scaled_fp8":
        out = {"scaled_fp8": torch.empty((), dtype=torch.float8_e4m3fn)}
        for k, v in sd.items():
            if _is_quantized_linear(k, v):
                scale = v.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max
                out[k] = (v / scale).to(torch.float8_e4m3fn)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[k] = v
        return out, None
    layers, out = {}, {}
    for k, v in sd.items():
        if _is_quantized_linear(k, v):
            layer = k[: -len(".weight")]
            layers[layer] = {"format": fmt}
            out.update(_layout_tensors(fmt, v, layer + "."))
        else:
            out[k] = v
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def build(fmt: str, seed: int = 0):
    """A ModelPatcher of the tiny UNet in ``fmt`` (see the module docstring)."""
    if fmt in PLAIN:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt]
        return tiny.build(seed, dtype=dtype)[0]
    reason = missing(fmt)
    if reason:
        raise ValueError(reason)
    import comfy.sd

    tiny.register_tiny_sd()
    if fmt in FP8:
        mp, _ = tiny.build(seed)
        sd = {k: v.detach().clone() for k, v in mp.model.diffusion_model.state_dict().items()}
        with torch.inference_mode():  # as the executor runs UNETLoader
            return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": _FP8_DTYPES[fmt]})
    sd, meta = unet_state_dict(fmt, seed)
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model_state_dict(sd, metadata=meta)
