"""Cut-Mix Builder (Sec. 3.3, appendix C.2): masks, regions, prompts, statistics, errors."""

import re

import pytest
import torch

import svdiff.cutmix as C

COLOURS = {"sks": (1.0, 0.0, 0.0), "hta": (0.0, 0.0, 1.0), "zwx": (0.0, 1.0, 0.0)}
CLASSES = {"sks": "dog", "hta": "sculpture", "zwx": "cat"}


def solid(colour, n=2, h=20, w=30):
    img = torch.empty(n, h, w, 3)
    img[...] = torch.as_tensor(colour, dtype=torch.float32)
    return img


def subjects(tokens=("sks", "hta"), prior=True):
    out = []
    for t in tokens:
        c = torch.tensor(COLOURS[t])
        # prior images: a darker shade of the same colour, so regions stay identifiable
        out.append(C.Subject(solid(c, 2, 20 + 7 * len(out), 30), t, CLASSES[t],
                             solid(c * 0.5, 3, 25, 18) if prior else None))
    return out


def words_of(prompt):
    return re.findall(r"[A-Za-z]+", prompt)


@pytest.mark.parametrize("layout", ["left-right", "up-down", "random"])
def test_masks_cover_once_and_each_subject_fills_its_region(layout):
    ts = C.CutMixTrainingSet(subjects(("sks", "hta", "zwx")), C.CutMixConfig(0.6, layout, 0.5, seed=3), resolution=16)
    seen_mixed = 0
    for step in range(40):
        for prior in (False, True):
            s = ts.sample(step, prior=prior)
            assert s.image.shape == (16, 16, 3) and s.masks.shape[1:] == (16, 16)
            assert set(s.masks.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(s.masks.sum(0), torch.ones(16, 16)), "masks must cover every pixel exactly once"
            assert len(s.words) == len(s.class_words) == s.masks.shape[0] == len(s.subjects)
            for k, idx in enumerate(s.subjects):
                tok = ts.subjects[idx].token
                colour = torch.tensor(COLOURS[tok]) * (0.5 if prior else 1.0)
                region = s.masks[k].bool()
                assert region.any()
                assert torch.allclose(s.image[region], colour.expand(int(region.sum()), 3), atol=1e-5), (step, prior, tok)
            if s.mixed:
                seen_mixed += 1
                assert len(set(s.subjects)) == 2, "two subjects drawn without replacement"
                # the regions are the two halves (or the split) along the layout's axis
                first = s.masks[0]
                cut = round(s.split * 16)
                if s.layout == "left-right":
                    assert first[:, :cut].all() and not first[:, cut:].any()
                else:
                    assert first[:cut].all() and not first[cut:].any()
            else:
                assert torch.equal(s.masks, torch.ones(1, 16, 16))
    assert seen_mixed > 10


def test_prompts_name_each_subject_once_and_follow_the_templates():
    subs = subjects(("sks", "hta", "zwx"))
    ts = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, "random", 0.5, seed=1), resolution=16)
    kinds = set()
    for step in range(120):
        s = ts.sample(step)
        w = words_of(s.prompt)
        shown = [subs[i] for i in s.subjects]
        assert s.words == [x.token for x in shown]
        for x in subs:
            assert w.count(x.token) == (1 if x in shown else 0), s.prompt
        if not s.mixed:
            assert s.prompt == f"photo of a {shown[0].token} {shown[0].class_word}"
            kinds.add("single")
            continue
        a, b = (f"{x.token} {x.class_word}" for x in shown)
        if s.layout == "left-right":
            named = f"photo of a {a} on the left and a {b} on the right"
        else:
            named = f"photo of a {a} at the top and a {b} at the bottom"
        ands = {f"photo of a {a} and a {b}", f"photo of a {b} and a {a}"}
        assert s.prompt == named or s.prompt in ands, s.prompt
        kinds.add(("and" if s.prompt in ands else s.layout))
        # prior samples: class words only, no special token
        p = ts.sample(step, prior=True)
        assert not any(x.token in words_of(p.prompt) for x in subs), p.prompt
        assert p.words == p.class_words and all(words_of(p.prompt).count(cw) == 1 for cw in p.class_words)
    assert kinds == {"single", "and", "left-right", "up-down"}
    # the exact templates of the issue
    sks, hta = subs[0], subs[1]
    assert C.mixed_prompt(sks, hta, "left-right", and_prompt=False) == "photo of a sks dog on the left and a hta sculpture on the right"
    assert C.mixed_prompt(sks, hta, "up-down", and_prompt=False) == "photo of a sks dog at the top and a hta sculpture at the bottom"
    assert C.mixed_prompt(sks, hta, "up-down", and_prompt=True) == "photo of a sks dog and a hta sculpture"
    assert C.mixed_prompt(sks, hta, "left-right", and_prompt=True, prior=True, and_order=(1, 0)) == "photo of a sculpture and a dog"


def test_probabilities_and_layouts_are_what_was_asked():
    subs = subjects(("sks", "hta", "zwx"), prior=False)
    n = 1000
    for p, a in ((0.6, 0.5), (0.3, 0.8)):
        ts = C.CutMixTrainingSet(subs, C.CutMixConfig(p, "left-right", a, seed=7), resolution=8)
        samples = [ts.sample(i) for i in range(n)]
        mixed = [s for s in samples if s.mixed]
        # binomial: 4 standard deviations
        assert abs(len(mixed) / n - p) < 4 * (p * (1 - p) / n) ** 0.5
        ands = sum(" and a " in s.prompt and " on the " not in s.prompt for s in mixed)
        assert abs(ands / len(mixed) - a) < 4 * (a * (1 - a) / len(mixed)) ** 0.5
        assert all(s.layout == "left-right" and s.split == 0.5 for s in mixed)
        pairs = {tuple(sorted(s.subjects)) for s in mixed}
        assert pairs == {(0, 1), (0, 2), (1, 2)}, "every pair of three subjects is drawn"
        firsts = [s.subjects[0] for s in mixed]
        for i in range(3):  # each subject is on the left about a third of the time
            assert abs(firsts.count(i) / len(mixed) - 1 / 3) < 0.08
    ts = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, "up-down", seed=7), resolution=8)
    assert {ts.sample(i).layout for i in range(100)} == {"single", "up-down"}
    ts = C.CutMixTrainingSet(subs, C.CutMixConfig(0.9, "random", seed=7), resolution=32)
    mixed = [s for s in (ts.sample(i) for i in range(400)) if s.mixed]
    lr = sum(s.layout == "left-right" for s in mixed) / len(mixed)
    assert abs(lr - 0.5) < 0.1
    splits = [s.split for s in mixed]
    lo, hi = C.RANDOM_SPLIT_RANGE
    assert min(splits) >= lo - 1 / 32 and max(splits) <= hi + 1 / 32 and len(set(splits)) > 8
    ts = C.CutMixTrainingSet(subs, C.CutMixConfig(0.0, seed=7), resolution=8)
    assert not any(ts.sample(i).mixed for i in range(200))


def test_samples_are_deterministic_in_seed_and_step():
    subs = subjects()
    a = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, "random", seed=5), resolution=16)
    b = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, "random", seed=5), resolution=16)
    c = C.CutMixTrainingSet(subs, C.CutMixConfig(0.6, "random", seed=6), resolution=16)
    for step in (0, 3, 17):
        sa, sb = a.sample(step), b.sample(step)
        assert sa.prompt == sb.prompt and torch.equal(sa.image, sb.image) and torch.equal(sa.masks, sb.masks)
    assert [a.sample(i).prompt for i in range(20)] != [c.sample(i).prompt for i in range(20)]


def test_resize_center_crop_keeps_the_centre_and_aspect():
    img = torch.zeros(1, 20, 40, 3)
    img[:, :, :, 0] = 1.0  # red edges
    img[:, :, 8:32] = torch.tensor([0.0, 1.0, 0.0])  # green centre, cols 8..31
    out = C.resize_center_crop(img, 16)
    assert out.shape == (1, 16, 16, 3)
    # scale 0.8 -> 16x32, centre crop keeps original cols 10..30: all green
    assert torch.allclose(out[0, :, 1:-1], torch.tensor([0.0, 1.0, 0.0]).expand(16, 14, 3), atol=1e-4)
    tall = C.resize_center_crop(torch.rand(2, 50, 10, 3), 12)
    assert tall.shape == (2, 12, 12, 3) and 0 <= tall.min() and tall.max() <= 1
    up = C.resize_center_crop(torch.rand(8, 8, 3), 24)
    assert up.shape == (1, 24, 24, 3)


def test_bad_input_gives_clear_errors():
    subs = subjects()
    with pytest.raises(ValueError, match="at least 2 subjects"):
        C.CutMixTrainingSet(subs[:1], C.CutMixConfig(), 16)
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"probability.*\[0, 1\)"):
            C.CutMixConfig(probability=p)
    with pytest.raises(ValueError, match="layout"):
        C.CutMixConfig(layout="diagonal")
    with pytest.raises(ValueError, match="no images"):
        C.Subject(torch.zeros(0, 16, 16, 3), "sks", "dog")
    with pytest.raises(ValueError, match="token"):
        C.Subject(torch.zeros(1, 16, 16, 3), "  ", "dog")
    with pytest.raises(ValueError, match="used twice"):
        C.CutMixTrainingSet([subs[0], C.Subject(solid((0, 1, 0)), "sks", "cat")], C.CutMixConfig(), 16)
    no_prior = C.CutMixTrainingSet(subjects(prior=False), C.CutMixConfig(), 16)
    with pytest.raises(ValueError, match="prior"):
        no_prior.sample(0, prior=True)


# --------------------------------------------------------------------------------------
# The node in real ComfyUI
# --------------------------------------------------------------------------------------
def builder(comfy):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["SVDiffCutMixBuilder"]


def test_node_schema_has_tooltips_and_four_slots(comfy):
    node = builder(comfy)
    schema = node.define_schema()
    names = [i.id for i in schema.inputs]
    for n in range(1, 5):
        for f in ("images", "token", "class_word", "prior_images"):
            assert f"{f}_{n}" in names
    assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    assert schema.outputs[0].io_type == "SVDIFF_TRAINING_SET"


def test_node_builds_training_set_and_preview(comfy):
    node = builder(comfy)
    with torch.inference_mode():  # as the executor runs nodes
        out = node.execute(images_1=solid((1, 0, 0), 2, 24, 24), token_1="sks", class_word_1="dog",
                           images_3=solid((0, 0, 1), 1, 30, 20), token_3="hta", class_word_3="sculpture",
                           prior_images_3=solid((0, 0, 0.5), 2, 16, 16),
                           token_2="unused", class_word_2="x",
                           probability=0.6, layout="up-down", and_prompt_probability=0.5, seed=2,
                           resolution=16, preview_count=6)
    ts, grid, prompts = out.result
    assert isinstance(ts, C.CutMixTrainingSet)
    assert [s.token for s in ts.subjects] == ["sks", "hta"]
    assert ts.subjects[1].prior_images is not None and ts.subjects[0].prior_images is None
    assert not ts.subjects[0].images.is_inference(), "training builds graphs on these tensors"
    assert ts.config.layout == "up-down" and ts.resolution == 16
    assert grid.shape == (1, 2 * 16 + 2, 4 * 16 + 3 * 2, 3)
    lines = prompts.splitlines()
    assert len(lines) == 6 and lines[0] == f"0: {ts.sample(0).prompt}"
    assert torch.equal(grid[0, :16, :16], ts.sample(0).image)


@pytest.mark.parametrize("kwargs, field", [
    (dict(images_1=solid((1, 0, 0))), "images_1, images_2"),
    (dict(images_1=solid((1, 0, 0)), images_2=torch.zeros(0, 16, 16, 3)), "images_2"),
    (dict(images_1=solid((1, 0, 0)), images_2=solid((0, 0, 1)), probability=1.0), "probability"),
    (dict(images_1=solid((1, 0, 0)), images_2=solid((0, 0, 1)), probability=-0.2), "probability"),
    (dict(images_1=solid((1, 0, 0)), images_2=solid((0, 0, 1)), token_2=""), "token_2"),
    (dict(images_1=solid((1, 0, 0)), images_2=solid((0, 0, 1)), token_2="sks"), "token_2"),
    (dict(images_1=solid((1, 0, 0)), prior_images_2=solid((0, 0, 1))), "prior_images_2"),
])
def test_node_errors_name_the_node_and_field(comfy, kwargs, field):
    node = builder(comfy)
    args = dict(token_1="sks", class_word_1="dog", token_2="hta", class_word_2="sculpture", resolution=16)
    args.update(kwargs)
    with pytest.raises(Exception) as e:
        node.execute(**args)
    msg = str(e.value)
    assert "[Cut-Mix Builder]" in msg and field in msg, msg


def test_node_runs_in_a_comfyui_graph(comfy):
    from svdiff_testkit.comfy_env import run_prompt

    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 2, "color": 0xFF0000}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 24, "batch_size": 1, "color": 0x0000FF}},
        "3": {"class_type": "SVDiffCutMixBuilder", "inputs": {
            "images_1": ["1", 0], "token_1": "sks", "class_word_1": "dog",
            "images_2": ["2", 0], "token_2": "hta", "class_word_2": "sculpture",
            "token_3": "zwx", "class_word_3": "cat", "token_4": "qtx", "class_word_4": "toy",
            "probability": 0.6, "layout": "left-right", "and_prompt_probability": 0.5, "seed": 0,
            "resolution": 16, "preview_count": 4}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    ex, outputs = run_prompt(prompt)
    assert ex.success, ex.status_messages
    assert outputs["4"]["images"]
    bad = {**prompt, "3": {**prompt["3"], "inputs": {**prompt["3"]["inputs"], "probability": 1.0}}}
    with pytest.raises(AssertionError, match="probability"):
        run_prompt(bad, prompt_id="2")


def test_stack_masks_pads_single_samples():
    ts = C.CutMixTrainingSet(subjects(), C.CutMixConfig(0.5, "up-down", seed=0), resolution=16)
    batch = [ts.sample(i) for i in range(6)]
    assert {s.mixed for s in batch} == {True, False}
    m = C.stack_masks(batch)
    assert m.shape == (6, 2, 16, 16)
    for b, s in enumerate(batch):
        assert torch.equal(m[b, : s.masks.shape[0]], s.masks)
        if not s.mixed:
            assert not m[b, 1].any()
    small = C.stack_masks(batch, size=(4, 4))
    assert small.shape == (6, 2, 4, 4) and torch.allclose(small.sum(1), torch.ones(6, 4, 4))
