# Every target creates .venv and installs fastbn with its dev extra on first use,
# so `make test` and `make bench` work on a fresh machine with only python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install test lint bench clean demo bench-mpi docs docs-serve bench-publish

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,examples]'
	touch $@

install: $(STAMP)

# Tests in pytest-xdist workers, one per logical CPU, at most 4 (`auto` would
# count physical cores through psutil: one worker on a 1-core, 2-thread
# runner).  Cold, on two cores: 491 s this way (pytest alone, here), and
# `make test` took 478-659 s in four CI rehearsals against 841 s in one process
# with the session-start precompile (tests/conftest.py); most of a cold run is
# Numba compiling, one core per process.  `--dist loadfile` was
# slower (over 646 s, one worker idle at the end).  `make test TEST_WORKERS=0`
# runs them in this process.  The ten slowest tests are listed, so a slow one
# shows in the CI log.
TEST_WORKERS ?= logical
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses=4 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check fastbn tests bench examples

# The deep-network demonstration: tables on the terminal, figures in DEMO_OUT.
DEMO_OUT  ?= examples/results
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/python examples/deep_network.py --out $(DEMO_OUT) $(DEMO_ARGS)

# Synchronized batch norm over MPI: 1, 2 and 3 ranks (the mpi extra brings MPICH).
MPI_STAMP := $(VENV)/.installed-mpi
$(MPI_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,examples,mpi]'
	touch $@
bench-mpi: $(MPI_STAMP)
	for n in 1 2 3; do $(BIN)/mpiexec -n $$n $(BIN)/python -m bench.mpi_bench || exit 1; done

# The documentation site (MkDocs + Material, API reference by mkdocstrings):
# `make docs` builds it into site/ with --strict (a broken link, a missing page
# or a docstring cross-reference that does not resolve fails the build);
# `make docs-serve` serves it on http://127.0.0.1:8000 with live reload.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,docs]'
	touch $@
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean
docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .hypothesis .benchmarks
	find . -name __pycache__ -prune -exec rm -rf {} +

# --- benchmarks and the performance gate (bench/) ---------------------------
# `make bench` installs the bench extra (JAX, autograd, matplotlib, rich) and,
# optionally, PyTorch; whatever fails to install is skipped as a peer, so the
# benchmark still runs with only the NumPy baselines.
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_TORCH ?= torch==2.13.0
BENCH_ARGS  ?=
BASE        ?= HEAD~1
COMPARE_ARGS ?=

.PHONY: perf-gate perf-compare

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,bench]' || { \
	  echo "bench: the bench extra did not install as a whole; trying its packages one by one"; \
	  for p in 'jax[cpu]' autograd matplotlib rich psutil; do \
	    $(BIN)/python -m pip install -q "$$p" || echo "bench: $$p unavailable (peer/feature skipped)"; \
	  done; }
	$(if $(BENCH_TORCH),$(BIN)/python -m pip install -q '$(BENCH_TORCH)' \
	  || echo "bench: $(BENCH_TORCH) unavailable; the PyTorch peer will be skipped",)
	touch $@

# A full-grid `make bench` (no BENCH_ARGS) also publishes its run: it rewrites
# bench/results/published.{json,md,png} (the Performance page and README's chart)
# and README's headline table; commit them. `make bench-publish JSON=...`
# publishes any saved run without re-running anything.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.cli $(BENCH_ARGS)
	$(if $(BENCH_ARGS),@echo "bench: BENCH_ARGS given: published results left as they are (make bench-publish)",\
	  $(BIN)/python -m bench.report --publish bench/results/latest.json)
	-$(BIN)/python -m bench.torch_bench  # fastbn.torch vs torch.nn (skipped without torch)
	-$(BIN)/python -m bench.fused_bench --bn-peers  # the fused block; torch.compile, oneDNN

JSON ?= bench/results/latest.json
bench-publish: $(BENCH_STAMP)
	$(BIN)/python -m bench.report --publish $(JSON)

perf-gate: $(STAMP)
	$(BIN)/python -m bench.perf_gate

perf-compare: $(STAMP)
	$(BIN)/python -m bench.perf_compare --base '$(BASE)' $(COMPARE_ARGS)
