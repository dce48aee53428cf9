"""The attention losses (Sec. 3.3 unmix, appendix D.1 Eq. 10) on every model family.

SD2 and SDXL: the attn2 (cross-attention) capture of the UNet, including SDXL's layout (no
cross-attention at the first level) and transformer depths above 1.  SD3 (MMDiT joint blocks)
and Flux (double AND single blocks): the image-query x text-key block of the joint attention,
captured through the ``dit`` block replacements and the attention override, with the instance
and class words found in the conditioning's T5 part (and SD3's CLIP-L/G part).

Per family: the maps have the right shapes (image tokens of the latent grid / patch x the
conditioning's tokens) and rows that sum to 1, the capture leaves the model's output unchanged,
the gradient of each attention term reaches the trained deltas, and SVDiff Train runs with
unmix (a Cut-Mix set from the Cut-Mix Builder) and Eq. 10 through ComfyUI's executor and
reports a nonzero attention term.
"""

from __future__ import annotations

import pytest
import torch

from svdiff_testkit import families
from svdiff_testkit.comfy_env import cached_outputs, new_executor, pack_module, run_prompt

NAMES = list(families.FAMILIES)
PROMPT = "photo of a sks dog"


def _mp(name: str):
    import comfy.model_patcher

    model, clip = families.build(name)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")), clip


@pytest.fixture(scope="module")
def built(comfy):
    cache = {}

    def get(name):
        if name not in cache:
            families.register(name)
            cache[name] = _mp(name)
        return cache[name]

    return get


def _cond(clip, prompt: str):
    with torch.no_grad():
        return clip.encode_from_tokens_scheduled(clip.tokenize(prompt), show_pbar=False)[0]


def _latents(name: str, b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, families.FAMILIES[name].latent_channels, h, w, generator=g)


def _forward(mp, x, entry, transformer_options=None):
    data = pack_module("nodes.train.data")
    kw = data.model_kwargs(mp, entry, x)
    sigma = torch.full((x.shape[0],), 0.6 if families_is_flow(mp) else 5.0)
    to = mp.model_options.get("transformer_options", {}) if transformer_options is None else transformer_options
    return data.denoise_x0(mp, x, torch.zeros_like(x), sigma, kw, to)


def families_is_flow(mp) -> bool:
    return pack_module("nodes.comfy_compat").is_flow(mp.get_model_object("model_sampling"))


# --------------------------------------------------------------------------------------
# Which blocks, which shapes
# --------------------------------------------------------------------------------------
def _expected_blocks(name: str, mp) -> set:
    dm = mp.model.diffusion_model
    if name == "SD3":
        return {("double_block", i) for i in range(len(dm.joint_blocks))}
    if name == "Flux":
        return ({("double_block", i) for i in range(len(dm.double_blocks))}
                | {("single_block", i) for i in range(len(dm.single_blocks))})
    return {n for n, _ in dm.named_modules() if n.endswith(".attn2")}


@pytest.mark.parametrize("name", NAMES)
def test_maps_cover_every_block_with_image_by_text_shapes_and_keep_the_output(built, name):
    import comfy.model_management as mm

    cap_mod = pack_module("nodes.attention_capture")
    mp, clip = built(name)
    entry = _cond(clip, PROMPT)
    T = entry[0].shape[1]
    x = _latents(name, 2, 8, 12)  # not square: the grid comes from the latent, not from sqrt(n)
    mm.load_models_gpu([mp], force_full_load=True)
    with torch.no_grad():
        ref = _forward(mp, x, entry)
    m2 = mp.clone()
    cap = cap_mod.AttentionCapture()
    blocks = cap.install(m2)
    assert not mp.model_options.get("transformer_options", {}).get("patches_replace"), "the base is untouched"
    want = _expected_blocks(name, mp)
    if name in ("SD2", "SDXL"):
        got = {f"{'middle_block' if b[0] == 'middle' else b[0] + '_blocks'}" for b in blocks}
        assert len(blocks) == len(want) and got <= {"input_blocks", "middle_block", "output_blocks"}
    else:
        assert set(blocks) == want
    mm.load_models_gpu([m2], force_full_load=True)
    with torch.no_grad():
        out = _forward(m2, x, entry)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), "the capture leaves the model's output as it was"
    maps, shapes = cap.maps(), cap.shapes()
    assert len(maps) == len(blocks) and set(maps) == set(shapes)
    ph = pw = 1
    if name in ("SD3", "Flux"):
        ph, pw = pack_module("nodes.comfy_compat").dit_patch_size(mp.model.diffusion_model)
    for k, m in maps.items():
        h, w = shapes[k]
        assert m.shape == (2, h * w, T), (k, m.shape, T)
        assert torch.allclose(m.sum(-1), torch.ones(2, h * w), atol=1e-5), "rows: distributions over the text tokens"
        if name in ("SD3", "Flux"):
            assert (h, w) == (8 // ph, 12 // pw), "DiT image tokens: the latent grid over the patch size"
        else:
            assert w / h == 12 / 8 and 8 % h == 0
    if name == "SDXL":
        # no cross-attention at the first level: the largest map is a half of the latent
        assert max(h for h, _ in shapes.values()) == 4
    # disabled: nothing stored, the same output bit for bit as the uncaptured model
    cap.clear()
    cap.enabled = False
    with torch.no_grad():
        off = _forward(m2, x, entry)
    assert cap.maps() == {} and torch.equal(off, ref)
    # resolutions select by the map's side: every DiT block shares one grid
    sides = {min(s) for s in shapes.values()}
    m3 = mp.clone()
    only = cap_mod.AttentionCapture(resolutions={min(sides)})
    only.install(m3)
    mm.load_models_gpu([m3], force_full_load=True)
    with torch.no_grad():
        _forward(m3, x, entry)
    assert only.maps() and all(min(only.shapes()[k]) == min(sides) for k in only.maps())
    none = cap_mod.AttentionCapture(resolutions={999})
    m4 = mp.clone()
    none.install(m4)
    mm.load_models_gpu([m4], force_full_load=True)
    with torch.no_grad():
        _forward(m4, x, entry)
    assert none.maps() == {} and none.seen == sides


def test_sdxl_capture_with_transformer_depth_above_one(comfy):
    """SDXL's real layout: levels 2 and 3 hold 2 and 10 transformer blocks per SpatialTransformer;
    every transformer index is captured as its own block."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from svdiff_testkit import model_factory

    cap_mod = pack_module("nodes.attention_capture")
    families.register("SDXL")
    cfg = dict(families.FAMILIES["SDXL"].unet, transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
               transformer_depth_middle=2)
    model, clip = model_factory.build_model(families.model_class("SDXL"), cfg, 0, families.init_weights, torch.float32)
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    cap = cap_mod.AttentionCapture()
    blocks = cap.install(mp)
    assert {b[2] for b in blocks} == {0, 1}
    attn2 = [n for n, _ in model.diffusion_model.named_modules() if n.endswith(".attn2")]
    assert len(blocks) == len(attn2) and not any(n.startswith("input_blocks.1.") for n in attn2)
    entry = _cond(clip, PROMPT)
    mm.load_models_gpu([mp], force_full_load=True)
    with torch.no_grad():
        _forward(mp, _latents("SDXL", 1, 8, 8), entry)
    assert set(cap.maps()) == set(blocks)


# --------------------------------------------------------------------------------------
# Token positions per family
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_token_positions_index_the_conditioning_per_family(built, name):
    cap_mod = pack_module("nodes.attention_capture")
    _, clip = built(name)
    prompt = "photo of a sks dog and a hta sculpture, dogs"
    entry = _cond(clip, prompt)
    n = entry[0].shape[1]
    toks = clip.tokenize(prompt)
    lazily = cap_mod.token_positions(clip, prompt, "sks")  # encodes the prompt to learn the length
    for word in ("sks", "dog", "hta", "sculpture"):
        pos = cap_mod.token_positions(clip, prompt, word, n)
        assert pos and all(0 <= p < n for p in pos), (word, pos)
    assert cap_mod.token_positions(clip, prompt, "sks", n) == lazily
    assert cap_mod.token_positions(clip, prompt, "cat", n) == []
    dog, dogs = (cap_mod.token_positions(clip, prompt, w, n) for w in ("dog", "dogs"))
    assert dog and dogs and not set(dog) & set(dogs), "'dog' is not found inside 'dogs'"
    if name in ("SD3", "Flux"):
        t5 = [int(t[0]) for chunk in toks["t5xxl"] for t in chunk]
        offset = n - len(t5)
        word = [int(t[0]) for chunk in clip.tokenize("sks", return_word_ids=True)["t5xxl"] for t in chunk if t[2] != 0]
        pos = cap_mod.token_positions(clip, prompt, "sks", n)
        t5_pos = [p - offset for p in pos if p >= offset]
        assert [t5[p] for p in t5_pos] == word, "the T5 part holds the word's T5 tokens"
        if name == "Flux":
            assert offset == 0, "Flux's conditioning is T5's tokens alone"
        else:
            lg = [int(t[0]) for chunk in toks["l"] for t in chunk]
            assert offset == len(lg) == 77, "SD3: [CLIP-L/G (77), T5]"
            clip_pos = [p for p in pos if p < offset]
            word_l = [int(t[0]) for chunk in clip.tokenize("sks", return_word_ids=True)["l"] for t in chunk if t[2] != 0]
            assert clip_pos and [lg[p] for p in clip_pos] == word_l, "and the CLIP-L/G part its CLIP tokens"


# --------------------------------------------------------------------------------------
# The gradient of each attention term reaches the trained deltas
# --------------------------------------------------------------------------------------
def _attention_grads(mp, clip, name: str, term: str) -> tuple:
    """(loss, {key: grad}) of one attention term alone, with SVDiff Train's own deltas on every
    weight of the diffusion model (nodes.train.layers.Trainable, injected as in training)."""
    import comfy.model_management as mm
    import svdiff.attention as A

    layers = pack_module("nodes.train.layers")
    compat = pack_module("nodes.comfy_compat")
    adapter = pack_module("nodes.adapter")
    cap_mod = pack_module("nodes.attention_capture")
    prompt = "photo of a sks dog and a hta sculpture"
    entry = _cond(clip, prompt)
    n = entry[0].shape[1]
    pos = lambda w: cap_mod.token_positions(clip, prompt, w, n)  # noqa: E731
    m2 = compat.training_clone(mp)
    with torch.inference_mode(False):
        keys = list(adapter.shiftable_shapes(m2, adapter.UNET_PREFIX))
        tr = layers.Trainable(m2, keys, 0, torch.device("cpu"), None, "diffusion_model")
        m2.set_injections("svdiff_attention_test", [tr.injection.patcher_injection()])
        cap = cap_mod.AttentionCapture()
        cap.install(m2)
        mm.load_models_gpu([m2], force_full_load=True)
        try:
            with compat.training_mode():
                _forward(m2, _latents(name, 1, 8, 8, seed=3), entry)
                maps, shapes = cap.maps(), cap.shapes()
                if term == "unmix":
                    masks = torch.zeros(1, 2, 16, 16)
                    masks[:, 0, :, :8] = 1
                    masks[:, 1, :, 8:] = 1
                    loss = A.unmix_loss(maps, [pos("sks"), pos("hta")], masks, shapes)
                else:
                    # threshold 0.9: a tiny random model's class-word maps are nearly flat, and at
                    # 0.5 M covers a whole map (Eq. 10 is then 0 there by definition)
                    loss = A.attention_reg_loss(maps, pos("sks"), pos("dog"), 0.9)
                params = list(tr.params.items())
                grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        finally:
            compat.unload_patcher(m2)
    return loss.detach(), {k: g for (k, _), g in zip(params, grads) if g is not None and torch.count_nonzero(g) > 0}


def _attention_qk_keys(name: str, mp) -> list:
    """Weights that make the captured maps' queries and keys, per family (UNets: the first and
    the last cross-attention)."""
    if name == "Flux":
        return ["diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
                "diffusion_model.single_blocks.0.linear1.weight"]
    if name == "SD3":
        return ["diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                "diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
                "diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"]
    attn2 = [n for n, _ in mp.model.diffusion_model.named_modules() if n.endswith(".attn2")]
    return [f"diffusion_model.{n}.{p}.weight" for n in (attn2[0], attn2[-1]) for p in ("to_q", "to_k")]


@pytest.mark.parametrize("term", ["unmix", "eq10"])
@pytest.mark.parametrize("name", NAMES)
def test_attention_term_gradient_reaches_the_deltas(built, name, term):
    mp, clip = built(name)
    loss, grads = _attention_grads(mp, clip, name, term)
    assert loss > 0 and grads, (name, term, float(loss))
    missing = [k for k in _attention_qk_keys(name, mp) if k not in grads]
    assert not missing, f"{name} {term}: no gradient on the captured blocks' q/k weights {missing}"
    # nothing after the last captured block but the output layer: its deltas get no gradient
    tail = {"SD2": "diffusion_model.out.2.weight", "SDXL": "diffusion_model.out.2.weight",
            "SD3": "diffusion_model.final_layer.linear.weight", "Flux": "diffusion_model.final_layer.linear.weight"}[name]
    assert tail not in grads


# --------------------------------------------------------------------------------------
# SVDiff Train with unmix (Cut-Mix Builder) and Eq. 10 through the executor, every family
# --------------------------------------------------------------------------------------
def _train_node(model, clip, vae, prefix: str, **over) -> dict:
    inputs = {
        "model": model, "clip": clip, "vae": vae, "prompt": PROMPT, "class_prompt": "photo of a dog",
        "train_text_encoder": False, "prior_weight": 0.0, "num_prior_images": 1, "prior_steps": 2, "rank": 0, "steps": 2,
        "batch_size": 1, "learning_rate": 0.03, "learning_rate_1d": 0.001, "optimizer": "AdamW", "seed": 1,
        "resolution": 64, "gradient_checkpointing": False, "training_dtype": "auto", "side_path": "auto", "save_every": 0,
        "preview_every": 0, "filename_prefix": prefix, "resume_from": "[None]",
    }
    inputs.update(over)
    return {"class_type": "SVDiffTrain", "inputs": inputs}


def _loss_report(ex, node: str) -> dict:
    """SVDiff Train's loss map output ({"loss": [...], "denoise": [...], "unmix": [...], ...})."""
    return cached_outputs(ex, node)[3][0]


@pytest.mark.parametrize("name", NAMES)
def test_train_with_unmix_and_eq10_through_the_executor(comfy, name):
    families.register(name)
    g, M, C, V = families.loader_graph(name)
    subset = families.all_weights_subset(name)
    pre = f"svdiff/attn_{name.lower()}"
    for n, color in ((1, 0xCC3322), (2, 0x2244CC)):
        g[f"im{n}"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": color}}
    g["cm"] = {"class_type": "SVDiffCutMixBuilder", "inputs": {
        "images_1": ["im1", 0], "token_1": "sks", "class_word_1": "dog",
        "images_2": ["im2", 0], "token_2": "hta", "class_word_2": "sculpture",
        "token_3": "", "class_word_3": "", "token_4": "", "class_word_4": "",
        "probability": 0.99, "layout": "left-right", "and_prompt_probability": 0.5, "seed": 0, "resolution": 64,
        "preview_count": 2}}
    g["unmix"] = _train_node(M, C, V, pre + "_unmix", training_set=["cm", 0], subset=subset, unmix_weight=100.0,
                             attention_reg_weight=0.0)
    g["eq10"] = _train_node(M, C, V, pre + "_eq10", images=["im1", 0], subset=subset, attention_reg_weight=100.0)
    g["eq10_ck"] = _train_node(M, C, V, pre + "_eq10_ck", images=["im1", 0], subset=subset, attention_reg_weight=100.0,
                               gradient_checkpointing=True)
    runs = ["unmix", "eq10", "plain", "eq10_ck"]
    g["plain"] = _train_node(M, C, V, pre + "_plain", images=["im1", 0], subset=subset)
    for k in runs:  # output nodes, so that the trainings run
        g[f"sv_{k}"] = {"class_type": "SVDiffSaveShift", "inputs": {"shift": [k, 2], "filename_prefix": f"{pre}_{k}",
                                                                   "dtype": "float32", "description": ""}}
    ex, _ = run_prompt(g, "1", new_executor())
    assert ex.success, ex.status_messages
    lu, lr, lp = (_loss_report(ex, k) for k in ("unmix", "eq10", "plain"))
    assert len(lu["unmix"]) == 2 and min(lu["unmix"]) > 0, lu
    assert len(lr["attention_reg"]) == 2 and min(lr["attention_reg"]) > 0, lr
    assert "attention_reg" not in lp and "unmix" not in lp
    # the first step's denoising loss is the plain run's: the capture does not change the forward
    assert lr["denoise"][0] == pytest.approx(lp["loss"][0], rel=1e-4)
    # gradient checkpointing (the backward pass runs the blocks, and the capture, again): same terms
    lck = _loss_report(ex, "eq10_ck")
    assert lck["attention_reg"] == pytest.approx(lr["attention_reg"], rel=1e-3)
    assert lck["loss"] == pytest.approx(lr["loss"], rel=1e-3)
