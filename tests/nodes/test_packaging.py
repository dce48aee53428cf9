"""What the Comfy Registry and the editor read from the pack besides its nodes: the icon
(pyproject ``[tool.comfy] Icon``), the workflow templates' thumbnails and the node help pages
(``web/docs/<node id>.md``, served from the pack's WEB_DIRECTORY)."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ICON = os.path.join(REPO, "assets", "icon.png")
WF_DIR = os.path.join(REPO, "example_workflows")
HELP_DIR = os.path.join(REPO, "web", "docs")


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


def pack_schemas(comfy) -> dict:
    import nodes

    name = comfy["pack_name"]
    return {k: v.GET_SCHEMA() for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "__module__", "").startswith(name)}


def test_pack_declares_its_web_directory_and_comfyui_serves_it(comfy):
    """ComfyUI reads WEB_DIRECTORY from the pack's __init__ (V3 comfy_entrypoint packs too) and
    serves it at /extensions/<pack folder>/, where the editor looks for docs/<node id>.md."""
    import nodes

    assert comfy["pack"].WEB_DIRECTORY == "./web"
    served = nodes.EXTENSION_WEB_DIRS.get("ComfyUI-SVDiff")
    assert served and os.path.realpath(served) == os.path.realpath(os.path.join(REPO, "web")), nodes.EXTENSION_WEB_DIRS
    # the web folder carries no JavaScript: the editor would load every .js there as an extension
    assert not [f for _, _, fs in os.walk(os.path.join(REPO, "web")) for f in fs if f.endswith(".js")]


def test_every_node_has_a_help_page_naming_each_input(comfy):
    schemas = pack_schemas(comfy)
    assert len(schemas) == 14, sorted(schemas)
    pages = {f[:-3] for f in os.listdir(HELP_DIR) if f.endswith(".md")}
    assert pages == set(schemas), (sorted(pages ^ set(schemas)))
    for nid, schema in schemas.items():
        with open(os.path.join(HELP_DIR, nid + ".md"), encoding="utf-8") as f:
            text = f.read()
        assert text.startswith(f"# {schema.display_name}\n"), f"{nid}.md must open with its display name"
        missing = [i.id for i in schema.inputs if f"`{i.id}`" not in text]
        assert not missing, f"web/docs/{nid}.md does not name the inputs {missing}"
        named_outputs = [o.display_name for o in schema.outputs if o.display_name]
        assert all(n in text for n in named_outputs), (nid, named_outputs)
        assert re.search(r"\b(Eq|Fig|Table|Sec)\.? ?\d", text), f"{nid}.md cites no equation, figure or section of the paper"
        for pic in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert not pic.startswith(("/", "http")), f"{nid}.md: {pic} must be relative (the editor prefixes the docs URL)"
            path = os.path.join(HELP_DIR, pic)
            assert os.path.isfile(path) and os.path.getsize(path) < 64 * 1024, (nid, pic)


def test_help_pictures_are_what_make_assets_draws():
    from PIL import Image, ImageChops

    spec = importlib.util.spec_from_file_location("make_assets", os.path.join(REPO, "tools", "make_assets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, drawn in (("spectral_shift.png", mod.icon()), ("cutmix_left_right.png", mod.cutmix_sample())):
        with Image.open(os.path.join(HELP_DIR, name)) as committed:
            committed = committed.convert(drawn.mode)
            assert ImageChops.difference(committed, drawn).getbbox() is None, f"{name}: run tools/make_assets.py"
