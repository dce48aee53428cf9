"""Bit-exact fingerprints of SVDiff Train runs: the proof that a refactor moved nothing.

Runs the node's ``train()`` on the tiny SD1-style model (CPU, one thread, under inference
mode as ComfyUI's executor runs nodes) through every data route and the options that
change the step: images with generated priors, text-encoder training with Eq. 10 under
gradient checkpointing, latents with one conditioning per latent, Cut-Mix with unmix +
Eq. 10 + priors + text encoder, a rank-limited subset on the recompose route with SGD,
and save + resume.  For each it records every loss value (``float.hex``) and a SHA-256 of
every trained delta, and writes them as JSON.

    .venv/bin/python tools/train_golden.py --out build/golden/before.json
    ... change the code ...
    .venv/bin/python tools/train_golden.py --out build/golden/after.json --compare build/golden/before.json

``--compare`` exits 1 and names the first difference when the runs are not bit-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

def subject_images(n=3, size=64, shift=0.0):
    import torch

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        r = ((xs - 0.2 * i - shift) ** 2 + ys**2).sqrt()
        out.append(torch.stack([(r < 0.5).float() * 0.9, (xs + 1) / 4, torch.full_like(xs, 0.2 + 0.2 * i)], -1)[None])
    return torch.cat(out)


def base_args(ckpt, **kw):
    from svdiff_testkit.train_args import train_inputs

    return train_inputs(ckpt, **{"images": [subject_images()], "steps": 4, "filename_prefix": "svdiff/golden", **kw})


def digest(shift) -> dict:
    out = {}
    for k in sorted(shift.deltas):
        t = shift.deltas[k].detach().float().contiguous().cpu()
        out[k] = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    return out


def configurations(ckpt, pack):
    """(name, node inputs) of every configuration, built lazily (some need earlier results)."""
    import torch

    cutmix = pack("svdiff.cutmix")
    model, clip, vae = ckpt
    subs = [cutmix.Subject(subject_images(2), "sks", "dog", subject_images(1, shift=0.3)),
            cutmix.Subject(subject_images(2, shift=-0.2), "hta", "cat", None)]
    ts = cutmix.CutMixTrainingSet(subs, cutmix.CutMixConfig(0.6, "left-right", seed=0), resolution=64)
    with torch.inference_mode():
        lat = vae.encode(subject_images(3)[..., :3])
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(p))[0] for p in ("a sks dog", "a sks dog on grass", "a sks dog, red")]
    yield "images_prior", base_args(ckpt, prior_weight=1.0)
    yield "images_te_eq10_ckpt", base_args(ckpt, train_text_encoder=True, attention_reg_weight=50.0, gradient_checkpointing=True,
                                           prior_weight=1.0, batch_size=2)
    yield "latents_per_latent_cond", base_args(ckpt, images=None, latents=[{"samples": lat}], positive=[conds], batch_size=2)
    yield "cutmix_unmix_eq10_prior_te", base_args(ckpt, images=None, training_set=ts, unmix_weight=50.0, attention_reg_weight=20.0,
                                                  prior_weight=1.0, train_text_encoder=True, attention_resolutions="all")
    yield "rank_cakv_recompose_sgd", base_args(ckpt, subset="UNet-CA-KV", rank=4, side_path="recompose", optimizer="SGD",
                                               learning_rate=1e-1)
    yield "save_then_resume", base_args(ckpt, steps=2, save_every=2, filename_prefix="svdiff/golden_resume")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None, help="an earlier --out file that this run must equal bit for bit")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from svdiff_testkit import comfy_env, tiny

    comfy_env.boot(tempfile.mkdtemp(prefix="svdiff-golden-"))
    import nodes

    def pack(name):
        return comfy_env.pack_module(name)

    train = pack("nodes.train")
    name = tiny.install_checkpoint("golden_tiny.safetensors", seed=0)
    with torch.inference_mode():
        ckpt = tuple(nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3])
    results = {}
    for cname, inputs in configurations(ckpt, pack):
        with torch.inference_mode():
            out = train.train(inputs)
        shift, loss_map, done, report = out[2], out[3], out[4], out[5]
        entry = {"steps": done, "losses": {k: [float(v).hex() for v in vals] for k, vals in sorted(loss_map.items())},
                 "deltas": digest(shift)}
        if cname == "save_then_resume":
            saved = os.path.relpath(report["saved"][-1], comfy_env.pack_module("nodes.common").shift_save_dir())
            with torch.inference_mode():
                out2 = train.train(dict(inputs, resume_from=saved, save_every=0))
            entry["resumed"] = {"steps": out2[4], "losses": [float(v).hex() for v in out2[3]["loss"]], "deltas": digest(out2[2])}
        results[cname] = entry
        print(f"{cname}: {done} steps, last loss {loss_map['loss'][-1] if loss_map['loss'] else None}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"wrote {a.out}")
    if a.compare:
        with open(a.compare, encoding="utf-8") as f:
            ref = json.load(f)
        if ref != results:
            for k in sorted(set(ref) | set(results)):
                if ref.get(k) != results.get(k):
                    print(f"DIFFERENT: {k}\n  before: {json.dumps(ref.get(k))[:400]}\n  after:  {json.dumps(results.get(k))[:400]}")
                    break
            return 1
        print(f"bit-identical to {a.compare}: {len(results)} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
