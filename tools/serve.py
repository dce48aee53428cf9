"""``make serve``: the real ComfyUI editor on http://127.0.0.1:8188 with the SVDiff pack and
the demo model installed, so a person can drag a workflow in (or open it from the Templates
browser: Workflow > Browse Templates > ComfyUI-SVDiff) and press Queue.

The server runs with its own base directory ``build/serve`` (models, input, output) so the
ComfyUI checkout is not written to; the demo-only custom nodes (tools/demo_nodes) register
the demo model and place its checkpoint and the sample pictures.  Ctrl-C stops it.

Options: ``--port N`` (default 8188), ``--base DIR``; anything after ``--`` goes to main.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from svdiff_testkit import comfy_env, demo_model, server  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--base", default=os.path.join(REPO, "build", "serve"))
    ap.add_argument("extra", nargs="*", help="extra main.py arguments (after --)")
    a = ap.parse_args(argv)
    base = server.prepare(os.path.abspath(a.base))
    cmd = server.command(base, a.port, a.extra)
    print(f"SVDiff editor: http://127.0.0.1:{a.port}   (Ctrl-C stops it)")
    print(f"  ComfyUI:     {comfy_env.comfy_path()} (--cpu)")
    print(f"  base folder: {base}  (models/, input/, output/)")
    print(f"  demo model:  models/checkpoints/{demo_model.demo_checkpoint_name()} ({demo_model.demo_kind()}); "
          "its images are not meaningful, use a real SD1.5 checkpoint for real results")
    print(f"  workflows:   {demo_model.WORKFLOWS} (also under Templates > ComfyUI-SVDiff); "
          f"select the demo checkpoint in 'Load Checkpoint' instead of {demo_model.WORKFLOW_CKPT}")
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, cwd=comfy_env.comfy_path())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
