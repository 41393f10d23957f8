# Set-up and the two jobs of the README, all installs from the lock.
#   make example       install, write the bundled demo BIDS dataset, run the BIDS App on it (participant, then
#                      group level, even when a participant failed; exits non-zero at the end if anything failed)
#   make test          install and run the test suite
#   make lock          regenerate requirements/lock.txt from pyproject.toml (pip-tools; PIP_COMPILE_ARGS=--upgrade
#                      moves every package to its newest allowed release)
#   make check-latest  the newest releases pyproject.toml allows, in a separate venv, through a smoke subset of the
#                      tests: run it before a lock refresh lands
# torch comes first, from requirements/torch.txt (exact pin); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes its CPU-only build where PyPI's would be the CUDA one. The lock holds every other package, exactly.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
CONTAINER_LOCK := requirements/container.txt
TORCH_REQUIREMENT := requirements/torch.txt
TORCH_INDEX ?=
PIP_PIN := pip==26.3
PIP_TOOLS_PIN := pip-tools==7.7.0
PIP_COMPILE_ARGS ?=
TOOLS_VENV := .venv-tools
LATEST_VENV := .venv-latest
EXAMPLE := example

PIP = $(1)/bin/python -m pip install -q --disable-pip-version-check
TORCH_INSTALL = $(call PIP,$(1)) -r $(TORCH_REQUIREMENT) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: install example run-example test lock check-latest clean

%/bin/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "rwcflow: requirements/lock.txt is resolved for Python >= 3.11; $(PYTHON) is older (PYTHON=python3.11 make ...)")'
	$(PYTHON) -m venv $*

$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK) $(TORCH_REQUIREMENT)
	$(call PIP,$(VENV)) $(PIP_PIN)
	$(call TORCH_INSTALL,$(VENV))
	$(call PIP,$(VENV)) -r $(LOCK) -c $(TORCH_REQUIREMENT)
	$(call PIP,$(VENV)) --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed

# the group level runs even when a participant failed (the App isolates failures), then the demo's check of the
# derivatives against its truth (rwcflow-demo-check); the status is the first failure's.
# run-example is the run alone, on an installed venv; DEMO_ARGS and EXAMPLE_ARGS pass options to
# rwcflow-demo-data and to both levels of rwcflow.
DEMO_ARGS ?=
EXAMPLE_ARGS ?=
example: install
	$(MAKE) --no-print-directory run-example

run-example:
	test -d $(EXAMPLE)/bids || $(BIN)/rwcflow-demo-data $(EXAMPLE)/bids $(DEMO_ARGS)
	status=0; \
	$(BIN)/rwcflow $(EXAMPLE)/bids $(EXAMPLE)/derivatives participant -w $(EXAMPLE)/work $(EXAMPLE_ARGS) || status=$$?; \
	$(BIN)/rwcflow $(EXAMPLE)/bids $(EXAMPLE)/derivatives group -w $(EXAMPLE)/work $(EXAMPLE_ARGS) || status=$$?; \
	$(BIN)/rwcflow-demo-check $(EXAMPLE)/bids $(EXAMPLE)/derivatives || status=$$((status ? status : $$?)); \
	exit $$status

test: install
	$(BIN)/python -m pytest -q

$(TOOLS_VENV)/.installed: $(TOOLS_VENV)/bin/python
	$(call PIP,$(TOOLS_VENV)) $(PIP_PIN) $(PIP_TOOLS_PIN)
	touch $@

# the development lock (with the tests) and the container's (with the BIDS validator), both without torch
PIP_COMPILE = $(TOOLS_VENV)/bin/pip-compile --quiet --strip-extras --unsafe-package torch --no-emit-index-url \
	--no-emit-find-links --constraint $(TORCH_REQUIREMENT) $(PIP_COMPILE_ARGS)
lock: $(TOOLS_VENV)/.installed
	$(PIP_COMPILE) --extra test --output-file $(LOCK) pyproject.toml
	$(PIP_COMPILE) --extra validator --output-file $(CONTAINER_LOCK) pyproject.toml

check-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) $(LATEST_VENV)/bin/python
	$(call PIP,$(LATEST_VENV)) --upgrade pip
	$(call TORCH_INSTALL,$(LATEST_VENV))
	$(call PIP,$(LATEST_VENV)) --upgrade --upgrade-strategy eager -c $(TORCH_REQUIREMENT) -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip check
	@echo "releases other than $(LOCK)'s:"; $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable \
	    | tr 'A-Z_' 'a-z-' | grep -v '^torch==' | sort | comm -13 <(grep -E '^[a-z0-9]' $(LOCK) | tr '_' '-' | sort) - || true
	$(LATEST_VENV)/bin/python -m pytest -q -m smoke

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(LATEST_VENV) $(EXAMPLE)
