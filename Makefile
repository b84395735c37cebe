# The two set-up commands of the README:
#   make demo   create the environment, install, and run the embedded default (tiny DiP on synthetic data)
#   make test   create the environment, install, and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m dip_scale.demo

test: setup
	$(BIN)/python -m pytest -ra

clean-demo:
	rm -rf runs/demo
