#!/usr/bin/env bash
# One-shot developer set-up, run from anywhere:   bash native/setup.sh
#
#   1. .venv/                       (python3 -m venv, created if missing)
#   2. patched llama-cpp-python     (native/build.py: cached wheel; 3-5 min on 2 cores the first time)
#   3. amslocal in editable mode    (pip install -e '.[test,bench,server]'; AFTER step 2 so pip keeps our wheel)
#   4. the default model            (models/fetch.py --quiet; skip with AMSLOCAL_SKIP_MODEL=1)
#
# Idempotent: a second run with nothing changed takes seconds.
# Knobs: PYTHON (interpreter for the venv, default python3), AMSLOCAL_BACKEND,
# AMSLOCAL_CMAKE_ARGS, AMSLOCAL_CACHE_DIR ... (see native/build.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
VPY="$VENV/bin/python"

say() { echo "amslocal setup: $*" >&2; }
die() { echo "amslocal setup: FAILED: $*" >&2; exit 1; }

# --- 1. virtual environment ------------------------------------------------
if [ -e "$VPY" ] && ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
    die "$VENV exists but its python does not run (was the base interpreter moved?); remove it: rm -rf $VENV"
fi
if [ ! -e "$VPY" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python >= 3.10 or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); amslocal needs Python >= 3.10 (set PYTHON=...)"
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV" \
        || die "python3 -m venv failed; on Debian/Ubuntu try: apt-get install python3-venv (then rm -rf $VENV)"
fi
if [ ! -e "$VENV/.amslocal-pip-upgraded" ]; then
    "$VPY" -m pip install -qq --disable-pip-version-check --upgrade pip \
        || die "upgrading pip in $VENV failed; check network access to PyPI"
    touch "$VENV/.amslocal-pip-upgraded"
fi

# --- 2. patched llama-cpp-python (prints its own one-line errors) ------------
"$VPY" native/build.py || exit $?

# --- 3. amslocal itself (editable, with test extras) --------------------------
# Re-run only when pyproject.toml changed or the install went missing: pip would
# otherwise rebuild the editable metadata (network + ~10 s) on every run.
stamp="$VENV/.amslocal-editable.sha256"
want="$("$VPY" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
   || ! "$VPY" -c 'import importlib.metadata as m; m.distribution("amslocal")' >/dev/null 2>&1; then
    say "installing amslocal (editable, with test extras)"
    log=native/_work/pip-install-e.log
    mkdir -p native/_work
    if ! "$VPY" -m pip install --disable-pip-version-check -e '.[test,bench,server]' >"$log" 2>&1; then
        die "pip install -e '.[test,bench,server]' failed (log: $log)"
    fi
    # the unpinned llama-cpp-python dependency must still be OUR build (pip keeps it
    # unless something pins another version; patches/ may also have changed meanwhile)
    "$VPY" native/build.py --check 2>/dev/null || "$VPY" native/build.py || exit $?
    echo "$want" >"$stamp"
fi

# --- 4. default model --------------------------------------------------------
if [ "${AMSLOCAL_SKIP_MODEL:-0}" != "1" ]; then
    "$VPY" models/fetch.py --quiet || die "model download failed; re-run: $VPY models/fetch.py"
fi

say "ready. Activate with: source $VENV/bin/activate"
