# The two set-up commands of the README:
#   make demo   create the environment, install, and run the embedded default (tiny DiP on synthetic data)
#   make test   create the environment, install, and run the test suite
# Installs take the exact versions in constraints.txt (the set CI passed with); `make lock` regenerates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
# torch from PyPI is its CUDA build (with the nvidia-* libraries and triton). On a machine without a GPU,
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# installs torch and torchvision of the pinned versions from PyTorch's CPU-only index first (their own
# dependencies then come from PyPI with the rest).
TORCH_INDEX ?=

.PHONY: setup demo test lint lock bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(if $(TORCH_INDEX),$(BIN)/pip install -c $(CONSTRAINTS) --no-deps --index-url $(TORCH_INDEX) torch torchvision)
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/pip install -c $(CONSTRAINTS) -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m dip_scale.demo

test: setup
	$(BIN)/python -m pytest -ra --durations=30

lint: setup
	$(BIN)/ruff check .

# Resolve the newest releases that pyproject.toml allows in a scratch environment and write them to
# constraints.txt. Then review `git diff constraints.txt` and run `make test` (it reinstalls .venv from the
# new file); commit constraints.txt only when the suite passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip setuptools wheel
	.lock-venv/bin/pip install -q '.[test]'
	{ echo "# Exact versions the test suite passed with: make setup / make test install with them."; \
	  echo "# Regenerate with 'make lock' (newest releases allowed by pyproject.toml), then 'make test'."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v -i '^dip[-_]scale'; } > $(CONSTRAINTS)
	rm -rf .lock-venv
	@echo "wrote $(CONSTRAINTS); now: git diff $(CONSTRAINTS) && make test"

clean-demo:
	rm -rf runs/demo
