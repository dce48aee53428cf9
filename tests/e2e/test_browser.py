"""The bundled workflows in the real ComfyUI editor, in headless Debian Chromium.

Playwright drives ``/usr/bin/chromium`` (never a downloaded browser) against ComfyUI's
``main.py`` serving the pack and the demo nodes.  For each workflow: load it with the
editor's own ``app.loadGraphData``; no node may be reported missing or broken, no error
dialog or error toast may show; the editor's ``app.graphToPrompt()`` must equal our
converter's prompt (class types and every input).  Then SVDiff Train's help page is opened from
the selection toolbox, as a user opens it, and must show.

Screenshots go to ``build/screenshots/`` (ignored; a small copy under ``build/screenshots/docs/``
and a JPEG thumbnail of the graph under ``build/screenshots/thumbs/``).  The tests never write
tracked files: ``SVDIFF_UPDATE_SCREENSHOTS=1`` copies the small ones to ``docs/screenshots/``
(what the README shows) and the thumbnails to ``example_workflows/<name>.jpg`` (what the
editor's Templates browser shows beside each workflow).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest

from svdiff_testkit import demo_model
from svdiff_testkit import workflow as W
from svdiff_testkit.comfy_env import REPO
from svdiff_testkit.server import ComfyServer

WF_DIR = os.path.join(REPO, "example_workflows")
WORKFLOWS = W.workflow_files(WF_DIR) if os.path.isdir(WF_DIR) else []
CHROMIUM = os.environ.get("SVDIFF_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.path.join(REPO, "build", "screenshots")
SMALL_SHOTS = os.path.join(SHOTS, "docs")
THUMBS = os.path.join(SHOTS, "thumbs")
THUMB_WIDTH, THUMB_QUALITY = 512, 80  # the Templates browser's card picture: a small square JPEG
DOC_SHOTS = os.path.join(REPO, "docs", "screenshots")
UPDATE_DOCS = os.environ.get("SVDIFF_UPDATE_SCREENSHOTS") == "1"
ZOOM = 0.75  # canvas zoom of the screenshots: node titles and widget values stay legible
VIEW_MIN, VIEW_MAX = (1280, 800), (2560, 1600)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _why_no_browser() -> str | None:
    if not os.path.isfile(CHROMIUM):
        return (f"BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM}. Install it with "
                "`apt-get install -y chromium` (tools/provision.sh does this when run as root).")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "BROWSER TESTS SKIPPED: Python playwright is not installed (`pip install -r requirements-dev.txt`)."
    return None


_REASON = _why_no_browser()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def provide_workflow_files(base: str) -> None:
    """The files the bundled workflows name, as a user who followed the README has them: the
    model files their loaders name (SD1.5, SDXL, Flux-dev's diffusion model, text encoders and VAE;
    here all the demo checkpoint under those names: the editor only lists them) and the shift
    files workflows 01, 08 and 09 write (random shifts for the demo checkpoint).  Frontend 1.49.6
    (ComfyUI 0.33) marks a node whose file widget names a missing file as broken; 1.32.9 does not."""
    demo = os.path.join(base, "models", "checkpoints", demo_model.demo_checkpoint_name())
    for _widget, folder, fname in sorted({f for p in WORKFLOWS for f in W.model_files(p)}):
        link = os.path.join(base, "models", folder, fname)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(demo, link)
    names = sorted({v for p in WORKFLOWS for n in W.load(p)["nodes"] if n["type"] == "SVDiffLoadShift"
                    for v in n.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors")})
    for i, name in enumerate(names):
        demo_model.write_random_shift(demo, os.path.join(base, "models", "svdiff", name), seed=10 + i)


@pytest.fixture(scope="module")
def editor(comfy):
    from playwright.sync_api import sync_playwright

    srv = ComfyServer(tempfile.mkdtemp(prefix="svdiff-browser-"), start_timeout=120)
    srv.start()
    provide_workflow_files(srv.base)
    # a returning user: no first-run templates dialog
    srv.post_json("/settings/Comfy.TutorialCompleted", True)
    srv.post_json("/settings/Comfy.Minimap.Visible", False)  # cleaner screenshots
    srv.post_json("/settings/Comfy.Graph.CanvasInfo", False)
    profile = tempfile.mkdtemp(prefix="svdiff-chromium-")
    pw = sync_playwright().start()
    browser = None
    try:
        # a fresh --user-data-dir: playwright passes it through launch_persistent_context
        browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                        viewport={"width": 1600, "height": 1000})
        page = browser.pages[0] if browser.pages else browser.new_page()
        # the "Introducing Nodes 2.0" banner remembers its dismissal in localStorage
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');")
        errors: list = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url, timeout=60_000)
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=90_000)
        page.wait_for_timeout(1500)
        page.evaluate("""() => {
            window.__missing = [];
            const orig = window.app.showMissingNodesError.bind(window.app);
            window.app.showMissingNodesError = (types) => { window.__missing.push(...types); return orig(types); };
        }""")
        yield srv, page, errors
    finally:
        if browser is not None:
            browser.close()
        pw.stop()
        srv.stop(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def visible_dialogs(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.p-dialog, [role=dialog], .comfy-modal')]
        .filter(e => e.offsetParent !== null && getComputedStyle(e).display !== 'none')
        .map(e => (e.innerText || '').slice(0, 400))""")


def toasts(page) -> list[dict]:
    """The toasts showing: ``[{"error": bool, "text": str}]``."""
    return page.evaluate("""() => [...document.querySelectorAll('.p-toast-message')]
        .filter(e => e.offsetParent !== null)
        .map(e => ({error: e.classList.contains('p-toast-message-error'), text: (e.innerText || '').slice(0, 300)}))""")


def close_toasts(page) -> None:
    page.evaluate("""() => document.querySelectorAll('.p-toast-message .p-toast-close-button')
        .forEach(b => b.click())""")
    page.wait_for_timeout(300)


def graph_bounds(page) -> list[float]:
    """``[x, y, w, h]`` of every node (titles included) in canvas units."""
    return page.evaluate("""() => {
        const ns = window.app.graph.nodes, T = window.LiteGraph ? window.LiteGraph.NODE_TITLE_HEIGHT : 30;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - T));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        return [x0, y0, x1 - x0, y1 - y0];
    }""")


def screenshot_view(page, bounds) -> None:
    """A viewport sized so the whole graph fits at about ZOOM, and the graph fitted in it,
    drawn at full detail (no low-quality text culling)."""
    pad_x, pad_y, chrome_x, chrome_y = 80, 60, 60, 110  # the editor's side bar and top bars
    w = int(min(max((bounds[2] + 2 * pad_x) * ZOOM + chrome_x, VIEW_MIN[0]), VIEW_MAX[0]))
    h = int(min(max((bounds[3] + 2 * pad_y) * ZOOM + chrome_y, VIEW_MIN[1]), VIEW_MAX[1]))
    page.set_viewport_size({"width": w, "height": h})
    page.wait_for_timeout(300)
    page.evaluate("""([b, pad_x, pad_y, cx, cy]) => {  // fit into the area the side/top bars leave free
        const c = window.app.canvas, el = c.canvas;
        const W = el.clientWidth - cx, H = el.clientHeight - cy;
        const s = Math.min(W / (b[2] + 2 * pad_x), H / (b[3] + 2 * pad_y), 1);
        c.min_font_size_for_lod = 0;
        c.low_quality_zoom_threshold = 0;
        c.ds.scale = s;
        c.ds.offset[0] = (cx + (W - b[2] * s) / 2) / s - b[0];
        c.ds.offset[1] = (cy + (H - b[3] * s) / 2) / s - b[1];
        c.setDirty(true, true);
        c.draw(true, true);
    }""", [bounds, pad_x, pad_y, chrome_x, chrome_y])
    page.wait_for_timeout(400)


def small_png(src: str, dest: str, width: int = 1600) -> None:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    img.save(dest, optimize=True)


def graph_box_on_screen(page, pad: int = 16) -> list[int]:
    """``[left, top, right, bottom]`` of the graph in screenshot pixels (with ``pad`` around)."""
    return page.evaluate("""([b, pad]) => {
        const c = window.app.canvas, r = c.canvas.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
        return [Math.max(0, Math.floor(r.left + (b[0] + o[0]) * s - pad)),
                Math.max(0, Math.floor(r.top + (b[1] + o[1]) * s - pad)),
                Math.ceil(r.left + (b[0] + b[2] + o[0]) * s + pad),
                Math.ceil(r.top + (b[1] + b[3] + o[1]) * s + pad)];
    }""", [graph_bounds(page), pad])


def thumbnail_jpg(src: str, dest: str, box, size: int = THUMB_WIDTH) -> None:
    """The graph cut out of the screenshot (no editor chrome), fitted into a ``size`` square
    on the canvas colour (the Templates browser shows a square card, cropping what overflows),
    as JPEG."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img = img.crop((box[0], box[1], min(box[2], img.width), min(box[3], img.height)))
    scale = size / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    square = Image.new("RGB", (size, size), img.getpixel((0, 0)))  # the padding is empty canvas
    square.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    square.save(dest, "JPEG", quality=THUMB_QUALITY, optimize=True)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_loads_in_editor_and_matches_converter(editor, path):
    srv, page, errors = editor
    name = os.path.splitext(os.path.basename(path))[0]
    wf = W.load(path)
    errors.clear()
    page.evaluate("() => { window.__missing = []; }")
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [wf, name])
    page.wait_for_timeout(800)
    missing = page.evaluate("() => window.__missing")
    assert missing == [], f"editor reports missing nodes: {missing}"
    broken = page.evaluate("() => window.app.graph.nodes.filter(n => n.has_errors).map(n => n.type)")
    assert broken == []
    assert page.evaluate("() => window.app.graph.nodes.length") == len(wf["nodes"])
    dialogs = visible_dialogs(page)
    assert dialogs == [], f"a dialog is showing: {dialogs}"
    assert errors == [], errors
    bad_toasts = [t["text"] for t in toasts(page) if t["error"]]
    assert bad_toasts == [], f"the editor shows error toasts: {bad_toasts}"
    close_toasts(page)  # informational ones only (screenshot)

    os.makedirs(SHOTS, exist_ok=True)
    shot = os.path.join(SHOTS, name + ".png")
    screenshot_view(page, graph_bounds(page))
    zoom = page.evaluate("() => window.app.canvas.ds.scale")
    assert zoom >= 0.45, f"the graph is drawn at zoom {zoom:.2f}: too small to read"
    page.screenshot(path=shot)
    assert os.path.getsize(shot) > 10_000
    small = os.path.join(SMALL_SHOTS, name + ".png")
    small_png(shot, small)
    thumb = os.path.join(THUMBS, name + ".jpg")
    thumbnail_jpg(shot, thumb, graph_box_on_screen(page))
    if UPDATE_DOCS:
        os.makedirs(DOC_SHOTS, exist_ok=True)
        shutil.copyfile(small, os.path.join(DOC_SHOTS, name + ".png"))
        shutil.copyfile(thumb, os.path.join(WF_DIR, name + ".jpg"))  # the Templates browser's thumbnail

    # the editor's own conversion against ours (from the same server's definitions)
    ui_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    defs = srv.get_json("/object_info")
    ours = W.to_prompt(wf, defs)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert json.loads(json.dumps(strip(ui_prompt))) == strip(ours)


HELP_NODE = "SVDiffTrain"
HELP_URL = f"/extensions/ComfyUI-SVDiff/docs/{HELP_NODE}.md"  # /extensions/<pack folder>/ serves WEB_DIRECTORY


def test_node_help_opens_from_the_selection_toolbox(editor):
    """Select SVDiff Train on the canvas and press the selection toolbox's info button, as a
    user does: the editor fetches the pack's help page (docs/<node id>/<locale>.md, then
    docs/<node id>.md) and shows it rendered, pictures included (1.32.9 in the node library's
    side bar, 1.49.6 in the right-hand panel's Info tab)."""
    srv, page, errors = editor
    with open(os.path.join(REPO, "web", "docs", HELP_NODE + ".md"), encoding="utf-8") as f:
        markdown = f.read()
    wf = W.load(os.path.join(WF_DIR, "01_single_subject.json"))
    errors.clear()
    page.set_viewport_size({"width": 1600, "height": 1000})
    page.evaluate("async ([wf]) => { await window.app.loadGraphData(wf, true, true, 'help'); }", [wf])
    page.wait_for_timeout(800)
    fetched: list = []
    on_response = lambda r: fetched.append((r.url.split(srv.url, 1)[-1], r.status)) if "/docs/" in r.url else None  # noqa: E731
    page.on("response", on_response)
    try:
        found = page.evaluate("""(type) => {
            const n = window.app.graph.nodes.find(n => n.type === type);
            if (!n) return false;
            const c = window.app.canvas, s = 0.6;  // the node's top (and the toolbox above it) in view
            c.deselectAll && c.deselectAll();
            c.ds.scale = s;
            c.ds.offset[0] = 500 / s - n.pos[0];
            c.ds.offset[1] = 250 / s - n.pos[1];
            c.selectNode(n);
            c.setDirty(true, true);
            return true;
        }""", HELP_NODE)
        assert found, f"workflow 01 has no {HELP_NODE} node"
        button = page.locator("[data-testid=info-button]")
        button.wait_for(state="visible", timeout=10_000)
        button.click()
        content = page.locator(".node-help-content")
        content.wait_for(state="visible", timeout=15_000)
        page.wait_for_function("""() => {
            const c = document.querySelector('.node-help-content');
            return c && c.querySelector('h1') && [...c.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0);
        }""", timeout=15_000)
    finally:
        page.remove_listener("response", on_response)
    shown = content.inner_text()
    assert shown.splitlines()[0].strip() == "SVDiff Train", shown[:200]
    for name in ("prior_weight", "preview_every", "resume_from", "validation_prompt"):
        assert name in shown, f"the help panel does not show {name}"
    pictures = page.evaluate("() => [...document.querySelectorAll('.node-help-content img')].map(i => i.getAttribute('src'))")
    assert "/extensions/ComfyUI-SVDiff/docs/spectral_shift.png" in pictures, pictures
    assert (HELP_URL, 200) in fetched, fetched
    # the exact URL the editor used serves the committed page
    served = page.evaluate("async (u) => { const r = await fetch(u); return [r.status, await r.text()]; }", HELP_URL)
    assert served == [200, markdown]
    assert errors == [], errors
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, "node_help.png"))


def _training_workflow(defs: dict) -> dict:
    """A small SVDiff Train run a person can queue in the editor: two pictures of the pack,
    six steps at 64 px with a preview every two steps, the previews into a preview node."""
    b = W.WorkflowBuilder(defs)
    ck = b.node("CheckpointLoaderSimple", col=0, ckpt_name=demo_model.demo_checkpoint_name())
    imgs = [b.node("LoadImage", col=0, image=n) for n in ("robot_01.png", "robot_02.png")]
    batch = b.node("ImageBatch", col=1)
    b.link(imgs[0], 0, batch, "image1")
    b.link(imgs[1], 0, batch, "image2")
    tr = b.node("SVDiffTrain", col=2, prompt="photo of a sks robot", class_prompt="photo of a robot", prior_weight=0.0,
                steps=6, resolution=64, learning_rate=0.01, subset="UNet-CA", save_every=0, preview_every=2,
                validation_prompt="a sks robot", seed=1)
    for slot, name in ((0, "model"), (1, "clip"), (2, "vae")):
        b.link(ck, slot, tr, name)
    b.link(batch, 0, tr, "images")
    pv = b.node("PreviewImage", title="Previews during training", col=3)
    b.link(tr, 5, pv, "images")
    return b.build()


def test_training_shows_its_previews_on_the_node(editor):
    """Queue a short SVDiff Train run in the editor: the preview images arrive for the
    training node while it runs (the editor draws them on it), and the previews output fills
    the preview node; the screenshot is the README's picture of a run with previews."""
    srv, page, errors = editor
    wf = _training_workflow(srv.get_json("/object_info"))
    errors.clear()
    page.set_viewport_size({"width": 1600, "height": 1000})
    page.evaluate("async ([wf]) => { await window.app.loadGraphData(wf, true, true, 'training_previews'); }", [wf])
    page.wait_for_timeout(800)
    train_id = str(next(n["id"] for n in wf["nodes"] if n["type"] == "SVDiffTrain"))
    page.evaluate("""() => {
        window.__previews = [];
        window.app.api.addEventListener('b_preview_with_metadata', (e) =>
            window.__previews.push(String(e.detail.displayNodeId ?? e.detail.nodeId)));
    }""")
    before = set(srv.get_json("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + 240
    done = None
    while time.time() < deadline and done is None:
        page.wait_for_timeout(1000)
        hist = srv.get_json("/history")
        new = [k for k in hist if k not in before]
        if new and hist[new[0]].get("status", {}).get("completed") is not None:
            done = hist[new[0]]
    assert done is not None, "the training prompt did not finish"
    assert done["status"]["status_str"] == "success", done["status"]
    previews = page.evaluate("() => window.__previews")
    assert previews.count(train_id) >= 4, previews  # steps 0, 2, 4 and 6
    pv_id = str(next(n["id"] for n in wf["nodes"] if n["type"] == "PreviewImage"))
    assert len(done["outputs"][pv_id]["images"]) == 4
    page.wait_for_timeout(1500)
    screenshot_view(page, graph_bounds(page))
    os.makedirs(SHOTS, exist_ok=True)
    shot = os.path.join(SHOTS, "training_previews.png")
    page.screenshot(path=shot)
    small = os.path.join(SMALL_SHOTS, "training_previews.png")
    small_png(shot, small)
    if UPDATE_DOCS:
        os.makedirs(DOC_SHOTS, exist_ok=True)
        shutil.copyfile(small, os.path.join(DOC_SHOTS, "training_previews.png"))
    assert errors == [], errors


def test_skip_reason_is_loud_only_when_browser_missing():
    assert _REASON is None or "SKIPPED" in _REASON
