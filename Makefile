# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with
# Python 3.11: they create .venv and install the project first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/widedeep simulate --out $(DEMO_DIR)/logs --days 1 --rows-per-day 50000 --seed 0 --overwrite
	$(BIN)/widedeep datagen --config app_store --input $(DEMO_DIR)/logs --out $(DEMO_DIR)/data --overwrite
	$(BIN)/widedeep train --config app_store --data $(DEMO_DIR)/data --out $(DEMO_DIR)/model --overwrite
	$(BIN)/widedeep validate --model $(DEMO_DIR)/model --data $(DEMO_DIR)/data --model_base_path $(DEMO_DIR)/serving
	$(BIN)/widedeep deploy --model $(DEMO_DIR)/model --model_base_path $(DEMO_DIR)/serving

lint: $(STAMP)
	$(BIN)/ruff check pipeline transform trainer serving tests bench
	$(BIN)/ruff format --check pipeline transform trainer serving tests bench

test: $(STAMP)
	$(BIN)/ruff check pipeline transform trainer serving tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/datagen_bench.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
