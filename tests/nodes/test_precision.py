"""Spectral shifts in reduced precision and on quantized weights (tiny SD1-style model, CPU).

- 1-D (norm) shifts survive bf16/fp16: the norm gets its float32 patched weight.
- A shift patches every weight format ComfyUI patches LoRAs onto (per version: plain and scaled
  fp8, quantized layouts), within that format's own error of the float32 reference.
- Training in bf16 tracks float32; fp16 training runs with gradient scaling.
"""

import pytest
import torch

from svdiff.shift import SpectralShift, delta_length, is_spectral_shape
from svdiff_testkit import quantized as Q
from svdiff_testkit.probes import unet_forward


def pack(name):
    from svdiff_testkit.comfy_env import pack_module

    return pack_module(name)


def shift_for(mp, keys, scale, seed=1):
    shapes = pack("nodes.adapter").shiftable_shapes(mp, "diffusion_model.")
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(delta_length(shapes[k]), generator=g) * scale for k in keys}
    return SpectralShift(deltas, {k: shapes[k] for k in keys}, {"architecture": "TinySD"})


def norm_keys(mp):
    shapes = pack("nodes.adapter").shiftable_shapes(mp, "diffusion_model.")
    return [k for k, s in shapes.items() if not is_spectral_shape(s) and (".norm" in k or "in_layers.0" in k or "out_layers.0" in k)]


def fwd(mp):
    """One UNet evaluation, loaded and patched under inference mode as ComfyUI's executor does."""
    with torch.inference_mode():
        return unet_forward(mp, grad_mode=torch.inference_mode)


def apply(mp, sh, strength=1.0):
    with torch.inference_mode():  # as the executor runs Apply Spectral Shift
        m2, _ = pack("nodes.shifts").apply_shift("test", mp, None, sh, strength, 1.0, "test")
    return m2


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------
# 1-D shifts in bf16 / fp16
# ---------------------------------------------------------------------------------------
NORM_LAYERS = ["diffusion_model.input_blocks.1.0.in_layers.0.weight",                  # GroupNorm (ResBlock)
               "diffusion_model.input_blocks.1.1.norm.weight",                         # GroupNorm (SpatialTransformer)
               "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm2.weight"]   # LayerNorm


def layer_output(mp, key, lowvram=False):
    """The output of the layer of ``key`` in one UNet evaluation of ``mp`` (fully loaded, or with
    every module in ComfyUI's low-VRAM mode, where patches are computed at each forward)."""
    from svdiff_testkit.probes import unet_inputs

    module = mp.get_model_object(key[: -len(".weight")])
    got = []
    h = module.register_forward_hook(lambda m, i, o: got.append(o.detach().float().clone()))
    try:
        with torch.inference_mode():  # loaded and patched as under ComfyUI's executor
            if lowvram:
                x, ctx = unet_inputs(mp, 0)
                mp.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False, full_load=False)
                mp.inject_model()
                try:
                    mp.model.apply_model(x, torch.tensor([5.0]), c_crossattn=ctx)
                finally:
                    mp.unpatch_model()
            else:
                unet_forward(mp, grad_mode=torch.inference_mode)
    finally:
        h.remove()
    return got[0]


@pytest.mark.parametrize("lowvram", [False, True], ids=["loaded", "lowvram"])
@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3fn"])
@pytest.mark.parametrize("key", NORM_LAYERS, ids=["resblock_gn", "transformer_gn", "layernorm"])
def test_small_norm_shift_survives_reduced_precision(comfy, fmt, key, lowvram):
    """A 1-D shift at the size the paper's 1-D learning rate gives (|delta| ~ 5e-4, below half a
    bf16 step at 1.0) changes the norm's output in a bf16/fp16 model as in the float32 model:
    mean |delta output| within 10 %.  (Measured at the shifted layer: further bf16 layers
    dither a change this small with their own rounding.)"""
    ref, low = Q.build("fp32"), Q.build(fmt)
    sh = shift_for(ref, [key], 5e-4)
    d_ref = layer_output(apply(ref, sh), key) - layer_output(ref, key)
    d_low = layer_output(apply(low, sh), key, lowvram) - layer_output(low, key, lowvram)
    m_ref, m_low = float(d_ref.abs().mean()), float(d_low.abs().mean())
    print(f"{fmt} {key.split('.', 1)[1]} lowvram={lowvram}: mean |d out| fp32 {m_ref:.3e}, {fmt} {m_low:.3e}, "
          f"ratio {m_low / m_ref:.3f}, direction error {rel(d_low, d_ref):.3f}")
    assert abs(m_low / m_ref - 1) < 0.10, (m_ref, m_low)


def test_norm_shift_injection_ejects_and_fp32_model_unchanged(comfy):
    """The float32 weights are passed only while the shifted clone is loaded, and a float32
    model gets no cast functions (its patched weight is already exact)."""
    low = Q.build("bf16")
    sh = shift_for(low, norm_keys(low), 1e-3)
    m2 = apply(low, sh)
    base = unet_forward(low)
    unet_forward(m2)
    module = m2.get_model_object(norm_keys(low)[0][: -len(".weight")])
    assert any(type(f).__name__ == "_FP32NormWeight" for f in module.weight_function)
    out = unet_forward(low)
    assert not any(type(f).__name__ == "_FP32NormWeight" for f in module.weight_function)
    assert torch.equal(out, base)
    ref = Q.build("fp32")
    r2 = apply(ref, shift_for(ref, norm_keys(ref), 1e-3))
    unet_forward(r2)
    module = r2.get_model_object(norm_keys(ref)[0][: -len(".weight")])
    assert not list(module.weight_function)


@pytest.mark.parametrize("kind", ["groupnorm", "layernorm"])
def test_mixed_norm_kernels_on_cpu(comfy, kind):
    ad = pack("nodes.adapter")
    for dt in (torch.bfloat16, torch.float16):
        assert ad.mixed_norm_supported(kind, "cpu", dt)


# ---------------------------------------------------------------------------------------
# Every weight format ComfyUI patches LoRAs onto
# ---------------------------------------------------------------------------------------
FORMAT_KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",      # quantized Linear
               "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",     # quantized Linear
               "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight",  # quantized Linear
               "diffusion_model.input_blocks.1.0.in_layers.2.weight",                          # Conv2d
               "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight"]           # LayerNorm


@pytest.mark.parametrize("fmt", Q.ALL)
def test_shift_patches_every_weight_format(comfy, fmt):
    """The patched forward of the model stored in ``fmt`` matches the float32 model's patched
    forward within that format's own error (its unpatched forward against float32's), and the
    change the shift makes is the float32 change."""
    reason = Q.missing(fmt)
    if reason:
        pytest.skip(f"{fmt}: {reason}")
    ref, low = Q.build("fp32"), Q.build(fmt)
    sh = shift_for(ref, FORMAT_KEYS, 0.3)
    fmts = {k: pack("nodes.comfy_compat").weight_format(low, k) for k in FORMAT_KEYS[:1]}
    base_ref, base_low = fwd(ref), fwd(low).float()
    shifted = apply(low, sh)
    out_ref, out_low = fwd(apply(ref, sh)), fwd(shifted).float()
    # ComfyUI wrote the patched weight back in the layer's own format (0.33 requantises)
    compat = pack("nodes.comfy_compat")
    live, orig = shifted.get_model_object(FORMAT_KEYS[0]), compat.base_weight(shifted, FORMAT_KEYS[0])
    assert type(live) is type(orig) and live.dtype == orig.dtype and compat.is_quantized(live) == compat.is_quantized(orig)
    assert not torch.equal(compat.dense_weight(shifted, FORMAT_KEYS[0]).float(),
                           (live.dequantize() if compat.is_quantized(live) else live).float())
    fmt_err, patched_err = rel(base_low, base_ref), rel(out_low, out_ref)
    change_err = rel(out_low - base_low, out_ref - base_ref)
    print(f"{fmt} ({fmts}): format error {fmt_err:.4f}, patched error {patched_err:.4f}, change error {change_err:.4f}")
    assert patched_err <= 1.5 * fmt_err + 2e-3, (fmt_err, patched_err)
    assert change_err <= 3 * fmt_err + 0.05, (fmt_err, change_err)
    assert torch.equal(fwd(low).float(), base_low)  # the base model is untouched


# ---------------------------------------------------------------------------------------
# Training in bf16 / fp16
# ---------------------------------------------------------------------------------------
def _images(n=2, size=64):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.cat([torch.stack([((xs - 0.3 * i) ** 2 + ys**2 < 0.3).float(), (xs + 1) / 2, torch.full_like(xs, 0.3)], -1)[None]
                      for i in range(n)])


def _train(ckpt, dtype, **kw):
    from svdiff_testkit.train_args import train_inputs

    a = train_inputs(ckpt, images=[_images()], filename_prefix="svdiff/test_precision", training_dtype=dtype, **kw)
    with torch.inference_mode():
        return pack("nodes.train").train(a)


def _flat(shift, keys=None):
    keys = sorted(keys or shift.deltas)
    return torch.cat([shift.deltas[k].float().flatten() for k in keys])


BF16_TRAIN_TOL = 0.2    # relative error of the learnt delta (all UNet weights) against the fp32 run
BF16_1D_TOL = 0.15      # the same for a 1-D-only run at the paper's 1-D step size


def test_bf16_training_tracks_fp32(tiny_checkpoint):
    """Six AdamW steps on every UNet weight in bf16 learn the delta the fp32 run learns, within
    BF16_TRAIN_TOL (relative); the losses agree to a few percent."""
    r32 = _train(tiny_checkpoint, "fp32", steps=6, learning_rate=1e-2)
    r16 = _train(tiny_checkpoint, "bf16", steps=6, learning_rate=1e-2)
    d32, d16 = _flat(r32[2]), _flat(r16[2])
    err = rel(d16, d32)
    l32, l16 = r32[3]["loss"], r16[3]["loss"]
    print(f"bf16 vs fp32: delta relative error {err:.4f}; losses fp32 {l32}, bf16 {l16}")
    assert float(d32.abs().max()) > 0
    assert err < BF16_TRAIN_TOL, err
    assert all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(l32, l16)), (l32, l16)


def test_bf16_training_of_1d_weights_is_not_rounded_away(tiny_checkpoint):
    """Only the 1-D (norm) weights train, with steps of about 5e-4 (the size that rounds away
    in a bf16 scale near 1): bf16 learns the fp32 delta within BF16_1D_TOL."""
    kw = dict(steps=4, subset="UNet-1D", learning_rate=5e-4, optimizer="AdamW")
    d32, d16 = _flat(_train(tiny_checkpoint, "fp32", **kw)[2]), _flat(_train(tiny_checkpoint, "bf16", **kw)[2])
    err = rel(d16, d32)
    print(f"bf16 1-D: |delta| fp32 {float(d32.abs().mean()):.3e}, bf16 {float(d16.abs().mean()):.3e}, relative error {err:.4f}")
    assert float(d32.abs().mean()) > 1e-4
    assert err < BF16_1D_TOL, err


@pytest.mark.parametrize("key", NORM_LAYERS, ids=["resblock_gn", "transformer_gn", "layernorm"])
def test_training_norm_forward_keeps_small_1d_delta_in_bf16(comfy, key):
    """The training forward of a norm with a trained 1-D delta of ~5e-4 in a bf16 model changes
    its output as float32 arithmetic does (mean |delta output| within 10 %), and the gradient
    reaches the delta."""
    layers = pack("nodes.train.layers")
    mod = Q.build("bf16").get_model_object(key[: -len(".weight")])
    kind = "groupnorm" if isinstance(mod, torch.nn.GroupNorm) else "layernorm"
    g = torch.Generator().manual_seed(3)
    shape = (4, mod.num_channels, 32, 32) if kind == "groupnorm" else (4, 512, mod.normalized_shape[0])
    x = torch.randn(shape, generator=g).bfloat16()
    vdelta = torch.nn.Parameter(torch.randn(mod.weight.shape, generator=g) * 5e-4)
    with torch.no_grad():
        zero = layers._make_forward(mod, kind, None, torch.zeros_like(vdelta))(x).float()
    out = layers._make_forward(mod, kind, None, vdelta)(x)
    assert out.dtype == torch.bfloat16
    w32, b32 = mod.weight.float(), mod.bias.float()
    norm = (lambda w: torch.nn.functional.group_norm(x.float(), mod.num_groups, w, b32, mod.eps)) if kind == "groupnorm" \
        else (lambda w: torch.nn.functional.layer_norm(x.float(), mod.normalized_shape, w, b32, mod.eps))
    d_ref = norm(w32 + vdelta.detach()) - norm(w32)
    d_got = out.detach().float() - zero
    ratio = float(d_got.abs().mean() / d_ref.abs().mean())
    print(f"training {kind}: mean |d out| ratio bf16/fp32 {ratio:.3f}")
    assert abs(ratio - 1) < 0.10, ratio
    out.float().sum().backward()
    assert vdelta.grad is not None and float(vdelta.grad.abs().sum()) > 0


def test_fp16_training_uses_gradient_scaling(tiny_checkpoint, monkeypatch):
    """fp16 training runs with torch.amp gradient scaling (on the CPU too) and learns what fp32
    learns; the scaler actually scales the backward pass."""
    run_mod = pack("nodes.train.run")
    made = []
    orig = run_mod.gradient_scaler

    def spy(dtype, device):
        s = orig(dtype, device)
        made.append(s)
        return s

    monkeypatch.setattr(run_mod, "gradient_scaler", spy)
    r32 = _train(tiny_checkpoint, "fp32", steps=4, learning_rate=1e-2)
    r16 = _train(tiny_checkpoint, "fp16", steps=4, learning_rate=1e-2)
    assert made[0] is None and made[1] is not None and made[1].get_scale() > 1
    err = rel(_flat(r16[2]), _flat(r32[2]))
    print(f"fp16 vs fp32: delta relative error {err:.4f}, scale {made[1].get_scale():g}")
    assert err < BF16_TRAIN_TOL, err
