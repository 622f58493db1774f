#!/usr/bin/env bash
# GPU check (docs/SCALING.md): the default model on CUDA in bfloat16 -- parity with plain transformers, an
# activation-patching sweep and a steered generation, with ratios -- in about five minutes.
#   bash benchmarks/gpu_check.sh [--dtype float16] [--device cuda:1]
# Needs a CUDA build of torch in .venv (make setup pins the CPU wheel: pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu126 replaces it on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
exec .venv/bin/python benchmarks/gpu_check.py --device cuda --dtype bfloat16 --out runs/gpu_check.json "$@"
