# hotswap developer entry points.  Everything runs inside $(VENV).
#   make test         fast suite (also fetches the embedded model once)
#   make test-slow    long suites
#   make fuzz         API fuzzing (tests/test_fuzz_api.py), 500 cases per operation instead of make test's 40
#   make serve ARGS="--port 8000"
#   make bench ARGS="..."   hotswap vs vLLM CPU vs llama.cpp vs naive HF+peft vs base-only (loadtests/compare.py; --quick for a smoke run)
#   make llama-cpp          build the bench's llama.cpp peer (llama-server from the llama-cpp-python sdist) into .llama-cpp, once
#   make soak ARGS="..."    10-minute soak of one server (loadtests/soak.py; --duration 60 for a smoke run)
#   make bench-quant        none/int8/int4 base: tokens/s, memory, perplexity (loadtests/bench_quant.py)
#   make conformance        API responses compared field by field with vLLM CPU's (loadtests/conformance.py)
#   make gpu-check ARGS="..."  on a CUDA machine: GPU tests, kernel benchmarks, hotswap vs vLLM -> gpu-report.md (loadtests/gpu_check.py)
# Older micro-benchmarks, run directly:
#   $(PY) -m loadtests.bench_adapters   engine level: many adapters vs base only
#   $(PY) -m loadtests.bench_families   engine level: adapter families side by side
#   $(PY) -m loadtests.bench_registry   registry cold/warm/hot TTFT, Zipf over 1,000 adapters
#   $(PY) -m kernels.bench_cpu          the segmented LoRA op vs its reference
#   $(PY) -m kernels.bench_quant        quantized GEMMs vs float32 per layer shape
#   $(PY) -m loadtests.profile_step     torch.profiler over decode steps with many adapters
#   $(PY) -m kernels.bench              Triton kernels vs torch (needs a CUDA GPU)
#   $(PY) -m loadtests.loadgen --help   the load generator on its own, against any OpenAI-compatible URL

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_WHEEL := /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
ARGS ?=
PYTEST_ARGS ?=
FUZZ_EXAMPLES ?= 500

VLLM_VENV := .venv-vllm
LLAMA_CPP_DIR := .llama-cpp

.PHONY: install model serve test test-slow fuzz bench bench-install bench-quant conformance vllm llama-cpp soak clean

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
	$(PIP) install -e '.[test,ray]'
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

# Schema-driven fuzzing of every HTTP operation against a hostile-configured server, far longer than
# in `make test`; HOTSWAP_FUZZ_SEED=<n> explores other cases, as reproducibly.
fuzz: install model
	HOTSWAP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz_api.py -q $(PYTEST_ARGS)

# The bench extra (matplotlib, peft) on top of the test install.
bench-install: $(VENV)/.bench-installed

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -e '.[test,bench]'
	touch $@

# vLLM CPU, the comparison's peer, in its own venv (idempotent: the script keeps a stamp file).
vllm:
	PYTHON=$(PYTHON) loadtests/setup_vllm.sh $(VLLM_VENV)

# llama.cpp's llama-server + llama-quantize + the GGUF converters' venv, the other peer, in its own directory
# (idempotent: the script keeps a stamp file; the build takes a while on 2 cores, at nice 19).
llama-cpp:
	PYTHON=$(PYTHON) loadtests/setup_llama_cpp.sh $(LLAMA_CPP_DIR)

bench: bench-install model vllm llama-cpp
	$(PY) -m loadtests.compare $(ARGS)

soak: bench-install model
	$(PY) -m loadtests.soak $(ARGS)

# API conformance against the vLLM CPU server (loadtests/conformance.py; report in var/conformance/report.md)
conformance: bench-install model
	$(PY) -m loadtests.conformance $(ARGS)

bench-quant: bench-install model
	$(PY) -m loadtests.bench_quant --plot docs/img/quantization.png $(ARGS)

# No `install` prerequisite, on purpose: that recipe installs $(TORCH_WHEEL), a CPU torch, wherever that
# file exists, over the CUDA torch of a GPU venv. So: the venv's Python when there is one (made with a
# CUDA torch: README "On a GPU"), else $(PYTHON) (the CUDA image installs into the system Python).
# Without CUDA it exits 2 after one line.
.PHONY: gpu-check
gpu-check:
	@if [ -x "$(PY)" ]; then py="$(PY)"; else py="$(PYTHON)"; fi; \
	echo "$$py -m loadtests.gpu_check $(ARGS)"; \
	"$$py" -m loadtests.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
