#!/usr/bin/env bash
# Create/refresh a benchmark venv (idempotent): setup_venv.sh VENV_DIR REQUIREMENTS PACKAGE... ;
# torch==2.13.0 first (an unpinned resolve would pull the multi-GB CUDA build), then the requirements;
# skipped when the venv already satisfies the exact requirement file; prints the listed packages' versions.
set -euo pipefail
VENV="$1"; REQ="$2"; shift 2
PY="${PYTHON:-python3.11}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VPY" -m pip check >/dev/null 2>&1; then
    echo "$(basename "$VENV"): already up to date" >&2
    exit 0
fi
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -r "$REQ"
"$VPY" -m pip check
echo "$WANT" > "$STAMP"
"$VPY" -c 'import importlib.metadata as md, sys; [print(f"{p}=={md.version(p)}") for p in sys.argv[1:]]' "$@" >&2
