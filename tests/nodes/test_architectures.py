"""Keys and value counts on the real SD1.5 / SD2.x / SDXL architectures, built on the meta device.

No weights are allocated: ComfyUI's own UNet and text-encoder classes are instantiated under
``torch.device("meta")`` with the configurations ComfyUI detects for each checkpoint family.
"""

import pytest
import torch

from svdiff.decompose import num_singular_values
from svdiff.shift import SpectralShift, delta_length
import svdiff.shiftfile as F
import svdiff.subsets as subsets

COMMON = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
              in_channels=4, model_channels=320, use_temporal_attention=False, use_temporal_resblock=False)
SD15 = dict(COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SD21 = dict(SD15, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64)
SD21.pop("num_heads")
SDXL = dict(COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
            use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])


class _P:
    def __init__(self, m):
        self.model = m


def build_meta(cls_name, unet_config):
    import comfy.supported_models as SM

    with torch.device("meta"):
        cfg = getattr(SM, cls_name)(dict(unet_config))
        unet = cfg.get_model({})
        te = cfg.clip_target().clip(device="meta", dtype=torch.float32)
    return unet, te


def counts(shapes):
    mats = {k: s for k, s in shapes.items() if len(s) >= 2}
    vecs = {k: s for k, s in shapes.items() if len(s) == 1}
    return mats, vecs


@pytest.fixture(scope="module")
def sd15(comfy):
    return build_meta("SD15", SD15)


def test_sd15_unet_value_counts_match_the_paper_space(sd15, pack):
    ad = pack("nodes.adapter")
    shapes = ad.shiftable_shapes(_P(sd15[0]), "diffusion_model.")
    mats, vecs = counts(shapes)
    assert len(shapes) == 391 and len(mats) == 282 and len(vecs) == 109
    assert sum(num_singular_values(s) for s in mats.values()) == 222_696
    assert sum(num_singular_values(s) for s in mats.values() if len(s) == 2) == 140_416
    assert sum(num_singular_values(s) for s in mats.values() if len(s) == 4) == 82_280
    assert sum(s[0] for s in vecs.values()) == 100_160
    kv = subsets.select(shapes, "UNet-CA-KV")
    assert sum(num_singular_values(shapes[k]) for k in kv) == 18_816
    ca = subsets.select(shapes, "UNet-CA")
    assert sum(num_singular_values(shapes[k]) for k in ca if len(shapes[k]) >= 2) == 43_776
    # every weight of the UNet is covered: nothing left out
    all_weights = [k for k, v in sd15[0].state_dict().items() if k.startswith("diffusion_model.") and k.endswith(".weight")]
    assert sorted(all_weights) == sorted(shapes)


def test_sd15_table1_subsets_partition_sensibly(sd15, pack):
    ad = pack("nodes.adapter")
    shapes = ad.shiftable_shapes(_P(sd15[0]), "diffusion_model.")
    n = {name: len(subsets.select(shapes, name)) for name in subsets.SUBSET_NAMES}
    assert n["UNet"] == 391
    assert n["UNet-1D"] + n["UNet-2D"] + n["UNet-4D"] == 391
    assert n["Up-CA"] + n["Down-CA"] + n["Mid-CA"] == n["UNet-CA"] == 16 * 4
    assert n["UNet-CA-KV"] == 32
    assert n["Up-Blocks"] + n["Down-Blocks"] + n["Mid-Block"] < 391  # conv_in, time embedding and out are in none


def test_sd15_clip_l_keys(sd15, pack):
    ad = pack("nodes.adapter")
    shapes = ad.shiftable_shapes(_P(sd15[1]))
    mats, vecs = counts(shapes)
    layers = [k for k in shapes if ".encoder.layers." in k]
    assert len(layers) == 12 * 8  # q, k, v, out, fc1, fc2 + two layer norms per layer
    assert "clip_l.transformer.text_model.embeddings.token_embedding.weight" in mats
    assert num_singular_values(mats["clip_l.transformer.text_model.embeddings.token_embedding.weight"]) == 768
    assert all(k.startswith("clip_l.transformer.") for k in shapes)


def test_sd15_full_shift_round_trips_through_a_file(sd15, pack, tmp_path):
    ad = pack("nodes.adapter")
    shapes = {**ad.shiftable_shapes(_P(sd15[0]), "diffusion_model."), **ad.shiftable_shapes(_P(sd15[1]))}
    sh = SpectralShift({k: torch.zeros(delta_length(s)) for k, s in shapes.items()}, shapes, {"architecture": "SD15"})
    p16 = F.save_shift(sh, str(tmp_path / "full16.safetensors"))
    p32 = F.save_shift(sh, str(tmp_path / "full32.safetensors"), dtype="float32")
    back = F.load_shift(p16)
    assert F.check_compatible(back, shapes, p16) and len(back) == len(shapes) == 491
    import os

    size16, size32 = os.path.getsize(p16), os.path.getsize(p32)
    values = sh.num_values()
    assert size16 > 2 * values and size32 > 4 * values
    print(f"SD1.5 UNet+CLIP-L shift: {len(sh)} tensors, {values} values, {size16/1e6:.2f} MB fp16, {size32/1e6:.2f} MB fp32")


@pytest.mark.parametrize("arch,cls,config,te_prefixes", [
    ("SD2.x", "SD20", SD21, ("clip_h.",)),
    ("SDXL", "SDXL", SDXL, ("clip_l.", "clip_g.")),
])
def test_other_architectures_every_weight_gets_a_key(comfy, pack, arch, cls, config, te_prefixes):
    ad = pack("nodes.adapter")
    unet, te = build_meta(cls, config)
    shapes = ad.shiftable_shapes(_P(unet), "diffusion_model.")
    all_weights = [k for k, v in unet.state_dict().items() if k.startswith("diffusion_model.") and k.endswith(".weight")]
    assert sorted(all_weights) == sorted(shapes) and len(shapes) > 300
    te_shapes = ad.shiftable_shapes(_P(te))
    te_weights = [k for k, v in te.state_dict().items() if k.endswith(".weight") and v.ndim >= 1]
    assert sorted(te_weights) == sorted(te_shapes)
    for p in te_prefixes:
        assert any(k.startswith(p) for k in te_shapes), p
    assert len(subsets.select(shapes, "UNet-CA")) > 0
