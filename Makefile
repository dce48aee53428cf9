# SVDiff for ComfyUI: set-up, tests, demo, editor.  Every target provisions what it needs.
SHELL := /bin/bash
PY := .venv/bin/python
PROVISION := bash tools/provision.sh
PYTEST_ARGS ?=

.PHONY: setup test demo serve bench clean

setup:
	@$(PROVISION) >/dev/null

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

serve: setup
	$(PY) tools/serve.py

bench: setup
	$(PY) -m pip install -q -c .venv/torch-constraints.txt -r requirements-bench.txt
	$(PY) bench/run_all.py

clean:
	rm -rf .venv .comfyui build

.PHONY: toyworld
# Rebuild the toy world's committed weights on the CPU (classifier, then VAE + UNet + CLIP; ~40 min on 2 idle cores).
toyworld: setup
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/classifier.py
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/train.py
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/evaluate.py
