"""``make demo``: run the bundled workflows headless through ComfyUI's real executor.

Runs, on the demo model (a small model the harness builds itself: no weights can be
downloaded here), the single-subject workflow (twice: the robot, then the duck as a second
subject), the single-image editing workflow and the combine/interpolate workflow, exactly as
the editor would queue them (converted from workflows/*.json), with step counts and sizes
shrunk for a CPU.  It prints what it does with a progress bar and where the shift files and
images are.

THE DEMO MODEL'S IMAGES ARE NOT MEANINGFUL: it is a tiny random-weight stand-in for Stable
Diffusion, so the pictures are coloured noise.  The demo shows that the graphs run end to end;
for real results open the same workflows in ComfyUI with a real SD1.5 checkpoint.

Options: ``--base DIR`` (default build/demo), ``--keep`` (keep earlier outputs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from svdiff_testkit import comfy_env, demo_model  # noqa: E402
from svdiff_testkit import workflow as W  # noqa: E402

WF = os.path.join(REPO, "workflows")


class ProgressServer(comfy_env.FakeServer):
    """A duck-typed PromptServer that draws a progress bar from the executor's messages."""

    def __init__(self, bar, titles):
        super().__init__()
        self.client_id = "svdiff-demo"  # the executor reports per-node progress only to a client
        self.bar, self.titles, self.seen = bar, titles, set()

    def send_sync(self, event, data, sid=None):
        super().send_sync(event, data, sid)
        if event in ("executing", "executed", "execution_cached") and isinstance(data, dict):
            nodes = data.get("nodes") if event == "execution_cached" else [data.get("node")]
            for n in nodes or []:
                if n is not None and n not in self.seen and n in self.titles:
                    self.seen.add(n)
                    self.bar.set_postfix_str(self.titles[n][:40], refresh=False)
                    self.bar.update(1)


def run(name: str, prompt: dict, label: str) -> dict:
    import comfy.utils
    import execution
    from tqdm import tqdm

    titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in prompt.items()}
    t0 = time.monotonic()
    with tqdm(total=len(prompt), desc=f"{label:<28}", unit="node", ncols=100, file=sys.stdout) as bar:
        def hook(value, total, preview, node_id=None):
            bar.set_postfix_str(f"{titles.get(node_id, '')[:24]} step {value}/{total}", refresh=False)
            bar.update(0)  # redraws at most every mininterval

        comfy.utils.set_progress_bar_global_hook(hook)
        srv = ProgressServer(bar, titles)
        ex = execution.PromptExecutor(srv, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
        import asyncio

        ok, err, outs, node_errors = asyncio.run(execution.validate_prompt(name, prompt, None))[:4]
        if not ok:
            raise SystemExit(f"{name}: ComfyUI refused the prompt: {err} {node_errors}")
        ex.execute(prompt, name, {}, outs)
        comfy.utils.set_progress_bar_global_hook(None)
        bar.n = bar.total
        bar.refresh()
    if not ex.success:
        msgs = [d for e, d in srv.messages if e == "execution_error"]
        raise SystemExit(f"{name} failed: {msgs[:1]}")
    return {"outputs": ex.history_result.get("outputs", {}), "seconds": time.monotonic() - t0}


def images_of(result: dict, base: str) -> list[str]:
    out = []
    for node_out in result["outputs"].values():
        for it in node_out.get("images", []) or []:
            if isinstance(it, dict) and it.get("type", "output") == "output":
                out.append(os.path.join(base, "output", it.get("subfolder", ""), it["filename"]))
    return out


def set_input(p: dict, node_id: str, **values) -> None:
    p[node_id]["inputs"].update(values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the SVDiff workflows headless on the demo model.")
    ap.add_argument("--base", default=os.path.join(REPO, "build", "demo"))
    ap.add_argument("--keep", action="store_true", help="keep earlier outputs and shift files")
    a = ap.parse_args(argv)
    base = os.path.abspath(a.base)
    if not a.keep:
        for d in ("output", os.path.join("models", "svdiff")):
            shutil.rmtree(os.path.join(base, d), ignore_errors=True)
    comfy_env.prepare_base_dir(base)
    demo_model.link_demo_nodes(base)
    t_start = time.monotonic()
    print("SVDiff demo: booting ComfyUI (CPU) with the pack and the demo model ...", flush=True)
    state = comfy_env.boot(base)
    if state["import_failed"]:
        raise SystemExit(f"the pack failed to import: {state['import_failed']}")
    import logging

    import comfy.utils
    import folder_paths

    logging.getLogger().setLevel(logging.WARNING)  # ComfyUI's own INFO lines would bury the progress bar
    comfy.utils.PROGRESS_BAR_ENABLED = False  # the samplers' own tqdm bars; ours shows their steps
    defs = W.object_info()
    ckpt = demo_model.demo_checkpoint_name()
    print(f"  demo model: {ckpt} ({demo_model.demo_kind()}), in {folder_paths.get_folder_paths('checkpoints')[0]}")
    print("  NOTE: the demo model is a tiny stand-in; its images are NOT meaningful. Use a real SD1.5 "
          "checkpoint in ComfyUI for real results.\n", flush=True)

    def prompt_of(fname):
        return demo_model.shrink_prompt(W.to_prompt(os.path.join(WF, fname), defs, replace={"ckpt_name": ckpt}))

    results = []
    # 1. single subject, twice: the robot (my_subject) and the duck (my_second_subject)
    p = prompt_of("01_single_subject.json")
    results.append(("single subject: robot", run("01-robot", p, "1/4 train robot + sample"), p))
    p2 = prompt_of("01_single_subject.json")
    loads = sorted(k for k, v in p2.items() if v["class_type"] == "LoadImage")
    for k, img in zip(loads, ["duck_01.png", "duck_02.png", "duck_01.png"]):
        set_input(p2, k, image=img)
    for k, v in p2.items():
        if v["class_type"] == "SVDiffTrain":
            set_input(p2, k, prompt="photo of a hta duck", class_prompt="photo of a duck")
        if v["class_type"] == "SVDiffSaveShift":
            set_input(p2, k, filename_prefix="my_second_subject", description="rubber duck, token 'hta duck'")
        if v["class_type"] == "SaveImage":
            set_input(p2, k, filename_prefix="svdiff/single_subject_duck")
        if v["class_type"] == "CLIPTextEncode" and "sks robot" in str(v["inputs"].get("text")):
            set_input(p2, k, text="a photo of hta duck on the beach, sunset")
    results.append(("single subject: duck", run("01-duck", p2, "2/4 train duck + sample"), p2))
    # 2. single-image editing (when its nodes are in this checkout)
    edit = "04_single_image_editing.json"
    if os.path.isfile(os.path.join(WF, edit)):
        p = prompt_of(edit)
        results.append(("single-image editing", run("04-edit", p, "3/4 edit one image"), p))
    else:
        print("3/4 single-image editing: skipped (workflows/04_single_image_editing.json is not in this checkout)")
    # 3. combine + interpolation strip over alpha, from the two shifts just trained
    p = prompt_of("05_combine_interpolate.json")
    for k, v in p.items():
        if v["class_type"] == "SVDiffLoadShift":
            first = v["_meta"]["title"].endswith("A")
            set_input(p, k, shift_name="my_subject_00001_.safetensors" if first else "my_second_subject_00001_.safetensors")
    results.append(("combine / interpolate", run("05-combine", p, "4/4 combine + interpolate"), p))

    print("\nWhat the demo did:")
    for label, res, prm in results:
        print(f"  {label:<24} {len(prm)} nodes in {res['seconds']:.1f} s")
        for img in images_of(res, base):
            print(f"      image: {img}")
    shifts = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(base, "models", "svdiff")) for f in fs)
    print("  spectral-shift files:")
    for s in shifts:
        print(f"      {s} ({os.path.getsize(s) / 1024:.1f} KiB)")
    print(f"\nDone in {time.monotonic() - t_start:.0f} s. Output folder: {os.path.join(base, 'output')}")
    print("Reminder: these images come from the tiny demo model and are not meaningful; with a real SD1.5 "
          "checkpoint the same workflows (make serve, or drag workflows/*.json into ComfyUI) give real results.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
