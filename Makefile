# Two commands on a fresh machine:  `make demo`  (set up + the main job)  and  `make test`  (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# torch/torchvision pinned to the builds on this machine's disk; pyproject admits the GPU machine's 2.11/0.26 too
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/kdforge demo

# one worker per core (pytest-xdist), a file's tests on one worker (its module fixtures run once), one torch
# thread each: 2 cores run the suite in about 5 minutes instead of 10
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -n auto --dist loadfile

lint: setup
	$(VENV)/bin/ruff check kdforge tests benchmarks

bench: setup
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/kd_cache.py
	$(PY) benchmarks/data_throughput.py
