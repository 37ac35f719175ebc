# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use, pins the CPU wheel of torch, and installs sparsecomm with every
# other package at the version in constraints.txt (the tested environment; `make constraints`
# regenerates it from a venv that passed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-0.5

.PHONY: demo demo-codec test constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pin first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,rl,trl,research,deepspeed,federated,merge]'
	touch $@

# Record the current venv's versions as the tested environment (run after the tests passed).
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

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
