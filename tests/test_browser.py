"""The bundled workflows in the real ComfyUI editor, in headless Debian Chromium.

Playwright drives ``/usr/bin/chromium`` (never a downloaded browser) against ComfyUI's
``main.py`` serving the pack and the demo nodes.  For each workflow: load it with the
editor's own ``app.loadGraphData``; no node may be reported missing or broken, no error
dialog may show; a screenshot goes to ``build/screenshots/`` (ignored) and a small copy to
``docs/screenshots/``; the editor's ``app.graphToPrompt()`` must equal our converter's
prompt (class types and every input).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from svdiff_testkit import demo_model
from svdiff_testkit import workflow as W
from svdiff_testkit.server import ComfyServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WF_DIR = os.path.join(REPO, "workflows")
WORKFLOWS = W.workflow_files(WF_DIR) if os.path.isdir(WF_DIR) else []
CHROMIUM = os.environ.get("SVDIFF_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.path.join(REPO, "build", "screenshots")
DOC_SHOTS = os.path.join(REPO, "docs", "screenshots")
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


@pytest.fixture(scope="module")
def editor(comfy):
    from playwright.sync_api import sync_playwright

    srv = ComfyServer(tempfile.mkdtemp(prefix="svdiff-browser-"), start_timeout=120)
    srv.start()
    # a returning user: no first-run templates dialog
    srv.post_json("/settings/Comfy.TutorialCompleted", True)
    srv.post_json("/settings/Comfy.Minimap.Visible", False)  # cleaner screenshots
    profile = tempfile.mkdtemp(prefix="svdiff-chromium-")
    pw = sync_playwright().start()
    browser = None
    try:
        # a fresh --user-data-dir: playwright passes it through launch_persistent_context
        browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                        viewport={"width": 1600, "height": 1000})
        page = browser.pages[0] if browser.pages else browser.new_page()
        errors: list = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url, timeout=60_000)
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=90_000)
        page.wait_for_timeout(1500)
        page.evaluate("""() => {  // close the 'Introducing Nodes 2.0' banner (screenshots only)
            const el = [...document.querySelectorAll('div')].find(d => d.children.length < 6 &&
                (d.innerText || '').startsWith('Introducing Nodes 2.0'));
            const btns = el ? el.querySelectorAll('button') : [];
            if (btns.length) btns[btns.length - 1].click();
        }""")
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


def small_png(src: str, dest: str, width: int = 960) -> None:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    img.save(dest, optimize=True)


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

    os.makedirs(SHOTS, exist_ok=True)
    shot = os.path.join(SHOTS, name + ".png")
    page.evaluate("""() => {  // fit the whole graph in view
        const ns = window.app.graph.nodes;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - 30));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const c = window.app.canvas;
        c.ds.fitToBounds([x0 - 120, y0 - 40, x1 - x0 + 160, y1 - y0 + 80], {zoom: 0.95});
        c.setDirty(true, true);
    }""")
    page.wait_for_timeout(400)
    page.screenshot(path=shot)
    assert os.path.getsize(shot) > 10_000
    small_png(shot, os.path.join(DOC_SHOTS, name + ".png"))

    # the editor's own conversion against ours (from the same server's definitions)
    ui_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    defs = srv.get_json("/object_info")
    ours = W.to_prompt(wf, defs)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert json.loads(json.dumps(strip(ui_prompt))) == strip(ours)


def test_skip_reason_is_loud_only_when_browser_missing():
    assert _REASON is None or "SKIPPED" in _REASON
