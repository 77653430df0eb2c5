# Two commands for a fresh clone (see README): `make demo` and `make test`.
# Everything goes into ./.venv; PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The toy world end to end on the CPU: builds the toy base model once (~1 min), trains, evaluates.
demo: setup
	$(BIN)/lora-dpo train recipes/toy.yaml

# The default test run: everything but tests marked slow.
test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
