# Set-up and the two jobs of the README. `make example`: install and register the bundled MNI152 pair.
# `make test`: install and run the test suite. torch is installed first with an exact pin (CPU build).
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
	$(BIN)/rwcflow-example $(EXAMPLE)/pair
	$(BIN)/rwcflow-register --fixed $(EXAMPLE)/pair/fixed_T1w.nii.gz --moving $(EXAMPLE)/pair/moving_T1w.nii.gz \
		--fixed-labels $(EXAMPLE)/pair/fixed_dseg.nii.gz --moving-labels $(EXAMPLE)/pair/moving_dseg.nii.gz \
		--out-dir $(EXAMPLE)/registered -v

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(EXAMPLE)
