"""Start ComfyUI's real ``main.py`` server with the pack and the demo-only nodes linked in.

Used by ``make serve`` (tools/serve.py), tests/e2e/test_server.py and tests/e2e/test_browser.py.
The server gets a private ``--base-directory`` (models, input, output, custom_nodes), an
in-memory database, and ``--cpu``; nothing in the ComfyUI checkout is written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import comfy_env, demo_model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(base: str) -> str:
    """A base directory with the pack and the demo nodes linked into custom_nodes."""
    comfy_env.prepare_base_dir(base)
    demo_model.link_demo_nodes(base)
    return base


def command(base: str, port: int, extra=()) -> list[str]:
    return [
        sys.executable, os.path.join(comfy_env.comfy_path(), "main.py"),
        "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
        "--base-directory", base, "--database-url", "sqlite:///:memory:", *extra,
    ]


def _default_sigint() -> None:
    """In the child: Ctrl-C back to its default.  A shell that starts a job in the background
    (``make test &``, CI runners) sets SIGINT to "ignore", children inherit that, and Python then
    installs no KeyboardInterrupt handler: ComfyUI would never see the Ctrl-C that ``stop`` sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ComfyServer:
    """``with ComfyServer(base) as s: s.get_json("/object_info")`` (bounded start and stop)."""

    def __init__(self, base: str, port: int | None = None, start_timeout: float = 120.0, extra=()):
        self.base = prepare(os.path.abspath(base))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.extra = tuple(extra)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.base, "server.log")

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> "ComfyServer":
        self._log = open(self.log_path, "w", encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command(self.base, self.port, self.extra), cwd=comfy_env.comfy_path(),
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_default_sigint)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.start_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Ctrl-C (SIGINT, ComfyUI's own clean exit), then SIGTERM/SIGKILL if it hangs."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()
        return p.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP -----------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` of a GET (an HTTP error status is returned, not raised)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def post_json(self, path: str, data, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read().decode() or "null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "null")

    def queue(self, prompt: dict, client_id: str = "svdiff-test") -> str:
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            raise AssertionError(f"/prompt refused the prompt ({status}): {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """The /history entry of a finished prompt (raises on timeout or on an error status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get_json(f"/history/{prompt_id}")
            if prompt_id in h:
                entry = h[prompt_id]
                st = entry.get("status", {})
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    if st.get("status_str") == "error":
                        raise AssertionError(f"prompt {prompt_id} failed: {json.dumps(st.get('messages'))[:3000]}")
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")

    def output_files(self, entry: dict) -> list[str]:
        """Full paths of the images/files a finished prompt reported in its outputs."""
        out = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for it in items:
                    if isinstance(it, dict) and "filename" in it:
                        root = {"output": "output", "temp": "temp", "input": "input"}.get(it.get("type", "output"), "output")
                        out.append(os.path.join(self.base, root, it.get("subfolder", ""), it["filename"]))
        return out
