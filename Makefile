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
# Rebuild the toy world's committed weights on the CPU: classifier, stage 1 (VAE + UNet/CLIP 4,000 steps),
# stage 2 (UNet/CLIP 8,000 more steps, cosine decay). About 1.5 h on 2 idle cores (tools/toyworld/README.md).
toyworld: setup
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/classifier.py
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-2} $(PY) tools/toyworld/train.py --out build/toyworld/stage1.safetensors
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-2} $(PY) tools/toyworld/train.py --init-from build/toyworld/stage1.safetensors \
		--unet-steps 8000 --n-latents 16000
	TOYWORLD_THREADS=$${TOYWORLD_THREADS:-1} $(PY) tools/toyworld/evaluate.py
