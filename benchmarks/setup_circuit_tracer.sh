#!/usr/bin/env bash
# Create/refresh benchmarks/.venv-circuit-tracer (idempotent): circuit-tracer caps transformers at 4.57.3, so it gets its own venv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/setup_venv.sh" "$HERE/.venv-circuit-tracer" "$HERE/circuit_tracer/requirements.txt" \
    torch circuit-tracer transformers nnsight transformer-lens
