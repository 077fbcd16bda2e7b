# The two commands a newcomer needs: `make train` and `make test`.
# Each creates .venv (with the package installed editable) when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: install train test test-fast lint clean

$(BIN)/tailtune-train: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,optuna]"
	touch $@

install: $(BIN)/tailtune-train

train: install  ## the default experiment; pass overrides with ARGS="loss=focal sampler=over"
	$(BIN)/tailtune-train $(ARGS)

test: install  ## the whole test suite (offline)
	$(BIN)/pytest -q $(ARGS)

test-fast: install  ## the fast tier for daily work
	$(BIN)/pytest -q -m "not slow" $(ARGS)

lint: install
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
