#!/usr/bin/env bash
# Create/refresh benchmarks/.venv-peers (idempotent): torch==2.13.0 first, then peers/requirements.txt.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/setup_venv.sh" "$HERE/.venv-peers" "$HERE/peers/requirements.txt" \
    torch transformers numpy transformer-lens nnsight pyvene steering-vectors repeng
