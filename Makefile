# Two commands for a fresh clone (see README): `make demo` and `make test`.
# Everything goes into ./.venv; PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test test-all clean

setup: $(STAMP)

# the library, the app (`app` extra: gradio) and the development tools (`dev` extra)
$(STAMP): pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,app]'
	touch $(STAMP)

# The toy world end to end on the CPU (its base ships with the package): trains, evaluates.
demo: setup
	$(BIN)/lora-dpo train toy

# The structure: the layers and forbidden imports of pyproject.toml (import-linter), no import outside the top
# level but of the optional heavy dependencies (ruff PLC0415), no unused or undefined name (ruff F).
lint: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check lora_dpo app

# The default test run: the structure, then everything but tests marked slow.
test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
