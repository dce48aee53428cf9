"""Attention regularisers (Sec. 3.3 unmix loss, appendix D.1 Eq. 10) and their capture in ComfyUI."""

import pytest
import torch

import svdiff.attention as A
from svdiff.shift import spectral_residual
import svdiff.decompose as D

T = 77


def lr_masks(b=1, h=16, w=16, cut=None):
    cut = w // 2 if cut is None else cut
    m = torch.zeros(b, 2, h, w)
    m[:, 0, :, :cut] = 1
    m[:, 1, :, cut:] = 1
    return m


def map_from(regions: dict, h, w, b=1, background=None):
    """[b, h*w, T] attention: token t -> normalised uniform attention on its region [h,w]."""
    g = torch.Generator().manual_seed(0)
    m = torch.rand(b, h * w, T, generator=g) if background is None else background.clone()
    for t, region in regions.items():
        m[:, :, t] = region.flatten().float() / region.sum()
    return m


# --------------------------------------------------------------------------------------
# unmix loss
# --------------------------------------------------------------------------------------
def test_unmix_is_zero_when_each_token_attends_only_to_its_own_region():
    masks = lr_masks(2, 16, 16)
    # maps at two block resolutions (16x16 and 4x4): masks are downsampled per block
    left16, left4 = lr_masks(1, 16, 16)[0, 0], lr_masks(1, 4, 4)[0, 0]
    maps = {
        "hi": map_from({5: left16, 8: 1 - left16, 9: 1 - left16}, 16, 16, b=2),
        "lo": map_from({5: left4, 8: 1 - left4, 9: 1 - left4}, 4, 4, b=2),
    }
    ids = [[5], [8, 9]]  # subject 1's word spans two tokens
    assert A.unmix_loss(maps, ids, masks).item() == 0.0


def test_unmix_is_positive_when_a_token_attends_to_the_other_region_and_grows_with_it():
    masks = lr_masks(1, 8, 8)
    left = masks[0, 0]
    losses = []
    for leak in (0.0, 0.25, 0.5, 1.0):  # fraction of token 5's attention on the right subject
        attn = (1 - leak) * left / left.sum() + leak * (1 - left) / (1 - left).sum()
        m = map_from({5: left, 8: 1 - left}, 8, 8)
        m[:, :, 5] = attn.flatten()
        losses.append(A.unmix_loss({"b": m}, [[5], [8]], masks).item())
    assert losses[0] == 0.0
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    # swapping the subjects' tokens (each attends to the other's region) is penalised too
    swapped = map_from({5: 1 - left, 8: left}, 8, 8)
    assert A.unmix_loss({"b": swapped}, [[5], [8]], masks).item() > 0


def test_unmix_ignores_single_subject_samples_and_empty_slots():
    ones = torch.zeros(2, 2, 8, 8)
    ones[:, 0] = 1  # single-subject samples: one region of ones, second slot unused
    m = torch.rand(2, 64, T)
    assert A.unmix_loss({"b": m}, [[5], []], ones).item() == 0.0
    # per-sample token positions: sample 0 mixed, sample 1 single
    masks = torch.cat([lr_masks(1, 8, 8), ones[:1]])
    left = masks[0, 0]
    mm = map_from({5: left, 8: 1 - left}, 8, 8, b=2)
    mm[1, :, 3] = 1 / 64  # sample 1's token attends everywhere: no other region, no loss
    assert A.unmix_loss({"b": mm}, [[[5], [8]], [[3], []]], masks).item() == 0.0
    mm[0, :, 5] = 1 / 64
    assert A.unmix_loss({"b": mm}, [[[5], [8]], [[3], []]], masks).item() > 0


def test_unmix_value_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(1, 16, T, generator=g).softmax(-1)
    masks = lr_masks(1, 4, 4)
    other0, other1 = masks[0, 1].flatten(), masks[0, 0].flatten()
    expect = (((m[0, :, 5] * other0) ** 2).mean() + ((m[0, :, 8] * other1) ** 2).mean()) / 2
    assert torch.allclose(A.unmix_loss({"b": m}, [[5], [8]], masks), expect)


def test_map_shape_and_errors():
    assert A.map_shape(64, 16, 16) == (8, 8)
    assert A.map_shape(32, 8, 16) == (4, 8)
    with pytest.raises(ValueError):
        A.map_shape(63, 16, 16)
    with pytest.raises(ValueError, match="batch"):
        A.unmix_loss({"b": torch.rand(3, 64, T)}, [[5], [8]], lr_masks(2, 8, 8))
    with pytest.raises(ValueError, match="no attention maps"):
        A.unmix_loss({}, [[5], [8]], lr_masks(1, 8, 8))


# --------------------------------------------------------------------------------------
# Eq. 10
# --------------------------------------------------------------------------------------
def blob(h=8, w=8):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.exp(-((yy - 3.0) ** 2 + (xx - 4.0) ** 2) / 3.0)


def test_eq10_zero_inside_class_mask_positive_outside_and_stop_gradient():
    cls = blob()
    M = (cls / cls.max() > 0.5).float()
    m = torch.rand(1, 64, T)
    m[0, :, 6] = (cls / cls.sum()).flatten()  # class word "dog"
    inside = M / M.sum()
    m[0, :, 5] = inside.flatten()  # special token only inside M
    assert A.attention_reg_loss({"b": m}, [5], [6], 0.5).item() == 0.0
    leak = m.clone()
    leak[0, :, 5] = 0.5 * inside.flatten() + 0.5 / 64
    leak.requires_grad_(True)
    loss = A.attention_reg_loss({"b": leak}, [5], [6], 0.5)
    assert loss.item() > 0
    expect = ((leak[0, :, 5] * (1 - M.flatten())) ** 2).mean()
    assert torch.allclose(loss, expect)
    loss.backward()
    g = leak.grad[0, :, 5].reshape(8, 8)
    assert torch.all(g[M.bool()] == 0), "sg(A ⊙ M): no gradient inside the mask"
    assert torch.all(g[~M.bool()] > 0)
    assert torch.count_nonzero(leak.grad[0, :, 6]) == 0, "the class map only makes the mask"
    # a lower threshold widens M and lowers the loss
    assert A.attention_reg_loss({"b": leak.detach()}, [5], [6], 0.1) < loss


# --------------------------------------------------------------------------------------
# token positions
# --------------------------------------------------------------------------------------
def test_token_positions_pure():
    ids = [49406, 10, 11, 12, 13, 11, 12, 49407]
    assert A.token_positions(ids, [11, 12]) == [2, 3, 5, 6]
    ends = {49406, 10, 12, 13}  # token 13 ends a word, 11 does not
    assert A.token_positions(ids, [12], lambda t: t in ends) == []  # 12 only follows 11: mid-word
    assert A.token_positions(ids, [11, 12], lambda t: t in ends) == [2, 3, 5, 6]
    assert A.token_positions(ids, []) == []


def test_token_positions_with_the_clip_tokenizer(comfy, tiny):
    from svdiff_testkit.comfy_env import pack_module

    cap = pack_module("nodes.attention_capture")
    _, clip = tiny
    prompt = "photo of a sks dog and a hta sculpture, dogs"
    toks = [t for chunk in clip.tokenize(prompt)["l"] for t, _ in chunk]
    for word in ("sks", "dog", "hta", "sculpture", "photo of"):
        pos = cap.token_positions(clip, prompt, word)
        word_ids = [t for t, _, wid in clip.tokenize(word, return_word_ids=True)["l"][0] if wid != 0]
        assert pos and len(pos) == len(word_ids), (word, pos)
        assert [toks[p] for p in pos] == word_ids
    assert cap.token_positions(clip, prompt, "dog") != cap.token_positions(clip, prompt, "dogs")
    assert len(cap.token_positions(clip, prompt, "dog")) == 1  # "dogs" is another word
    assert cap.token_positions(clip, prompt, "cat") == []
    assert cap.token_positions(clip, prompt, "a") == [3, 7]  # after <start> photo of


# --------------------------------------------------------------------------------------
# AttentionCapture on the tiny model
# --------------------------------------------------------------------------------------
def forward(mp, x, ctx, sigma=5.0):
    return mp.model.apply_model(x, torch.tensor([sigma] * x.shape[0]), c_crossattn=ctx,
                                transformer_options=mp.model_options["transformer_options"])


def inputs(b=1, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, hw, hw, generator=g), torch.randn(b, T, 32, generator=g)


def test_capture_covers_every_cross_attention_block_and_keeps_the_output(comfy, tiny):
    import comfy.model_management as mm
    from svdiff_testkit.comfy_env import pack_module

    cap_mod = pack_module("nodes.attention_capture")
    mp, _ = tiny
    mm.load_models_gpu([mp], force_full_load=True)
    x, ctx = inputs(2, 16)
    with torch.no_grad():
        ref = forward(mp, x, ctx)
    m2 = mp.clone()
    cap = cap_mod.AttentionCapture()
    blocks = cap.install(m2)
    n_attn2 = sum(1 for n, _ in mp.model.diffusion_model.named_modules() if n.endswith("attn2"))
    assert len(blocks) == n_attn2 >= 5 and len(set(blocks)) == len(blocks)
    assert mp.model_options["transformer_options"].get("patches_replace", {}).get("attn2") is None, "base untouched"
    with torch.no_grad():
        out = forward(m2, x, ctx)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    maps, shapes = cap.maps(), cap.shapes()
    assert set(maps) == set(blocks)
    for k, m in maps.items():
        h, w = shapes[k]
        assert m.shape == (2, h * w, T) and h in (16, 8, 4)
        assert torch.allclose(m.sum(-1), torch.ones(2, h * w), atol=1e-5)
    assert {s for s in shapes.values()} == {(16, 16), (8, 8)}
    # disabled: ComfyUI's own attention, bit for bit, nothing stored
    cap.clear()
    cap.enabled = False
    with torch.no_grad():
        off = forward(m2, x, ctx)
    assert torch.equal(off, ref) and cap.maps() == {}
    # a resolution filter stores only the chosen blocks
    m3 = mp.clone()
    only8 = cap_mod.AttentionCapture(resolutions={8})
    only8.install(m3)
    with torch.no_grad():
        forward(m3, x, ctx)
    assert only8.maps() and all(only8.shapes()[k] == (8, 8) for k in only8.maps())
    assert len(only8.maps()) < len(blocks)


class SpectralDelta(torch.nn.Module):
    """A trainable spectral shift of one weight, as a ComfyUI weight wrapper (Eq. 2)."""

    def __init__(self, weight):
        super().__init__()
        self.dec = D.decompose(weight, algorithm="svd", storage_dtype=torch.float32)
        self.delta = torch.nn.Parameter(torch.zeros(self.dec.rank))

    def __call__(self, w):
        return w + spectral_residual(self.dec, self.delta, 1.0, device=w.device).to(w.dtype)


def unmix_grad(mp, capture, checkpointing: bool, key: str):
    import comfy.model_management as mm
    from svdiff_testkit.comfy_env import pack_module

    m2 = mp.clone()
    capture.install(m2)
    with torch.inference_mode(False):
        wrap = SpectralDelta(mp.model.state_dict()[key])
        m2.add_weight_wrapper(key, wrap)
        mm.load_models_gpu([m2], force_full_load=True)
        unet = m2.model.diffusion_model
        # SVDiff Train's own checkpointing: every outermost layer (ResBlock, SpatialTransformer,
        # ...) under non-reentrant torch.utils.checkpoint.  (Wrapping TimestepEmbedSequential
        # would checkpoint nothing: ComfyUI's UNet calls its layers one by one.)
        inj = pack_module("nodes.train").TrainInjection([], [unet] if checkpointing else [])
        inj.inject(m2)
        assert (len(inj.saved) > 0) == checkpointing
        try:
            x, ctx = inputs(1, 16, seed=3)
            capture.clear()
            forward(m2, x, ctx)
            masks = lr_masks(1, 16, 16)
            loss = A.unmix_loss(capture.maps(), [[5], [8]], masks)
            if not loss.requires_grad:
                # No captured map depends on anything trainable: ComfyUI 0.33 builds base weights
                # without requires_grad (0.3.75 leaves them as trainable Parameters, so there the
                # loss still has a graph), and then no gradient reaches delta at all.
                return loss.detach(), None
            loss.backward()
        finally:
            inj.eject(m2)
            m2.unpatch_model()
    return loss.detach(), wrap.delta.grad


def test_unmix_gradient_reaches_delta_also_under_gradient_checkpointing(comfy, tiny):
    from svdiff_testkit.comfy_env import pack_module

    cap_mod = pack_module("nodes.attention_capture")
    mp, _ = tiny
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    loss, g = unmix_grad(mp, cap_mod.AttentionCapture(), False, key)
    assert loss > 0 and g is not None and torch.count_nonzero(g) > 0
    loss_c, g_c = unmix_grad(mp, cap_mod.AttentionCapture(), True, key)
    assert torch.allclose(loss_c, loss, rtol=1e-5)
    assert torch.allclose(g_c, g, rtol=1e-4, atol=1e-8), "checkpointing recomputes the same maps"
    # the last cross-attention block (16x16) sits after every 8x8 one: capturing only the
    # 8x8 maps cuts its keys out of the loss; capturing 16x16 keeps them in
    last = "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    _, g_lo = unmix_grad(mp, cap_mod.AttentionCapture(resolutions={8}), False, last)
    assert g_lo is None or torch.count_nonzero(g_lo) == 0
    _, g_hi = unmix_grad(mp, cap_mod.AttentionCapture(resolutions={16}), False, last)
    assert torch.count_nonzero(g_hi) > 0


def test_cutmix_batch_to_unmix_loss_end_to_end(comfy, tiny):
    """Cut-Mix samples -> CLIP positions + stacked masks -> captured maps -> loss -> delta.

    Weight 0 with the capture disabled gives exactly the gradient of the plain loss; a
    positive weight changes it.
    """
    import comfy.model_management as mm
    import svdiff.cutmix as C
    from svdiff_testkit.comfy_env import pack_module

    cap_mod = pack_module("nodes.attention_capture")
    mp, clip = tiny
    subs = [C.Subject(torch.rand(2, 20, 20, 3), "sks", "dog", torch.rand(1, 20, 20, 3)),
            C.Subject(torch.rand(1, 24, 20, 3), "hta", "sculpture", torch.rand(1, 20, 20, 3))]
    ts = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, "left-right", seed=0), resolution=128)
    step = next(i for i in range(50) if ts.sample(i).mixed and ts.sample(i, prior=True).mixed)
    batch = [ts.sample(step), ts.sample(step, prior=True)]
    ids = [cap_mod.sample_token_positions(clip, s.prompt, s.words) for s in batch]
    assert all(len(p) == 2 and all(p) for p in ids)
    masks = C.stack_masks(batch, size=(16, 16))
    assert masks.shape == (2, 2, 16, 16) and torch.allclose(masks.sum(1), torch.ones(2, 16, 16))
    with torch.no_grad():
        ctx = torch.cat([clip.encode_from_tokens(clip.tokenize(s.prompt)) for s in batch]).float()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"

    def grad(weight, enabled, install=True):
        m2 = mp.clone()
        cap = cap_mod.AttentionCapture()
        if install:
            cap.install(m2)
        cap.enabled = enabled
        with torch.inference_mode(False):
            wrap = SpectralDelta(mp.model.state_dict()[key])
            m2.add_weight_wrapper(key, wrap)
            mm.load_models_gpu([m2], force_full_load=True)
            try:
                x, _ = inputs(2, 16, seed=5)
                out = forward(m2, x, ctx.clone())
                loss = (out ** 2).mean()
                if weight:
                    loss = loss + weight * A.unmix_loss(cap.maps(), ids, masks)
                loss.backward()
            finally:
                m2.unpatch_model()
        return wrap.delta.grad.clone()

    plain = grad(0.0, False, install=False)
    off = grad(0.0, False)
    on = grad(100.0, True)
    assert torch.equal(off, plain), "a disabled capture changes nothing"
    assert not torch.allclose(on, plain), "the unmix term changes the training gradient"
