"""Boot a real ComfyUI in this process and load the SVDiff pack the way ComfyUI does."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import importlib.util
import inspect

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "ComfyUI-SVDiff"
_STATE: dict = {}


def default_tree(version: str | None = None) -> str:
    """Where tools/provision.sh puts a ComfyUI version: .comfyui (0.3.75) or .comfyui-<version>."""
    version = version or os.environ.get("SVDIFF_COMFYUI") or "0.3.75"
    return os.path.join(REPO, ".comfyui" if version == "0.3.75" else f".comfyui-{version}")


def comfy_path() -> str:
    p = os.environ.get("COMFYUI_PATH") or default_tree()
    if not os.path.isfile(os.path.join(p, "main.py")):
        raise RuntimeError(f"no ComfyUI at {p}: run tools/provision.sh (make test does) or set COMFYUI_PATH")
    return os.path.abspath(p)


def comfy_version(path: str | None = None) -> str:
    """The version of the ComfyUI tree at ``path`` (default: the one the harness uses), read
    from its ``comfyui_version.py``; "unknown" when it has none."""
    import re

    try:
        with open(os.path.join(path or comfy_path(), "comfyui_version.py"), encoding="utf-8") as f:
            m = re.search(r'__version__\s*=\s*"([^"]+)"', f.read())
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def prepare_base_dir(base: str) -> str:
    """A ComfyUI base directory (models, input, output, temp, user, custom_nodes) with the pack linked in."""
    os.makedirs(base, exist_ok=True)
    for d in ("models", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_DIR_NAME)
    if not os.path.lexists(link):
        os.symlink(REPO, link)
    return base


def pack_module_name(base: str) -> str:
    """The sys.modules name ComfyUI 0.3.75's load_custom_node gives a pack folder."""
    return os.path.join(base, "custom_nodes", PACK_DIR_NAME).replace(".", "_x_")


def register_pack_package(name: str) -> None:
    """Import the pack under ``name`` (its __init__ imports no ComfyUI) and alias ``svdiff``.

    Tests can then ``import svdiff.shift`` and get the very module objects the nodes use.
    """
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    import importlib as _il

    core = _il.import_module(name + ".svdiff")
    sys.modules.setdefault("svdiff", core)
    # Import every core module under the pack's name and alias it as svdiff.<module>, so
    # tests and nodes share the same module objects (and classes).
    for fn in sorted(os.listdir(os.path.join(REPO, "svdiff"))):
        if fn.endswith(".py") and fn != "__init__.py":
            sub = fn[:-3]
            m = _il.import_module(f"{name}.svdiff.{sub}")
            sys.modules.setdefault(f"svdiff.{sub}", m)


def alias_core_modules(name: str) -> None:
    """Make every already-imported ``<pack>.svdiff.X`` also importable as ``svdiff.X``."""
    prefix = name + ".svdiff."
    for k, m in list(sys.modules.items()):
        if k.startswith(prefix):
            sys.modules.setdefault("svdiff." + k[len(prefix):], m)


def boot(base: str, extra_args=()) -> dict:
    """Import ComfyUI with --cpu and ``base`` as its base directory, and load custom nodes.

    Returns a dict with ``nodes`` (ComfyUI's nodes module), ``pack`` (our package module),
    ``pack_name``, ``import_failed`` and ``log`` (captured start-up log lines).
    """
    if _STATE:
        return _STATE
    cp = comfy_path()
    base = prepare_base_dir(os.path.abspath(base))
    name = pack_module_name(base)
    register_pack_package(name)
    if cp not in sys.path:
        sys.path.insert(0, cp)
    sys.argv = ["main.py", "--cpu", "--base-directory", base, "--disable-auto-launch", *extra_args]
    import comfy.options

    comfy.options.enable_args_parsing()
    records: list = []

    class _Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Capture(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        # main.py imports ComfyUI's `utils` package before `nodes` (which puts comfy/ first on
        # sys.path, where comfy/utils.py would shadow it): do the same.
        import utils.extra_config  # noqa: F401
        import folder_paths  # noqa: F401  (reads --base-directory)
        import execution  # noqa: F401
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(handler)
    alias_core_modules(name)
    _STATE.update(
        nodes=nodes,
        pack=sys.modules[name],
        pack_name=name,
        base=base,
        comfy_path=cp,
        log=records,
        import_failed=[r for r in records if PACK_DIR_NAME in r and ("IMPORT FAILED" in r or "Cannot import" in r)],
        builtin_import_failed=[r for r in records if "IMPORT FAILED" in r and PACK_DIR_NAME not in r],
    )
    return _STATE


def pack_module(sub: str):
    """``pack_module('nodes.shifts')``: a submodule of the loaded pack."""
    import importlib as _il

    return _il.import_module(f"{_STATE['pack_name']}.{sub}")


class FakeServer:
    """A duck-typed PromptServer for running graphs through ``execution.PromptExecutor``."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def new_executor(server=None):
    """ComfyUI's ``PromptExecutor`` with the classic cache, as the tests and the demo use it.

    ``cache_args`` carries every key either supported version reads: 0.33 also reads
    ``ram_inactive`` (a KeyError without it); 0.3.75 ignores it.
    """
    import execution

    return execution.PromptExecutor(server or FakeServer(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})


def cached_outputs(executor, node_id: str):
    """The outputs a node left in the executor's output cache (a list per output), or None.

    0.3.75's cache ``get`` is synchronous; 0.33's is a coroutine, with ``get_local`` as the
    synchronous read.
    """
    cache = executor.caches.outputs
    getter = getattr(cache, "get_local", None) or cache.get
    entry = getter(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return None if entry is None else entry.outputs


def cached_checkpoint(executor, node_id: str) -> tuple:
    """(MODEL, CLIP) a checkpoint loader left in the executor's cache."""
    outs = cached_outputs(executor, node_id)
    assert outs is not None, "the checkpoint loader's outputs are not cached"
    return outs[0][0], outs[1][0]


def run_prompt(prompt: dict, prompt_id: str = "1", executor=None, extra_data: dict | None = None):
    """Validate and execute an API-format prompt; returns (executor, history outputs).

    ``extra_data``: what the server passes along with a queued prompt (e.g.
    ``{"extra_pnginfo": {"workflow": ...}}``, the editor's workflow).
    Raises AssertionError with ComfyUI's own validation errors if the prompt is invalid.
    """
    import execution

    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    ok, err, outputs, node_errors = valid[:4]
    if not ok:
        raise AssertionError(f"prompt invalid: {err} {node_errors}")
    if executor is None:
        executor = new_executor()
    executor.execute(prompt, prompt_id, dict(extra_data or {}), outputs)
    return executor, executor.history_result.get("outputs", {}) if executor.history_result else {}
