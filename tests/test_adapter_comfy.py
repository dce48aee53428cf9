"""The spectral-shift adapter inside ComfyUI's real patch system (tiny SD1-style model)."""

import torch

import svdiff.decompose as D
from svdiff.shift import SpectralShift


def unet_forward(mp, seed=0):
    """One deterministic UNet evaluation through ComfyUI's loading/patching path."""
    import comfy.model_management as mm

    mm.load_models_gpu([mp], force_full_load=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return mp.model.apply_model(x, torch.tensor([5.0]), c_crossattn=ctx).clone()


def random_shift(mp, scale, seed=1, keys=None, pack=None):
    from svdiff_testkit.comfy_env import pack_module

    adapter = pack_module("nodes.adapter")
    shapes = adapter.shiftable_shapes(mp, "diffusion_model.")
    keys = keys or list(shapes)
    g = torch.Generator().manual_seed(seed)
    from svdiff.shift import delta_length

    deltas = {k: torch.randn(delta_length(shapes[k]), generator=g) * scale for k in keys}
    return SpectralShift(deltas, {k: shapes[k] for k in keys}, {"architecture": "TinySD"})


def test_zero_shift_is_bit_identical(tiny):
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    base_out = unet_forward(mp)
    shifts = pack_module("nodes.shifts")
    sh = random_shift(mp, 0.0)
    m2, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "zero")
    assert m2 is not mp
    out = unet_forward(m2)
    assert torch.equal(out, base_out)


def test_random_shift_moves_sigma_as_eq2_and_base_untouched(tiny):
    from svdiff_testkit.comfy_env import pack_module
    import comfy.model_management as mm

    mp, clip = tiny
    base_out = unet_forward(mp)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w0 = mp.model.state_dict()[key].clone()
    sh = random_shift(mp, 0.5)
    shifts = pack_module("nodes.shifts")
    m2, _ = shifts.apply_shift("test", mp, None, sh, 1.0, 1.0, "rand")
    out = unet_forward(m2)
    assert not torch.equal(out, base_out)
    w1 = m2.model.state_dict()[key].clone()
    s0 = torch.linalg.svdvals(w0.double())
    expect = torch.relu(s0 + sh.deltas[key].double()).sort(descending=True).values
    got = torch.linalg.svdvals(w1.double())
    assert torch.allclose(got, expect, atol=2e-3), (got - expect).abs().max()
    # the base MODEL still gives bit-identical outputs after the shifted one ran
    assert torch.equal(unet_forward(mp), base_out)
