# The two commands of the README: `make reproduce` (install + main job) and `make test` (install + tests).
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: setup test reproduce bench gpu-check clean

setup: $(STAMP)

# torch and torchvision are pinned together in requirements.txt and installed by one pip command,
# so pip cannot pull a mismatched build of either.
$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q tests

reproduce: setup
	$(PYTHON) reproduce.py

bench: setup
	for b in bench/*.py; do [ $$b = bench/gpu_check.py ] || $(PYTHON) $$b || exit 1; done

# On one CUDA GPU, <= 5 minutes: tiny semantic_kitti and nyu_ssc runs through torchrun + NCCL, AMP bf16,
# channels_last, and the GPU benchmarks; one JSON line per check. Without CUDA it says so and exits 0.
gpu-check: setup
	$(PYTHON) bench/gpu_check.py

clean:
	rm -rf results .pytest_cache
