# mlc: the usual entry points. `make demo` and `make test` set everything up on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= dist/smollm2-q4f32_1
QUANT   ?= q4f32_1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench-cpu clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,serve,ray,eval]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install mlc with test, serve, ray and eval extras

demo: install  ## convert + compile the embedded SmolLM2 and chat with it
	test -f $(DEMO)/mlc-chat-config.json || $(BIN)/mlc convert SmolLM2-135M-Instruct --quantization $(QUANT) -o $(DEMO)
	test -f $(DEMO)/lib-cpu.so || $(BIN)/mlc compile $(DEMO) --device cpu -o $(DEMO)/lib-cpu.so
	$(BIN)/python examples/quickstart.py $(DEMO)

test: install  ## the full test suite (CPU; GPU tests skip without a GPU)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install  ## the tests that need no embedded model
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check mlc mlc_llm tests bench examples

bench-cpu: install
	$(BIN)/python bench/cpu.py

clean:
	rm -rf dist .cache build *.egg-info
