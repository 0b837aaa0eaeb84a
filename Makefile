# The two commands of the README: `make reproduce` (install + main job) and `make test` (install + tests).
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: setup test reproduce bench clean

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
	for b in bench/*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf results .pytest_cache
