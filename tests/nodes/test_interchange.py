"""Interchange: svdiff-pytorch files (full SD1.5 key sets, conversion of norm scalars), LoRA <-> shift."""

import os
import types

import pytest
import torch
from safetensors.torch import save_file

import svdiff.interchange as X
import svdiff.shiftfile as shiftfile
from svdiff.shift import SpectralShift, delta_length, is_spectral_shape

SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_resblock=False, use_temporal_attention=False, num_head_channels=-1)


# -- an independent list of the module names svdiff-pytorch saves (diffusers UNet2DConditionModel
#    and transformers CLIPTextModel of SD1.5), written from those architectures, not from ComfyUI's map
def diffusers_sd15_unet_modules() -> list:
    names = ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out"]
    ch = [320, 640, 1280, 1280]
    blk = ["norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]

    def resnet(p, shortcut):
        names.extend(f"{p}.{x}" for x in ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"] + (["conv_shortcut"] if shortcut else []))

    def attn(p):
        names.extend([f"{p}.norm", f"{p}.proj_in", f"{p}.proj_out"] + [f"{p}.transformer_blocks.0.{x}" for x in blk])

    for i in range(4):
        for j in range(2):
            cin = ch[i - 1] if (j == 0 and i > 0) else ch[i]
            resnet(f"down_blocks.{i}.resnets.{j}", cin != ch[i])
            if i < 3:
                attn(f"down_blocks.{i}.attentions.{j}")
        if i < 3:
            names.append(f"down_blocks.{i}.downsamplers.0.conv")
    resnet("mid_block.resnets.0", False)
    resnet("mid_block.resnets.1", False)
    attn("mid_block.attentions.0")
    for i in range(4):
        for j in range(3):
            resnet(f"up_blocks.{i}.resnets.{j}", True)
            if i > 0:
                attn(f"up_blocks.{i}.attentions.{j}")
        if i < 3:
            names.append(f"up_blocks.{i}.upsamplers.0.conv")
    return names


def hf_clip_text_modules(layers=12) -> list:
    names = ["text_model.embeddings.token_embedding", "text_model.embeddings.position_embedding", "text_model.final_layer_norm"]
    for b in range(layers):
        for x in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]:
            names.append(f"text_model.encoder.layers.{b}.{x}")
    return names


def _meta_unet(cfg):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    u = UNetModel(**cfg, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    shapes = {"diffusion_model." + k: tuple(v.shape) for k, v in u.state_dict().items() if k.endswith(".weight")}
    fake_model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(unet_config=cfg)))
    return shapes, fake_model


def _write_pytorch_file(path, names, key_map, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for n in names:
        s = shapes[key_map[n]] if n in key_map else (4, 4)
        t[n + ".delta"] = torch.randn(delta_length(s) if is_spectral_shape(s) else 1, generator=g) * 0.01
    save_file(t, path)
    return t


def test_full_sd15_unet_and_clip_l_key_sets_map_100_percent(comfy, tmp_path):
    from svdiff_testkit.comfy_env import pack_module
    import comfy.sd1_clip

    NX = pack_module("nodes.interchange")
    unet_names = diffusers_sd15_unet_modules()
    te_names = hf_clip_text_modules()
    assert len(unet_names) == 391 and len(set(unet_names)) == 391
    assert len(te_names) == 99
    shapes, fake = _meta_unet(SD15_UNET)
    umap = NX.unet_key_map(fake)
    assert len(shapes) == 391
    clip = comfy.sd1_clip.SD1ClipModel(device=torch.device("meta"))
    cshapes = {k: tuple(v.shape) for k, v in clip.state_dict().items() if k.endswith(".weight")}
    tmap = NX.text_encoder_key_map(dict.fromkeys(cshapes))
    # spot checks of the meaning of the map
    assert umap["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert umap["up_blocks.1.attentions.0.proj_in"] == "diffusion_model.output_blocks.3.1.proj_in.weight"
    assert umap["mid_block.resnets.1.conv2"] == "diffusion_model.middle_block.2.out_layers.3.weight"
    assert umap["conv_norm_out"] == "diffusion_model.out.0.weight"
    assert shapes[umap["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]] == (320, 768)
    assert tmap["text_model.encoder.layers.0.self_attn.q_proj"] == "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"

    for names, kmap, shp, fname in ((unet_names, umap, shapes, "spectral_shifts.safetensors"),
                                    (te_names, tmap, cshapes, "spectral_shifts_te.safetensors")):
        path = str(tmp_path / fname)
        _write_pytorch_file(path, names, kmap, shp)
        tensors, meta, layout = shiftfile.load_raw(path)
        assert layout == "svdiff-pytorch" and meta == {}
        base_1d = {k: torch.ones(s) for k, s in shp.items() if len(s) == 1}
        sh, rep = X.shift_from_pytorch_layout(tensors, kmap, shp, base_1d)
        assert rep["unmapped"] == [] and rep["mapped"] == len(names)
        assert len(set(sh.deltas)) == len(names)  # one-to-one
    # every UNet weight of the SD1.5 model is reached (the 391 tensors are exactly its weights)
    assert {umap[n] for n in unet_names} == set(shapes)
    # CLIP-L: every weight but ComfyUI's text_projection (CLIPTextModel has none)
    assert set(cshapes) - {tmap[n] for n in te_names} == {"clip_l.transformer.text_projection.weight"}


def test_sd2_key_maps_cover_the_text_encoder_and_unet(comfy):
    from svdiff_testkit.comfy_env import pack_module
    import comfy.text_encoders.sd2_clip as sd2_clip

    NX = pack_module("nodes.interchange")
    cfg = dict(SD15_UNET, use_linear_in_transformer=True, context_dim=1024, num_heads=-1, num_head_channels=64)
    shapes, fake = _meta_unet(cfg)
    umap = NX.unet_key_map(fake)
    assert {umap[n] for n in diffusers_sd15_unet_modules()} == set(shapes)
    clip = sd2_clip.SD2ClipModel(device=torch.device("meta"))
    keys = [k for k in clip.state_dict() if k.endswith(".weight")]
    tmap = NX.text_encoder_key_map(dict.fromkeys(keys))
    n_layers = sum(1 for k in keys if k.endswith("self_attn.q_proj.weight"))
    names = hf_clip_text_modules(n_layers)
    assert all(n in tmap for n in names) and tmap[names[0]].startswith("clip_h.transformer.")


def test_norm_scalar_conversion_and_projection_back():
    w = torch.tensor([0.5, -1.0, 2.0, 0.25])
    delta = 0.7
    d = X.norm_scalar_to_additive(w, delta)
    n = w.norm()
    assert torch.allclose(w + d, w * torch.relu(n + delta) / n, atol=1e-6)
    coef, lost = X.additive_to_norm_scalar(w, d)
    assert abs(coef - delta) < 1e-5 and lost < 1e-6
    # a per-element delta has no scalar equivalent: projected, with the lost part reported
    e = torch.tensor([0.3, 0.0, 0.0, -0.2])
    coef, lost = X.additive_to_norm_scalar(w, e)
    proj = w * (coef / n)
    assert abs(coef - float(w @ e) / float(n)) < 1e-6
    assert abs(lost - float((e - proj).norm() / e.norm())) < 1e-6 and lost > 0.5


def _tiny_maps(NX, mp, clip):
    ushapes = mp.model.state_dict()
    umap = {n: k for n, k in NX.unet_key_map(mp).items() if k in ushapes}  # this tiny UNet has fewer blocks
    tmap = NX.text_encoder_key_map(clip.patcher)
    return umap, tmap


def test_load_spectral_shift_reads_svdiff_pytorch_files(tiny, shift_dir):
    from svdiff_testkit.comfy_env import pack_module
    import comfy.model_management as mm

    NX = pack_module("nodes.interchange")
    shifts_mod = pack_module("nodes.shifts")
    common = pack_module("nodes.common")
    mp, clip = tiny
    umap, tmap = _tiny_maps(NX, mp, clip)
    ushapes = {k: tuple(v.shape) for k, v in mp.model.state_dict().items() if k.endswith(".weight")}
    cshapes = {k: tuple(v.shape) for k, v in clip.patcher.model.state_dict().items() if k.endswith(".weight")}
    upath = os.path.join(shift_dir, "pt_unet.safetensors")
    tpath = os.path.join(shift_dir, "pt_te.safetensors")
    ut = _write_pytorch_file(upath, list(umap), umap, ushapes, seed=3)
    _write_pytorch_file(tpath, list(tmap), tmap, cshapes, seed=4)  # the text-encoder file beside it
    common.register_shift_folder()
    node = shifts_mod.SVDiffLoadShift
    m2, _, sh = node.execute(model=mp, shift_name="pt_unet.safetensors", strength_model=1.0, strength_clip=1.0).args
    assert len(sh) == len(umap) and sh.metadata["history"][0]["op"] == "import"
    mm.load_models_gpu([m2], force_full_load=True)
    sd = m2.model.state_dict()
    # a matrix: sigma moves by delta (Eq. 2)
    n = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    k = umap[n]
    W0 = NX.base_weight(mp, k).detach().double()
    got = torch.linalg.svdvals(sd[k].double())
    expect = torch.relu(torch.linalg.svdvals(W0) + ut[n + ".delta"].double()).sort(descending=True).values
    assert torch.allclose(got, expect, atol=2e-3)
    # a norm: svdiff-pytorch's w * ReLU(||w|| + delta) / ||w||
    n = "down_blocks.0.attentions.0.transformer_blocks.0.norm1"
    k = umap[n]
    w = NX.base_weight(mp, k).detach().double()
    want = w * torch.relu(w.norm() + float(ut[n + ".delta"])) / w.norm()
    assert torch.allclose(sd[k].double(), want, atol=1e-5)
    mm.unload_all_models()
    # text-encoder file: patches CLIP, refuses without it
    with pytest.raises(common.SVDiffNodeError, match=r"\[Load Spectral Shift\].*text-encoder file; connect the CLIP"):
        node.execute(model=mp, shift_name="pt_te.safetensors", strength_model=1.0, strength_clip=1.0)
    _, c2, sh2 = node.execute(model=mp, clip=clip, shift_name="pt_te.safetensors", strength_model=1.0, strength_clip=1.0).args
    assert len(sh2) == len(tmap) and c2 is not clip and len(c2.patcher.patches) == len(tmap)
    # writing back: matrices identical, norm scalars recovered (our d is parallel to w)
    out_u, out_t, rep = NX.shift_to_pytorch_layout(sh, mp, None)
    assert set(out_u) == set(ut) and not out_t
    for name, t in ut.items():
        assert torch.allclose(out_u[name], t, atol=1e-5), name
    assert rep["UNet"]["max_lost"] < 1e-5


# ---------------------------------------------------------------- LoRA <-> shift (core)
def test_projection_exact_in_singular_basis_and_kept_fraction_for_random():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 7, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    c = torch.randn(7, generator=g, dtype=torch.float64) * 0.1
    dW = (U * c) @ Vh
    d, st = X.project_weight_delta(U, S, Vh, dW)
    assert torch.allclose(d.double(), c, atol=1e-6)
    assert abs(st["kept"] / st["energy"] - 1) < 1e-9 and st["applied_error"] < 1e-12
    R = torch.randn(12, 7, generator=g, dtype=torch.float64)
    d, st = X.project_weight_delta(U, S, Vh, R)
    P = U @ torch.diag(torch.diagonal(U.t() @ R @ Vh.t())) @ Vh
    frac = float((P * P).sum() / (R * R).sum())
    assert abs(st["kept"] / st["energy"] - frac) < 1e-9
    assert 0 < frac < 0.5  # a random change mostly lies outside the spectral subspace
    # the applied error closed form agrees with building the matrix (including ReLU clamping)
    big = -(U * (S + 1.0)) @ Vh  # pushes every sigma below 0
    d, st = X.project_weight_delta(U, S, Vh, big)
    applied = (U * (torch.relu(S + d.double()) - S)) @ Vh
    assert st["clamped"] == 7
    assert abs(st["applied_error"] - float(((big - applied) ** 2).sum())) < 1e-6


def test_lora_factors_exact_and_truncation_error():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W.reshape(6, -1), full_matrices=False)
    delta = torch.randn(6, generator=g, dtype=torch.float64) * 0.5
    up, down, st = X.lora_factors(U, S, Vh, delta, W.shape, rank=0)
    assert up.shape == (6, st["rank"], 1, 1) and down.shape == (st["rank"], 3, 3, 3)
    full = (U * (torch.relu(S + delta) - S)) @ Vh
    got = up.flatten(1).double() @ down.flatten(1).double()
    assert torch.allclose(got, full, atol=1e-5) and st["error"] == 0
    up, down, st = X.lora_factors(U, S, Vh, delta, W.shape, rank=2)
    got = up.flatten(1).double() @ down.flatten(1).double()
    err = float((full - got).norm() / full.norm())
    assert abs(err - st["error"]) < 1e-5 and st["rank"] == 2
    # rank larger than the matrix: clamped, exact
    up, down, st = X.lora_factors(U, S, Vh, delta, W.shape, rank=50)
    assert st["rank"] == st["full_rank"] <= 6 and st["error"] == 0


# ---------------------------------------------------------------- LoRA <-> shift (nodes)
KEY_K = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def test_from_lora_node_in_basis_exact_and_random_kept_fraction(tiny):
    from svdiff_testkit.comfy_env import pack_module
    import folder_paths

    mp, clip = tiny
    NX = pack_module("nodes.interchange")
    node = pack_module("nodes.arithmetic").SVDiffFromLoRA
    W = NX.base_weight(mp, KEY_K).detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = 3
    c = torch.tensor([0.05, -0.03, 0.02], dtype=torch.float64)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = {f"{name}.lora_up.weight": (U[:, :r] * c).float().contiguous(), f"{name}.lora_down.weight": Vh[:r].float().contiguous(),
          f"{name}.alpha": torch.tensor(float(r))}
    d = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, "in_basis.safetensors"))
    folder_paths.filename_list_cache.pop("loras", None)
    shift, report = node.execute(model=mp, lora_name="in_basis.safetensors", strength=1.0).args
    assert list(shift.deltas) == [KEY_K]
    expect = torch.zeros(S.shape[0], dtype=torch.float64)
    expect[:r] = c
    assert torch.allclose(shift.deltas[KEY_K].double(), expect, atol=2e-4)  # U, V of the SVD cache are float16
    assert shift.metadata["conversion_report"]["kept_fraction"] > 0.999
    assert "kept 99.9" in report or "kept 100.00%" in report
    # a random LoRA given as LORA_MODEL: the kept fraction is the projection's
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(W.shape[0], 2, generator=g) * 0.1, torch.randn(2, W.shape[1], generator=g) * 0.1
    lora = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    shift, report = node.execute(model=mp, lora_name="(none)", lora=lora, strength=1.0).args
    dW = up.double() @ down.double()
    P = torch.diagonal(U.t() @ dW @ Vh.t())
    frac = float((P ** 2).sum() / (dW ** 2).sum())
    assert abs(shift.metadata["conversion_report"]["kept_fraction"] - frac) < 2e-3 * max(frac, 1e-3) + 1e-4
    assert torch.allclose(shift.deltas[KEY_K].double(), P, atol=2e-4)


def test_export_as_lora_loads_in_loraloader_with_nearly_same_weights(tiny):
    from svdiff_testkit.comfy_env import pack_module
    import comfy.model_management as mm
    import nodes as comfy_nodes

    mp, clip = tiny
    NX = pack_module("nodes.interchange")
    shifts_mod = pack_module("nodes.shifts")
    node = pack_module("nodes.arithmetic").SVDiffToLoRA
    g = torch.Generator().manual_seed(9)
    ushapes = {k: tuple(v.shape) for k, v in mp.model.state_dict().items() if k.endswith(".weight") and k.startswith("diffusion_model.")}
    keys = [k for k in ushapes if ".attn2." in k or ".norm" in k or "proj_in" in k or k.endswith("input_blocks.0.0.weight")]
    cshapes = {k: tuple(v.shape) for k, v in clip.patcher.model.state_dict().items() if "layers.0." in k and k.endswith(".weight")}
    allshapes = {**{k: ushapes[k] for k in keys}, **cshapes}
    deltas = {k: torch.randn(delta_length(s), generator=g) * (0.05 if len(s) > 1 else 0.02) for k, s in allshapes.items()}
    shift = SpectralShift(deltas, allshapes, {"architecture": "TinySD"})
    path, report = node.execute(shift=shift, model=mp, clip=clip, rank=0, filename_prefix="svdiff/export", folder="models/loras").args
    assert os.path.isfile(path) and "relative Frobenius error 0" in report
    rel = os.path.relpath(path, comfy_nodes.folder_paths.get_folder_paths("loras")[0])
    m_l, c_l = comfy_nodes.LoraLoader().load_lora(mp, clip, rel, 1.0, 1.0)
    assert len(m_l.patches) == len(keys) and len(c_l.patcher.patches) == len(cshapes)
    m_s, c_s = shifts_mod.apply_shift("t", mp, clip, shift, 1.0, 1.0, "shift")
    mm.load_models_gpu([m_l], force_full_load=True)
    lw = {k: m_l.model.state_dict()[k].clone() for k in keys}
    mm.load_models_gpu([m_s], force_full_load=True)
    sw = {k: m_s.model.state_dict()[k].clone() for k in keys}
    for k in keys:
        base = NX.base_weight(mp, k)
        change = (sw[k] - base).norm()
        assert change > 0
        assert (lw[k] - sw[k]).norm() <= 1e-3 * change + 1e-6, k
    mm.load_models_gpu([c_l.patcher], force_full_load=True)
    lc = {k: c_l.patcher.model.state_dict()[k].clone() for k in cshapes}
    mm.load_models_gpu([c_s.patcher], force_full_load=True)
    for k in cshapes:
        # float16 weights: the LoRA's product and the shift's residual (formed through the weight)
        # round apart by at most one float16 step
        got, want = lc[k].float(), c_s.patcher.model.state_dict()[k].float()
        assert ((got - want).abs() <= want.abs() * torch.finfo(torch.float16).eps + 1e-4).all(), k
    # truncated export reports the error it makes; never overwrites
    path2, report2 = node.execute(shift=shift, model=mp, clip=clip, rank=1, filename_prefix="svdiff/export", folder="models/loras").args
    assert path2 != path and os.path.isfile(path)
    err = float(report2.split("relative Frobenius error ")[1].split(" ")[0])
    assert 0 < err < 1
    mm.unload_all_models()
