# The two commands of the README:
#   make smoke   set up .venv and run the CPU smoke pipeline (the main job)
#   make test    set up .venv and run the test suite (fast default suite, then the slow tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
EXTRAS := data,cluster,monitoring,test

.PHONY: setup smoke test test-fast test-slow bench clean

setup: $(STAMP)

# Torch first, from the constraints file, so that deepspeed (which builds against torch)
# and everything else resolve against the CPU 2.13.0 build already on the machine.
$(STAMP): pyproject.toml constraints.txt scripts/setup_system.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel -c constraints.txt
	$(PIP) install -q torch==2.13.0 -c constraints.txt
	# DeepSpeed's CPU Adam and shared-memory comm ops are compiled here, once, instead of
	# JIT-compiling (2-3 min) inside the first training job of every fresh machine.
	DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
	  $(PIP) install -q --no-build-isolation --no-cache-dir deepspeed==0.19.8 -c constraints.txt
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]" -c constraints.txt
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
	$(PY) -m benchmarks.model
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.prep
	$(PY) -m benchmarks.metrics
	$(PY) -m benchmarks.cluster

clean:
	rm -rf $(VENV) .pytest_cache runs
