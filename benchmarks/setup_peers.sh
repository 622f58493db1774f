#!/usr/bin/env bash
# Create/refresh benchmarks/.venv-peers (idempotent): torch==2.13.0 first, then peers/requirements.txt.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3.11}"
VENV="$HERE/.venv-peers"
REQ="$HERE/peers/requirements.txt"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# Skip the pip work when the venv already satisfies the exact requirement file.
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VPY" -m pip check >/dev/null 2>&1; then
    echo "setup_peers: $VENV already up to date" >&2
    exit 0
fi

"$VPY" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned resolve would pull the CUDA build.
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -r "$REQ"
"$VPY" -m pip check
echo "$WANT" > "$STAMP"
"$VPY" - <<'PY' >&2
import importlib.metadata as md
for p in ["torch", "transformers", "numpy", "transformer-lens", "nnsight", "pyvene", "steering-vectors", "repeng"]:
    print(f"{p}=={md.version(p)}")
PY
