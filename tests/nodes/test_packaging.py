"""What the Comfy Registry and the editor read from the pack besides its nodes: the icon
(pyproject ``[tool.comfy] Icon``) and the workflow templates' thumbnails."""

from __future__ import annotations

import importlib.util
import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ICON = os.path.join(REPO, "assets", "icon.png")
WF_DIR = os.path.join(REPO, "example_workflows")


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_icon_is_a_small_square_png_and_pyproject_points_to_it():
    from PIL import Image

    with open(ICON, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", "assets/icon.png is not a PNG"
    with Image.open(ICON) as img:
        assert img.format == "PNG"
        w, h = img.size
    assert w == h and w <= 400, f"the Registry wants a square icon of at most 400x400, got {w}x{h}"
    assert os.path.getsize(ICON) < 64 * 1024
    cfg = pyproject()
    repo_url = cfg["project"]["urls"]["Repository"]
    owner_name = repo_url.removeprefix("https://github.com/").strip("/")
    assert cfg["tool"]["comfy"]["Icon"] == f"https://raw.githubusercontent.com/{owner_name}/main/assets/icon.png"


def test_icon_is_what_make_assets_draws():
    from PIL import Image, ImageChops

    spec = importlib.util.spec_from_file_location("make_assets", os.path.join(REPO, "tools", "make_assets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    drawn = mod.icon()
    with Image.open(ICON) as committed:
        committed = committed.convert(drawn.mode)
        assert committed.size == drawn.size
        assert ImageChops.difference(committed, drawn).getbbox() is None, "run tools/make_assets.py"


def test_every_example_workflow_has_its_thumbnail():
    """ComfyUI lists ``example_workflows/*.json`` as the pack's templates and the editor shows
    ``<name>.jpg`` beside each as its card picture (written by tests/e2e/test_browser.py with
    SVDIFF_UPDATE_SCREENSHOTS=1)."""
    from PIL import Image

    files = sorted(os.listdir(WF_DIR))
    names = [f[:-5] for f in files if f.endswith(".json")]
    assert names and sorted(f for f in files if not f.endswith(".json")) == sorted(n + ".jpg" for n in names)
    for n in names:
        path = os.path.join(WF_DIR, n + ".jpg")
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (512, 512), (n, img.format, img.size)
        assert os.path.getsize(path) < 100 * 1024, n
