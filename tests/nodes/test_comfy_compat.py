"""One test per touch point of ``nodes/comfy_compat.py``, run on every supported ComfyUI.

Each test exercises the real ComfyUI internal the shim wraps (tiny SD1-style model, CPU)
and checks the behaviour the pack relies on, so a ComfyUI release that changes one of them
fails here, by name, before it fails somewhere inside a node.
"""

from __future__ import annotations

import os

import pytest
import torch

from svdiff_testkit import comfy_env

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture()
def compat(comfy):
    return comfy_env.pack_module("nodes.comfy_compat")


def _diff_patched_clone(mp, key=KEY, value=0.25):
    m2 = mp.clone()
    w = mp.model.state_dict()[key]
    assert m2.add_patches({key: ("diff", (torch.full_like(w, value),))}, 1.0) == [key]
    return m2, w.detach().clone()


def test_version_under_test_is_reported(comfy):
    v = comfy_env.comfy_version(comfy["comfy_path"])
    assert v != "unknown"
    print(f"[compat] ComfyUI under test: {v} at {comfy['comfy_path']}")


def test_unload_patcher_restores_weights_and_forgets_the_model(compat, tiny):
    import comfy.model_management as mm

    mp, _ = tiny
    m2, w0 = _diff_patched_clone(mp)
    mm.load_models_gpu([m2], force_full_load=True)
    assert compat.is_loaded(m2)
    assert torch.allclose(m2.model.state_dict()[KEY], w0 + 0.25)
    assert compat.unload_patcher(m2) is True
    assert not compat.is_loaded(m2)
    assert torch.equal(mp.model.state_dict()[KEY], w0)
    assert compat.unload_patcher(m2) is False  # not loaded any more: only detached


def test_base_weight_is_the_unpatched_weight_while_a_clone_is_loaded(compat, tiny):
    import comfy.model_management as mm

    mp, _ = tiny
    m2, w0 = _diff_patched_clone(mp)
    assert torch.equal(compat.base_weight(m2, KEY), w0)  # nothing loaded yet: the module's own
    mm.load_models_gpu([m2], force_full_load=True)
    try:
        assert not torch.equal(m2.model.state_dict()[KEY], w0)
        assert torch.equal(compat.base_weight(m2, KEY), w0)
        assert torch.equal(compat.base_weight(mp, KEY), w0)  # the backup is shared by clones
    finally:
        compat.unload_patcher(m2)


def test_patch_lists_version_and_callbacks(compat, tiny):
    from comfy.patcher_extension import CallbacksMP

    mp, _ = tiny
    before = compat.patches_version(mp)
    m2, _ = _diff_patched_clone(mp)
    assert compat.patches_version(m2) != before
    assert [p[1][0] for p in compat.key_patches(m2, KEY)] == ["diff"]
    assert compat.key_patches(mp, KEY) == []
    assert list(compat.all_key_patches(m2)) == [KEY]
    assert not compat.has_callback(m2, CallbacksMP.ON_LOAD, "svdiff_compat_test")
    m2.add_callback_with_key(CallbacksMP.ON_LOAD, "svdiff_compat_test", lambda *a: None)
    assert compat.has_callback(m2, CallbacksMP.ON_LOAD, "svdiff_compat_test")
    assert not compat.has_callback(mp, CallbacksMP.ON_LOAD, "svdiff_compat_test")


def test_plain_patchers_are_not_dynamic(compat, tiny):
    mp, _ = tiny
    assert compat.is_dynamic(mp) is False

    class Dyn:
        def is_dynamic(self):
            return True

    assert compat.is_dynamic(Dyn()) is True


def test_lowvram_patches_are_found_and_merged_once(compat, tiny):
    mp, _ = tiny
    m2, w0 = _diff_patched_clone(mp)
    m2.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False, full_load=False)
    try:
        name = KEY[: -len(".weight")]
        mod = dict(m2.model.named_modules())[name]
        found = compat.lowvram_patches(mod, KEY)
        assert len(found) == 1, "ComfyUI left no per-forward patch on a module that did not fit"
        counter = m2.model.lowvram_patch_counter
        assert compat.merge_lowvram_weight(m2, mod, KEY) == 1
        assert compat.lowvram_patches(mod, KEY) == []
        assert m2.model.lowvram_patch_counter == counter - 1
        assert torch.allclose(mod.weight, w0 + 0.25)
    finally:
        m2.unpatch_model()
    assert torch.equal(mp.model.state_dict()[KEY], w0)


def test_layer_weight_bias_casts_like_comfyui_and_never_copies_plain_layers(compat):
    import comfy.ops

    plain = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    w, b = compat.layer_weight_bias(plain, x)
    assert w is plain.weight and b is plain.bias
    cast = comfy.ops.manual_cast.Linear(4, 3, dtype=torch.float16)
    with torch.no_grad():
        cast.weight.copy_(torch.randn(3, 4))
        cast.bias.copy_(torch.randn(3))
    w, b = compat.layer_weight_bias(cast, x)
    assert w.dtype == torch.float32 and b.dtype == torch.float32
    assert torch.equal(w, cast.weight.float()) and torch.equal(b, cast.bias.float())


def test_model_condition_kwargs_build_the_cross_attention_input(compat, tiny):
    mp, _ = tiny
    ctx = torch.randn(1, 77, 32)
    x = torch.zeros(3, 4, 8, 8)
    kw = compat.model_condition_kwargs(mp, [ctx, {}], x)
    assert set(kw) >= {"c_crossattn"}
    assert kw["c_crossattn"].shape == (3, 77, 32)
    assert torch.equal(kw["c_crossattn"][2], ctx[0])


def test_default_attention_and_extra_options(compat):
    import comfy.ldm.modules.attention as at

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 8, generator=g) for _ in range(3))
    opts = {"n_heads": 2, "attn_precision": None, "activations_shape": [2, 8, 4, 4]}
    ref = at.attention_basic(q, k, v, 2)
    assert torch.allclose(compat.default_attention(q, k, v, opts), ref, atol=1e-5)
    assert compat.attention_heads(opts) == 2
    assert compat.attention_map_size(opts) == (4, 4)
    assert compat.attention_map_size({"n_heads": 2}) is None


def test_attn2_replacement_sees_the_options_the_capture_reads(compat, tiny):
    """The attn2 replacement hook is still called with n_heads and the block's activation shape."""
    import comfy.model_management as mm

    mp, _ = tiny
    m2 = mp.clone()
    seen = []

    def patch(q, k, v, extra_options):
        seen.append((compat.attention_heads(extra_options), compat.attention_map_size(extra_options)))
        return compat.default_attention(q, k, v, extra_options)

    m2.set_model_attn2_replace(patch, "input", 1, 0)
    mm.load_models_gpu([m2], force_full_load=True)
    with torch.no_grad():
        m2.model.apply_model(torch.randn(1, 4, 16, 16), torch.tensor([5.0]), c_crossattn=torch.randn(1, 77, 32),
                             transformer_options=m2.model_options["transformer_options"])
    assert seen == [(2, (16, 16))]


def test_clip_word_tokenizer_reads_bpe_word_ends(compat, tiny):
    _, clip = tiny
    hf, start = compat.clip_word_tokenizer(clip)
    assert hf is not None and start == 49406
    ids = hf("a sks dog", add_special_tokens=False)["input_ids"]
    toks = hf.convert_ids_to_tokens(ids)
    assert toks and all(isinstance(t, str) for t in toks) and toks[-1] == "dog</w>"


def test_model_folder_registration_and_listing_refresh(compat, comfy, tmp_path):
    import folder_paths

    d = tmp_path / "svdiff_compat_folder"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"x")
    (d / "ignored.txt").write_bytes(b"x")
    compat.register_model_folder("svdiff_compat_test", str(d), {".safetensors"})
    compat.register_model_folder("svdiff_compat_test", str(d), {".safetensors"})  # idempotent
    assert folder_paths.get_folder_paths("svdiff_compat_test") == [str(d)]
    assert folder_paths.get_filename_list("svdiff_compat_test") == ["a.safetensors"]
    (d / "b.safetensors").write_bytes(b"x")
    os.utime(d, (1, 1))  # same folder mtime as far as the listing cache can tell
    compat.forget_file_list("svdiff_compat_test")
    assert folder_paths.get_filename_list("svdiff_compat_test") == ["a.safetensors", "b.safetensors"]


def test_prediction_kinds_and_ve_test_by_method_identity(compat):
    import comfy.model_sampling as ms

    def make(kind):
        class M(ms.ModelSamplingDiscrete, kind):
            pass

        return M()

    assert compat.prediction_kind(make(ms.EPS)) == "eps"
    assert compat.prediction_kind(make(ms.V_PREDICTION)) == "v"

    class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    assert compat.prediction_kind(Flow()) == "flow"
    assert compat.is_ve_eps_or_v(make(ms.EPS)) and compat.is_ve_eps_or_v(make(ms.V_PREDICTION))
    assert not compat.is_ve_eps_or_v(Flow())
    if hasattr(ms, "X0"):
        assert compat.prediction_kind(make(ms.X0)) == "x0"
        assert not compat.is_ve_eps_or_v(make(ms.X0))


def test_is_flow_and_flow_noise_scale(compat, comfy):
    """``is_flow``: CONST with CONST's own methods (SD3's and Flux's model sampling, and the
    shift nodes' patches); not eps/v, not 0.33's IMG_TO_IMG_FLOW.  ``flow_noise_scale``: 0.33's
    ``noise_scale`` (1 unless set), 1 on 0.3.75."""
    import comfy.model_sampling as ms
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3
    from svdiff_testkit import tiny as tiny_mod

    class SD3Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    class FluxFlow(ms.ModelSamplingFlux, ms.CONST):
        pass

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    assert compat.is_flow(SD3Flow()) and compat.is_flow(FluxFlow()) and not compat.is_flow(Eps())
    mp, _ = tiny_mod.build(seed=0)
    for patched in (ModelSamplingSD3().patch(mp, 3.0)[0], ModelSamplingFlux().patch(mp, 1.15, 0.5, 64, 64)[0]):
        m = patched.get_model_object("model_sampling")
        assert compat.is_flow(m) and compat.flow_noise_scale(m) == 1.0
    if hasattr(ms, "IMG_TO_IMG_FLOW"):
        class Img(ms.ModelSamplingDiscreteFlow, ms.IMG_TO_IMG_FLOW):
            pass

        assert not compat.is_flow(Img())
    f = SD3Flow()
    if hasattr(f, "set_noise_scale"):  # 0.33
        f.set_noise_scale(8.0)
        assert compat.flow_noise_scale(f) == 8.0
        x, n = torch.zeros(1, 2), torch.ones(1, 2)
        assert torch.equal(f.noise_scaling(torch.tensor([1.0]), n, x), n * compat.flow_noise_scale(f))
    else:
        print("flow_noise_scale: this ComfyUI has no CONST.noise_scale (0.33 adds it); 1.0 is checked")
        assert not hasattr(f, "noise_scale") and compat.flow_noise_scale(f) == 1.0


def test_lora_key_maps_apply_and_patched_weight_agree(compat, tiny):
    mp, clip = tiny
    unet_map, te_map = compat.lora_key_maps(mp, clip)
    name = next(n for n, k in unet_map.items() if k == KEY and n.startswith("lora_unet_"))
    assert any(k.startswith("clip_l.") for k in te_map.values())
    w = mp.model.state_dict()[KEY].float()
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
    sd = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    m2, _ = compat.apply_lora(mp, None, sd, 0.5)
    plist = compat.key_patches(m2, KEY)
    assert len(plist) == 1
    got = compat.patched_weight(plist, w.clone(), KEY)
    assert torch.allclose(got, w + 0.5 * up @ down, atol=1e-5)


def test_diffusers_unet_key_map_covers_attention_weights(compat, tiny):
    mp, _ = tiny
    m = compat.diffusers_unet_key_map(mp.model.model_config.unet_config)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in m
    assert m["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == KEY[len("diffusion_model."):]


def test_shift_adapter_follows_comfyui_adapter_conventions(comfy, tiny):
    """SpectralShiftAdapter is rebuilt as type(a)(a.loaded_keys, a.weights) (0.33 does so when it
    prefetches low-VRAM patches) and accepts extra calculate_weight arguments."""
    import comfy.lora

    adapter_mod = comfy_env.pack_module("nodes.adapter")
    import svdiff.decompose as D

    mp, _ = tiny
    w = mp.model.state_dict()[KEY].detach().float().clone()
    dec = D.decompose(w, algorithm="svd", storage_dtype=torch.float32)
    a = adapter_mod.SpectralShiftAdapter.build(torch.linspace(-0.2, 0.3, dec.rank), dec, tuple(w.shape))
    b = type(a)(a.loaded_keys, a.weights)
    ref = a.calculate_weight(w.clone(), KEY, 1.0, 1.0, None, None)
    assert torch.equal(b.calculate_weight(w.clone(), KEY, 1.0, 1.0, None, None, torch.float32, None, "extra", flag=True), ref)
    prefetch = getattr(comfy.lora, "prefetch_prepared_value", None)
    if prefetch is not None:  # 0.33's low-VRAM preparation path
        c = prefetch(a, [0], None, None, False)
        assert isinstance(c, type(a)) and torch.equal(c.calculate_weight(w.clone(), KEY, 1.0, 1.0, None, None), ref)
    assert torch.equal(comfy.lora.calculate_weight([(1.0, a, 1.0, None, None)], w.clone(), KEY), ref)


def test_training_clone_is_an_ordinary_clone_and_asks_dynamic_patchers_for_one(compat, tiny):
    mp, clip = tiny
    m2 = compat.training_clone(mp)
    assert m2 is not mp and m2.model is mp.model and not compat.is_dynamic(m2)
    c2 = compat.training_clone(clip)
    assert c2 is not clip and c2.patcher.model is clip.patcher.model

    class Dynamic:
        """0.33's ModelPatcherDynamic as far as training_clone can tell."""

        def __init__(self):
            self.calls = []

        def is_dynamic(self):
            return True

        def clone(self, disable_dynamic=False):
            self.calls.append(disable_dynamic)
            return "ordinary" if disable_dynamic else "dynamic"

    d = Dynamic()
    assert compat.training_clone(d) == "ordinary" and d.calls == [True]


def test_shift_adapter_leaves_strength_model_to_comfyui(comfy, tiny):
    """comfy.lora.calculate_weight scales the weight by strength_model before it calls an
    adapter: the adapter must not scale it again."""
    import comfy.lora
    import svdiff.decompose as D

    adapter_mod = comfy_env.pack_module("nodes.adapter")
    mp, _ = tiny
    w = mp.model.state_dict()[KEY].detach().float().clone()
    dec = D.decompose(w, algorithm="svd", storage_dtype=torch.float32)
    zero = adapter_mod.SpectralShiftAdapter.build(torch.zeros(dec.rank), dec, tuple(w.shape))
    got = comfy.lora.calculate_weight([(1.0, zero, 0.5, None, None)], w.clone(), KEY)
    assert torch.allclose(got, 0.5 * w, atol=1e-6)


def test_metadata_disabled_reads_comfyuis_disable_metadata_flag(compat, monkeypatch):
    from comfy.cli_args import args

    assert hasattr(args, "disable_metadata")
    monkeypatch.setattr(args, "disable_metadata", False)
    assert compat.metadata_disabled() is False
    monkeypatch.setattr(args, "disable_metadata", True)
    assert compat.metadata_disabled() is True


def test_training_mode_sets_comfys_in_training_flag_where_it_exists(compat):
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        with compat.training_mode() as active:
            assert active is False
        pytest.skip("this ComfyUI has no model_management.in_training flag (0.3.75): nothing to set")
    assert mm.in_training is False
    with compat.training_mode() as active:
        assert active is True and mm.in_training is True
    assert mm.in_training is False
    try:
        with compat.training_mode():
            raise RuntimeError("a failed step")
    except RuntimeError:
        pass
    assert mm.in_training is False  # restored after an error too


def test_flux_rope_is_differentiable_in_training_mode(compat):
    """0.33's Flux RoPE goes through comfy-kitchen (no autograd) unless in_training is set."""
    import comfy.ldm.flux.math as fm

    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    pe = fm.rope(torch.arange(4.0)[None, :], 8, 10000)[:, None]
    with compat.training_mode():
        out, _ = fm.apply_rope(q, q, pe)
        out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
# --------------------------------------------------------------------------------------
# Weight formats and cast functions (precision)
# --------------------------------------------------------------------------------------
def _formats():
    from svdiff_testkit import quantized

    return quantized


QKEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8_e4m3fn", "scaled_fp8", "float8_e4m3fn", "nvfp4", "int8_tensorwise"])
def test_dense_weight_and_stored_weight_per_format(compat, fmt):
    """dense_weight: the stored tensor itself for plain math dtypes (fingerprints unchanged),
    the dequantised float32 weight (what the LoRA path patches) otherwise; stored_weight gives
    the logical shape of packed quantized storage; weight_format names the format."""
    Q = _formats()
    reason = Q.missing(fmt)
    if reason:
        pytest.skip(f"{fmt}: {reason}")
    mp, ref = Q.build(fmt), Q.build("fp32")
    w = compat.base_weight(mp, QKEY)
    dense = compat.dense_weight(mp, QKEY)
    ref_w = compat.base_weight(ref, QKEY)
    if fmt in ("fp32", "bf16"):
        assert dense is w and not compat.is_quantized(w)
    else:
        assert dense.dtype == torch.float32 and tuple(dense.shape) == tuple(ref_w.shape)
    err = float((dense.float() - ref_w).norm() / ref_w.norm())
    assert err < 0.25, err  # the stored format's own rounding, not a missing scale
    sd = mp.model.state_dict()
    assert tuple(compat.stored_weight(mp.model, QKEY, sd[QKEY]).shape) == tuple(ref_w.shape)
    name = compat.weight_format(mp, QKEY)
    print(f"[compat] {fmt}: weight_format {name!r}, dequantised error {err:.4f}")
    assert name and (compat.is_quantized(w) == ("Layout" in name))


def test_layer_weight_bias_in_float32_and_cast_functions(compat):
    """layer_weight_bias(dtype=float32) gives a bf16 layer's weight and bias in float32 through
    ComfyUI's cast; cast functions run on that cast and come off again by identity, leaving
    the class-level lists alone."""
    Q = _formats()
    mp = Q.build("bf16")
    mod = mp.get_model_object("diffusion_model.input_blocks.1.0.in_layers.0")
    x = torch.randn(1, mod.num_channels, 4, 4).bfloat16()
    w, b = compat.layer_weight_bias(mod, x, dtype=torch.float32)
    assert w.dtype == b.dtype == torch.float32 and torch.equal(w, mod.weight.float())
    shared = type(mod).weight_function
    seen = []
    wf = lambda t: (seen.append(t.dtype), t.float() * 2)[1]  # noqa: E731
    bf = lambda t: t.float()  # noqa: E731
    assert compat.add_cast_functions(mod, wf, bf)
    w2, b2 = compat.layer_weight_bias(mod, x)
    assert seen == [torch.bfloat16] and w2.dtype == torch.float32 and torch.equal(w2, mod.weight.float() * 2)
    assert b2.dtype == torch.float32
    out = mod(x)  # ComfyUI's own forward takes the cast functions: a bf16 input with float32 affine parameters
    assert out.dtype == torch.bfloat16
    compat.remove_cast_functions(mod, wf, bf)
    assert list(mod.weight_function) == [] and list(mod.bias_function) == [] and type(mod).weight_function is shared == []
    assert not compat.add_cast_functions(torch.nn.GroupNorm(2, 4), wf)
    assert compat.compute_dtype_of(mp, mod) == torch.bfloat16
    assert compat.compute_dtype_of(Q.build("fp8_e4m3fn"), mod) == torch.float32  # manual cast: fp8 stored, fp32 compute




# --------------------------------------------------------------------------------------
# Joint attention of DiTs (the attention losses on SD3 and Flux)
# --------------------------------------------------------------------------------------
def _family(name: str):
    """(ModelPatcher on the CPU, CLIP) of a tiny family in ComfyUI's own classes."""
    import comfy.model_patcher
    from svdiff_testkit import families

    families.register(name)
    model, clip = families.build(name)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")), clip


def _dit_forward(mp, clip, hw=(8, 8)):
    with torch.no_grad():
        entry = clip.encode_from_tokens_scheduled(clip.tokenize("photo of a sks dog"), show_pbar=False)[0]
        x = torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(0))
        kw = comfy_env.pack_module("nodes.comfy_compat").model_condition_kwargs(mp, entry, x)
        out = mp.model.apply_model(x, torch.tensor([0.5]), transformer_options=mp.model_options.get("transformer_options", {}), **kw)
    return out, entry[0].shape[1]


@pytest.mark.parametrize("name", ["SD3", "Flux"])
def test_dit_joint_blocks_are_the_keys_the_dit_forwards_replace(compat, comfy, name):
    """Each listed (block_name, i) is looked up by the forward in patches_replace["dit"], once per
    forward, with txt/img of the text-first layout; the patch size gives the token grid."""
    import comfy.model_management as mm

    mp, clip = _family(name)
    dm = mp.model.diffusion_model
    blocks = compat.dit_joint_blocks(dm)
    assert blocks and all(b.text_first for b in blocks)
    if name == "SD3":
        assert [(b.name, b.index) for b in blocks] == [("double_block", i) for i in range(len(dm.joint_blocks))]
        assert all(b.registers == dm.register_length for b in blocks)
    else:
        assert {b.name for b in blocks} == {"double_block", "single_block"}
        assert sum(b.name == "single_block" for b in blocks) == len(dm.single_blocks)
    assert compat.dit_patch_size(dm) == (2, 2)
    m2 = mp.clone()
    calls = []

    def make(key):
        def replace(args, extra):
            calls.append((key, tuple(args["img"].shape), None if args.get("txt") is None else tuple(args["txt"].shape)))
            return extra["original_block"](args)
        return replace

    for b in blocks:
        m2.set_model_patch_replace(make((b.name, b.index)), "dit", b.name, b.index)
    mm.load_models_gpu([mp], force_full_load=True)
    ref, n_txt = _dit_forward(mp, clip, (8, 12))
    mm.load_models_gpu([m2], force_full_load=True)
    out, _ = _dit_forward(m2, clip, (8, 12))
    assert torch.equal(out, ref)
    assert [c[0] for c in calls] == [(b.name, b.index) for b in blocks]
    n_img = (8 // 2) * (12 // 2)
    for key, img, txt in calls:
        if key[0] == "single_block":
            assert txt is None and img[1] == n_txt + n_img  # cat(txt, img)
        else:
            assert txt[1] == n_txt + (blocks[0].registers if name == "SD3" else 0) and img[1] == n_img
    assert compat.dit_joint_blocks(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("name", ["SD3", "Flux"])
def test_attention_override_gets_the_joint_q_k_and_chains(compat, comfy, name):
    """transformer_options' optimized_attention_override is called by the DiT attention with the
    joint q and k (attention_qk gives them as [B, heads, L, d]); the output is unchanged when it
    runs ComfyUI's function, and an override already there still runs."""
    import comfy.model_management as mm

    assert compat.attention_override_supported()
    mp, clip = _family(name)
    mm.load_models_gpu([mp], force_full_load=True)
    ref, n_txt = _dit_forward(mp, clip)
    seen, earlier = [], []

    def first(func, *args, **kwargs):
        earlier.append(1)
        return func(*args, **kwargs)

    def mine(run, *args, **kwargs):
        q, k, mask = compat.attention_qk(args, kwargs)
        seen.append((tuple(q.shape), tuple(k.shape), mask))
        return run(*args, **kwargs)

    m2 = mp.clone()
    to = m2.model_options.setdefault("transformer_options", {})
    to[compat.ATTENTION_OVERRIDE] = first
    m2.model_options["transformer_options"] = compat.with_attention_override(to, mine)
    assert to[compat.ATTENTION_OVERRIDE] is first, "a copy: the dict given is not changed"
    mm.load_models_gpu([m2], force_full_load=True)
    out, _ = _dit_forward(m2, clip)
    assert torch.allclose(out, ref, atol=1e-6)
    dm = mp.model.diffusion_model
    heads = dm.joint_blocks[0].x_block.attn.num_heads if name == "SD3" else dm.double_blocks[0].num_heads
    L = n_txt + 16 + (dm.register_length if name == "SD3" else 0)
    assert seen and len(earlier) == len(seen)
    assert all(q[:3] == (1, heads, L) and k[:3] == (1, heads, L) and m is None for q, k, m in seen), seen


def test_text_encoder_presence_and_the_t5_piece_tokenizer(compat, comfy, tiny):
    _, sd3_clip = _family("SD3")
    _, flux_clip = _family("Flux")
    _, sd1_clip = tiny
    assert all(compat.text_encoder_present(sd3_clip, n) for n in ("clip_l", "clip_g", "t5xxl"))
    assert compat.text_encoder_present(flux_clip, "t5xxl") and not compat.text_encoder_present(flux_clip, "clip_g")
    assert not compat.text_encoder_present(sd1_clip, "t5xxl")
    assert compat.t5_piece_tokenizer(sd1_clip) is None
    for clip in (sd3_clip, flux_clip):
        hf = compat.t5_piece_tokenizer(clip)
        ids = [int(t[0]) for chunk in clip.tokenize("a sks dog")["t5xxl"] for t in chunk]
        pieces = hf.convert_ids_to_tokens(ids)
        assert pieces[0].startswith("\u2581") and "\u2581dog" in pieces  # word starts carry "\u2581"
