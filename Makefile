# The two commands of the README (`make demo`, `make test`) set up everything themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?=
DEMO_DIR := demo

.PHONY: demo test install bench bench-accuracy clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Build requirements first: the project is then built without isolation, incrementally.
	$(PIP) install -q "scikit-build-core>=0.10" "nanobind>=2.0" ninja cmake
	$(PIP) install -q numpy safetensors click huggingface_hub jsonschema tokenizers jinja2 ml_dtypes uvicorn starlette prometheus-client
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(PIP) install -q pytest torch==2.13.0 "transformers>=4.51" openai httpx
	# The [mpi] extra, so that the MPI tests and bench lines run (they are skipped without it).
	$(PIP) install -q "mpi4py>=4.0" mpich
	touch $@

# Rebuilds the C++ extension incrementally (build/ keeps the CMake tree between runs).
install: $(VENV)/.deps
	flock /tmp/qwen3pack-install.lock $(PIP) install -q --no-build-isolation --no-deps .

test: $(VENV)/.test-deps install
	$(VENV)/bin/pytest -q

demo: install
	$(PY) -m qwen3pack.demo $(if $(MODEL),--model $(MODEL)) --out $(DEMO_DIR)

# Speed, as ratios against baselines measured in the same run (transformers comes with the test deps).
bench: $(VENV)/.test-deps install
	$(PY) -m qwen3pack.bench
	$(PY) -m qwen3pack.bench_serve

# q8 and q4 against f32 on a small Qwen3 trained here for the purpose (about 15 minutes on 2 cores).
bench-accuracy: $(VENV)/.test-deps install
	$(PY) -m qwen3pack.bench_accuracy

clean:
	rm -rf build $(DEMO_DIR)
