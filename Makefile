# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use, pins the CPU wheel of torch, and installs sparsecomm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-0.1

.PHONY: demo test bench-codec clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pin first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/sparsecomm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench-codec: $(STAMP)
	$(PY) benchmarks/bench_codec.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
