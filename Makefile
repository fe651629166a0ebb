# The two commands of the README: `make demo` and `make test`. Both create the virtual
# environment first. PyTorch is pinned to the build these machines carry locally; any
# torch>=2.4,<3 works for terabrain itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-launchers bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/terabrain train

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

# The slow half of tests/test_launchers_real.py: training under real srun and mpirun
# (2-rank equivalence, pre-emption); .ci/run runs it after `make test`.
test-launchers: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_launchers_real.py

bench: $(STAMP)
	$(BIN)/python bench/step_overhead.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/io.py
	$(BIN)/python bench/local_layer.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/deep_model_parallel.py
	$(BIN)/python bench/cpu_threads.py
	$(BIN)/python bench/shard_affine.py

clean:
	rm -rf $(VENV) runs .pytest_cache
