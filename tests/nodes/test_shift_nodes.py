"""Load / Apply / Save Spectral Shift in the real ComfyUI (tiny SD1-style model)."""

import os

import pytest
import torch

import svdiff.shiftfile as F
from svdiff.shift import SpectralShift, delta_length
from svdiff_testkit.probes import unet_forward


def clip_out(clip, text="a photo of a sks dog"):
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=False).clone()


def make_shift(mp, clip=None, scale=0.3, seed=1, unet_keys=None):
    from svdiff_testkit.comfy_env import pack_module

    ad = pack_module("nodes.adapter")
    shapes = ad.shiftable_shapes(mp, "diffusion_model.")
    if unet_keys is not None:
        shapes = {k: shapes[k] for k in unet_keys}
    if clip is not None:
        shapes.update(ad.shiftable_shapes(clip.patcher))
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(delta_length(s), generator=g) * scale for k, s in shapes.items()}
    return SpectralShift(deltas, shapes, {"architecture": ad.architecture_of(mp), "subset": "UNet"})


def node(comfy, nid):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[nid]


def test_save_then_load_gives_the_same_patched_weights_and_lists_without_restart(comfy, tiny, shift_dir):
    import folder_paths

    mp, clip = tiny
    sh = make_shift(mp, clip)
    Save, Load, Apply = (node(comfy, n) for n in ("SVDiffSaveShift", "SVDiffLoadShift", "SVDiffApplyShift"))
    out = Save.execute(shift=sh, filename_prefix="tests/roundtrip", dtype="float32")
    path = out.args[0]
    assert os.path.dirname(path).startswith(shift_dir) and path.endswith("_00001_.safetensors")
    name = os.path.relpath(path, shift_dir)
    assert name in folder_paths.get_filename_list("svdiff")
    again = Save.execute(shift=sh, filename_prefix="tests/roundtrip", dtype="float32").args[0]
    assert again != path and again.endswith("_00002_.safetensors")  # never overwritten

    m_file, c_file, sh_file = Load.execute(model=mp, clip=clip, shift_name=name, strength_model=1.0, strength_clip=1.0).args
    m_val, c_val = Apply.execute(model=mp, clip=clip, shift=sh, strength_model=1.0, strength_clip=1.0).args
    assert torch.equal(unet_forward(m_file), unet_forward(m_val))
    assert torch.equal(clip_out(c_file), clip_out(c_val))
    assert not torch.equal(clip_out(c_file), clip_out(clip))
    assert set(sh_file.keys()) == set(sh.keys())


def test_float16_storage_changes_outputs_within_tolerance(comfy, tiny, shift_dir):
    mp, clip = tiny
    sh = make_shift(mp, scale=0.3)
    Save, Load = node(comfy, "SVDiffSaveShift"), node(comfy, "SVDiffLoadShift")
    p16 = Save.execute(shift=sh, filename_prefix="tests/fp16", dtype="float16").args[0]
    p32 = Save.execute(shift=sh, filename_prefix="tests/fp32", dtype="float32").args[0]
    o16 = unet_forward(Load.execute(model=mp, shift_name=os.path.relpath(p16, shift_dir), strength_model=1.0, strength_clip=1.0).args[0])
    o32 = unet_forward(Load.execute(model=mp, shift_name=os.path.relpath(p32, shift_dir), strength_model=1.0, strength_clip=1.0).args[0])
    base = unet_forward(mp)
    # float16 keeps delta to 2^-11 relative; the output moves by a tiny fraction of what the shift itself moves it
    effect = (o32 - base).abs().max()
    assert effect > 1e-3
    assert (o16 - o32).abs().max() < 2e-3 * effect + 1e-6


def test_strength_zero_is_identity_and_base_model_untouched(comfy, tiny):
    mp, clip = tiny
    base = unet_forward(mp)
    base_clip = clip_out(clip)
    Apply = node(comfy, "SVDiffApplyShift")
    sh = make_shift(mp, clip)
    m0, c0 = Apply.execute(model=mp, clip=clip, shift=sh, strength_model=0.0, strength_clip=0.0).args
    assert torch.equal(unet_forward(m0), base) and torch.equal(clip_out(c0), base_clip)
    m1, c1 = Apply.execute(model=mp, clip=clip, shift=sh, strength_model=1.0, strength_clip=1.0).args
    assert not torch.equal(unet_forward(m1), base)
    clip_out(c1)
    assert torch.equal(unet_forward(mp), base) and torch.equal(clip_out(clip), base_clip)
    assert mp.patches == {} and clip.patcher.patches == {}


def _lora_for(mp, keys, rank=2, seed=5):
    """A LoRA state dict in ComfyUI's 'diffusion_model.X.lora_up/down' layout, loaded by comfy.sd."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    shapes = mp.model.state_dict()
    for k in keys:
        w = shapes[k]
        base = k[: -len(".weight")]
        out_f, in_f = w.shape[0], w[0].numel()
        sd[f"{base}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        sd[f"{base}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
    return sd


def test_stacks_with_a_lora_in_either_order(comfy, tiny):
    import comfy.sd

    mp, clip = tiny
    keys = [k for k in mp.model.state_dict() if k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight")]
    lora = _lora_for(mp, keys)
    sh = make_shift(mp, unet_keys=keys, scale=0.3)
    Apply = node(comfy, "SVDiffApplyShift")
    base = unet_forward(mp)
    lora_only, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0.0)
    a, _ = comfy.sd.load_lora_for_models(Apply.execute(model=mp, shift=sh, strength_model=1.0, strength_clip=1.0).args[0], None, lora, 1.0, 0.0)
    b = Apply.execute(model=lora_only, shift=sh, strength_model=1.0, strength_clip=1.0).args[0]
    oa, ob, ol = unet_forward(a), unet_forward(b), unet_forward(lora_only)
    assert not torch.equal(ol, base) and not torch.allclose(oa, ol)
    # both orders add the same two residuals to the same base weight
    assert torch.allclose(oa, ob, atol=1e-5)
    assert torch.equal(unet_forward(mp), base)


def test_load_node_errors_name_the_node_and_file(comfy, tiny, shift_dir):
    mp, clip = tiny
    Load = node(comfy, "SVDiffLoadShift")
    with pytest.raises(Exception, match=r"\[Load Spectral Shift\].*nope.safetensors"):
        Load.execute(model=mp, shift_name="nope.safetensors", strength_model=1.0, strength_clip=1.0)
    bad = os.path.join(shift_dir, "tests", "garbage.safetensors")
    os.makedirs(os.path.dirname(bad), exist_ok=True)
    open(bad, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(Exception, match=r"\[Load Spectral Shift\].*garbage.safetensors.*malformed"):
        Load.execute(model=mp, shift_name="tests/garbage.safetensors", strength_model=1.0, strength_clip=1.0)
    # a shift for another architecture: shapes differ -> refused, naming the key; nothing patched
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    other = SpectralShift({k: torch.zeros(64)}, {k: (128, 64)}, {"architecture": "SD15"})
    F.save_shift(other, os.path.join(shift_dir, "tests", "other_arch.safetensors"), overwrite=True)
    with pytest.raises(Exception, match=r"other_arch.safetensors.*to_k"):
        Load.execute(model=mp, shift_name="tests/other_arch.safetensors", strength_model=1.0, strength_clip=1.0)
    foreign = SpectralShift({f"diffusion_model.zz.{i}.weight": torch.zeros(4) for i in range(3)},
                            {f"diffusion_model.zz.{i}.weight": (4, 4) for i in range(3)}, {})
    F.save_shift(foreign, os.path.join(shift_dir, "tests", "foreign.safetensors"), overwrite=True)
    with pytest.raises(Exception, match=r"only 0 of 3 keys match"):
        Load.execute(model=mp, shift_name="tests/foreign.safetensors", strength_model=1.0, strength_clip=1.0)
    assert mp.patches == {}


def test_graph_runs_through_comfyui_executor(comfy, shift_dir):
    """Checkpoint -> Load Spectral Shift -> KSampler -> VAE Decode through PromptExecutor."""
    from svdiff_testkit import tiny as tiny_mod
    from svdiff_testkit.comfy_env import run_prompt

    tiny_mod.install_checkpoint("tiny_sd.safetensors")
    mp, clip = tiny_mod.build(seed=0)
    sh = make_shift(mp, scale=0.2)
    F.save_shift(sh, os.path.join(shift_dir, "tests", "graph.safetensors"), overwrite=True)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd.safetensors"}},
        "2": {"class_type": "SVDiffLoadShift", "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": "tests/graph.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a photo of a sks dog"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                                                   "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tests/graph"}},
        "9": {"class_type": "SVDiffSaveShift", "inputs": {"shift": ["2", 2], "filename_prefix": "tests/from_graph", "dtype": "float16"}},
    }
    ex, outputs = run_prompt(prompt)
    assert ex.success, ex.status_messages
    assert outputs["8"]["images"][0]["filename"].endswith(".png")
    assert any(f.startswith("from_graph_") for f in os.listdir(os.path.join(shift_dir, "tests")))


def test_comfyui_main_starts_with_the_pack_and_no_import_failure(comfy, tmp_path):
    """ComfyUI's own start-up (main.py --quick-test-for-ci) loads the pack without IMPORT FAILED."""
    import subprocess
    import sys
    from svdiff_testkit import comfy_env

    base = comfy_env.prepare_base_dir(str(tmp_path / "base"))
    r = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", base, "--disable-auto-launch"],
                       cwd=comfy["comfy_path"], capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "ComfyUI-SVDiff" in log  # the pack was found and loaded
    bad = [l for l in log.splitlines() if "ComfyUI-SVDiff" in l and ("IMPORT FAILED" in l or "Cannot import" in l)]
    assert not bad, bad
