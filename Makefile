# Set-up and the two jobs of the README. `make example`: install, write the bundled demo BIDS dataset and
# run the BIDS App on it (participant, then group level). `make test`: install and run the test suite.
# torch is installed first with an exact pin (CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
EXAMPLE := example

.PHONY: install example test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

example: install
	test -d $(EXAMPLE)/bids || $(BIN)/rwcflow-demo-data $(EXAMPLE)/bids
	$(BIN)/rwcflow $(EXAMPLE)/bids $(EXAMPLE)/derivatives participant -w $(EXAMPLE)/work
	$(BIN)/rwcflow $(EXAMPLE)/bids $(EXAMPLE)/derivatives group -w $(EXAMPLE)/work

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(EXAMPLE)
