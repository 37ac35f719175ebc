# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use, pins the CPU wheel of torch, and installs sparsecomm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-0.3

.PHONY: demo demo-codec test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pin first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,rl,trl]'
	touch $@

# The main job: 2 workers under torchrun, SFT warm start then GRPO with ASPG at 1% (launch/recipes/demo.yaml)
demo: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/torchrun --nproc-per-node 2 --master-addr 127.0.0.1 \
		--master-port 29511 launch/train.py --config launch/recipes/demo.yaml

# The compression pipeline alone on a GPT-2-124M-sized update
demo-codec: $(STAMP)
	$(VENV)/bin/sparsecomm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
