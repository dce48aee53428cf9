"""``make demo``: run the bundled workflows headless through ComfyUI's real executor.

Runs, on the demo model (a small model the harness builds itself: no weights can be
downloaded here), the single-subject workflow (twice: the robot, then the duck as a second
subject), the single-image editing workflow and the combine/interpolate workflow, exactly as
the editor would queue them (converted from example_workflows/*.json), with step counts and sizes
shrunk for a CPU.  It prints what it does with a progress bar and where the shift files and
images are.

The demo model is the pretrained toy world of ``tools/toyworld`` when its weights are in the
tree, else a tiny random-weight stand-in for Stable Diffusion:

* toy world: the bundled workflows are SD1.5 workflows (photo prompts, 512 px pictures) shrunk
  onto a 64x64 model of coloured shapes, so THEIR images show only that the graphs run end to
  end.  Then the demo writes the toy world's contact sheet (``tools/toyworld/contact_sheet.py``):
  the held-out concept "a sks thing" learned from 4 images with SVDiff Train, base vs
  fine-tuned samples, the concept in new contexts, two concepts with and without
  Cut-Mix-Unmix, an edit of one image (DDIM Invert + Slerp Noise) and an interpolation strip
  between two shifts, each row with the toy classifier's reading.  These images ARE meaningful
  (at the toy's scale); it takes a few CPU minutes more.
* tiny stand-in (toy weights absent): the pictures are coloured noise and there is no contact
  sheet; the demo shows that the graphs run end to end.

For real results open the same workflows in ComfyUI with a real SD1.5 checkpoint.

Options: ``--base DIR`` (default build/demo), ``--keep`` (keep earlier outputs), ``--no-sheet``
(skip the contact sheet), ``--sheet-only`` (only the contact sheet), ``--checkpoint PATH``
(another toy checkpoint file for the contact sheet), ``--quick-sheet`` (a few steps of
everything: seconds, not meaningful).
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

WF = os.path.join(REPO, "example_workflows")


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
        ex = comfy_env.new_executor(srv)
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
    ap.add_argument("--no-sheet", action="store_true", help="skip the toy world's contact sheet")
    ap.add_argument("--sheet-only", action="store_true", help="only the toy world's contact sheet (no workflows)")
    ap.add_argument("--checkpoint", default=None, help="a toy checkpoint file for the contact sheet (default: the committed one)")
    ap.add_argument("--quick-sheet", action="store_true", help="a few steps of everything on the sheet (not meaningful)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("TOYWORLD_THREADS", "1")))  # 1 is fastest for these small models
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
    kind = demo_model.demo_kind()
    toy = kind == "toyworld"
    print(f"  demo model: {ckpt} ({kind}), in {folder_paths.get_folder_paths('checkpoints')[0]}")
    if toy:
        print("  NOTE: the demo model is the toy world (64x64 coloured shapes). The bundled SD1.5 workflows below run on\n"
              "  it only to show the graphs work (their photo prompts mean nothing to it); the contact sheet at the end\n"
              "  shows SVDiff itself on the toy's held-out concepts, with the classifier's reading of every row.\n", flush=True)
    else:
        print("  NOTE: the demo model is a tiny random stand-in (the toy world's weights are absent); its images are NOT\n"
              "  meaningful. Use a real SD1.5 checkpoint in ComfyUI for real results.\n", flush=True)
    if a.sheet_only:
        if not toy:
            raise SystemExit("--sheet-only: the contact sheet needs the toy world's weights (tools/toyworld/weights)")
        path = contact_sheet_step(base, a)
        print(f"\nDone in {time.monotonic() - t_start:.0f} s. Contact sheet: {path}")
        return 0

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
        print("3/4 single-image editing: skipped (example_workflows/04_single_image_editing.json is not in this checkout)")
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
    sheet = None
    if toy and not a.no_sheet:
        sheet = contact_sheet_step(base, a)
    print(f"\nDone in {time.monotonic() - t_start:.0f} s. Output folder: {os.path.join(base, 'output')}")
    if sheet:
        print(f"Contact sheet (SVDiff on the toy world, meaningful at its scale): {sheet}")
        print("The workflow images above are SD1.5 workflows shrunk onto the toy model: they show the graphs run. With a "
              "real SD1.5 checkpoint the same workflows (make serve, or drag example_workflows/*.json into ComfyUI) give real results.")
    elif toy:
        print("The workflow images above are SD1.5 workflows shrunk onto the toy model: they show the graphs run "
              "(the contact sheet was skipped). Use a real SD1.5 checkpoint in ComfyUI for real results.")
    else:
        print("Reminder: these images come from the tiny demo model and are not meaningful; with a real SD1.5 "
              "checkpoint the same workflows (make serve, or drag example_workflows/*.json into ComfyUI) give real results.")
    return 0


def contact_sheet_step(base: str, a) -> str:
    """The toy world's contact sheet (issue 9), into <base>/output/svdiff."""
    from toyworld import contact_sheet

    print("\nToy-world contact sheet: SVDiff Train / Cut-Mix-Unmix / editing / interpolation on the toy model "
          f"({'quick' if a.quick_sheet else 'a few CPU minutes'}) ...", flush=True)
    return contact_sheet.make_contact_sheet(os.path.join(base, "output", "svdiff"), checkpoint=a.checkpoint,
                                            quick=a.quick_sheet, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    sys.exit(main())
