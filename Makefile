# The two commands of the README:
#   make smoke   set up .venv and run the CPU smoke pipeline (the main job)
#   make test    set up .venv and run the test suite (fast default suite, then the slow tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
EXTRAS := data,cluster,monitoring,test,eval

.PHONY: setup smoke test test-fast test-slow bench clean

setup: $(STAMP)

# The install steps live in scripts/install.sh, which docker/Dockerfile runs too: the image and
# this venv get the same pins, the same torch-first order and the same pre-built DeepSpeed ops.
$(STAMP): pyproject.toml constraints.txt scripts/install.sh scripts/setup_system.sh
	$(PYTHON) -m venv $(VENV)
	bash scripts/install.sh $(PY) $(EXTRAS)
	bash scripts/setup_system.sh
	touch $(STAMP)

smoke: $(STAMP)
	$(PY) -m launchers.pipeline

# `make test` runs everything; the two halves can be run on their own while developing.
test: test-fast test-slow

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Exit code 5 means "no test collected": not a failure while an area has no slow tests yet.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

# Every benchmark prints ours against a baseline measured in the same run; figures and the
# machine they came from go to docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m benchmarks.kernels --threads 1
	$(PY) -m benchmarks.short_conv --threads 1
	$(PY) -m benchmarks.model
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.prep
	$(PY) -m benchmarks.metrics
	$(PY) -m benchmarks.cluster

clean:
	rm -rf $(VENV) .pytest_cache runs
