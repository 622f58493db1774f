#!/usr/bin/env bash
# Create/refresh benchmarks/.venv-saelens (idempotent): torch==2.13.0 first, then sae-lens (it pins TransformerLens < 4, so it gets its own venv).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3.11}"
VENV="$HERE/.venv-saelens"
REQ="$HERE/saelens/requirements.txt"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VPY" -m pip check >/dev/null 2>&1; then
    echo "setup_saelens: $VENV already up to date" >&2
    exit 0
fi
"$VPY" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned resolve would pull the CUDA build.
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -r "$REQ"
echo "$WANT" > "$STAMP"
"$VPY" -c 'import importlib.metadata as md; [print(f"{p}=={md.version(p)}") for p in ["torch", "sae-lens", "transformer-lens", "safetensors"]]' >&2
