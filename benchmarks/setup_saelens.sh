#!/usr/bin/env bash
# Create/refresh benchmarks/.venv-saelens (idempotent): sae-lens pins TransformerLens < 4, so it gets its own venv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/setup_venv.sh" "$HERE/.venv-saelens" "$HERE/saelens/requirements.txt" \
    torch sae-lens transformer-lens safetensors
