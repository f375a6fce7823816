# hotswap developer entry points.  Everything runs inside $(VENV).
#   make test         fast suite (also fetches the embedded model once)
#   make test-slow    long suites
#   make serve ARGS="--port 8000"
#   make bench ARGS="..."

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_WHEEL := /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install model serve test test-slow bench clean

install: $(VENV)/.installed

# Re-runs whenever pyproject.toml changes.  torch goes in first, CPU-only:
# a plain `pip install torch` from PyPI is a multi-GB CUDA build we don't need.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	if [ -f "$(TORCH_WHEEL)" ]; then \
		$(PIP) install "$(TORCH_WHEEL)"; \
	else \
		$(PIP) install torch; \
	fi
	$(PIP) install -e '.[test]'
	touch $@

# Fetch + convert the embedded default model into $HOTSWAP_HOME (once).
model: install
	$(PY) -m server.models.embedded

serve: install model
	$(VENV)/bin/hotswap serve $(ARGS)

test: install model
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

# pytest exits 5 when nothing is marked slow: that is not a failure
test-slow: install model
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: install model
	$(PY) -m loadtests.bench_adapters $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
