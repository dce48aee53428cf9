"""Cold and warm SVD of every SD1.5 UNet weight matrix: our Gram route vs torch.linalg.svd.

    .venv/bin/python bench/bench_decompose.py [--sample N]

Accuracy is judged on the reconstruction U diag(sigma) V^T and on patched weights
(W + U diag(ReLU(sigma+delta)-sigma) V^T against a float64 reference), not on sigma alone.
Also prints the shift-file sizes for SD1.5 UNet + CLIP-L in float16 and float32.
"""

import argparse
import tempfile
import time

import _common

ap = argparse.ArgumentParser()
ap.add_argument("--sample", type=int, default=0, help="decompose only every N-th matrix (0 = all)")
args = ap.parse_args()
_common.boot()

import torch  # noqa: E402
import svdiff.decompose as D  # noqa: E402
import svdiff.shift as S  # noqa: E402

mp = _common.sd15_patcher()
mats = [(k, v.detach()) for k, v in mp.model.state_dict().items() if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim >= 2]
if args.sample:
    mats = mats[:: args.sample]
print(f"{len(mats)} matrices, torch {torch.__version__}, threads {torch.get_num_threads()}")

results = {}
for algo in ("gram", "svd"):
    t0 = time.perf_counter()
    decs = [D.decompose(w, algo) for _, w in mats]
    results[algo] = (time.perf_counter() - t0, decs)
    print(f"cold {algo:5s}: {results[algo][0]:8.1f} s")

# accuracy on a subset (float64 reference is slow): every 10th matrix
g = torch.Generator().manual_seed(0)
err = {a: {"rec": 0.0, "patched": 0.0} for a in results}
idx = list(range(0, len(mats), 10))
for i in idx:
    k, w = mats[i]
    w64 = w.double()
    ref = torch.linalg.svd(D.as_matrix(w64), full_matrices=False)
    delta = torch.randn(ref.S.shape[0], generator=g, dtype=torch.float64) * ref.S.mean() * 0.1
    want = w64 + ((ref.U * (torch.relu(ref.S + delta) - ref.S)) @ ref.Vh).reshape(w.shape)
    for a, (_, decs) in results.items():
        dec = decs[i]
        rec = dec.reconstruct().double()
        err[a]["rec"] = max(err[a]["rec"], float((rec - w64).norm() / w64.norm()))
        got = w64 + S.spectral_residual(dec, delta.float()).double()
        err[a]["patched"] = max(err[a]["patched"], float((got - want).norm() / (want - w64).norm()))
for a in results:
    print(f"{a:5s}: max relative reconstruction error {err[a]['rec']:.2e} (float16 U,V stored), patched-weight error vs float64 {err[a]['patched']:.2e}")
print(f"ratio svd/gram (cold): {results['svd'][0] / results['gram'][0]:.2f}x")

# warm: memory cache and disk cache
with tempfile.TemporaryDirectory() as d:
    cache = D.SVDCache(memory_limit=8 << 30, disk_dir=d, disk_limit=16 << 30)
    for (k, w), dec in zip(mats, results["gram"][1]):
        cache._store_disk(D.fingerprint(w), dec)
    t0 = time.perf_counter()
    for _, w in mats:
        cache.get(w)
    t_disk = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, w in mats:
        cache.get(w)
    t_mem = time.perf_counter() - t0
    print(f"warm from disk cache: {t_disk:.1f} s ({cache.disk_bytes() / 1e9:.2f} GB on disk); warm from memory (incl. fingerprint hashing): {t_mem:.1f} s")
    print(f"cache stats {cache.stats}")
