#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install dsv3-jax (editable) with its test extra.
# DSV3_EXTRAS picks the extras (default "test"; CI uses "test,aot": the TPU and GPU compilers
# for the AOT tests). Re-running is cheap: the install is skipped while pyproject.toml and the
# extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local c
    for c in python3.12 python3.13 python3.14 python3 python; do
        if command -v "$c" >/dev/null 2>&1 &&
           "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for c in 3.12 3.13 3.14; do
            if p=$(pyenv which "python$c" 2>/dev/null); then echo "$p"; return 0; fi
        done
    fi
    return 1
}

if [ ! -x .venv/bin/python ]; then
    if ! PY=$(find_python); then
        echo "error: dsv3-jax needs Python >= 3.12 (jax >= 0.11 dropped 3.11), and none was found" >&2
        echo "       on PATH (python3.12, python3.13, python3) or through pyenv. Install Python 3.12" >&2
        echo "       (e.g. 'pyenv install 3.12', or your OS package python3.12) and re-run." >&2
        exit 1
    fi
    echo "setup: creating .venv with $("$PY" --version 2>&1) ($PY)"
    "$PY" -m venv .venv
fi

extras=${DSV3_EXTRAS:-test}
stamp=.venv/.dsv3-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
    echo "setup: installing dsv3-jax[$extras] and its dependencies into .venv (first run: a few minutes)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    echo "$extras" > "$stamp"
fi

# The routed experts' CPU grouped GEMM (dsv3_jax/layers/cpu_gmm.py): built once with the C++
# compiler and cached; where that fails, it says why and the experts use the pure-XLA loop.
JAX_PLATFORMS=cpu .venv/bin/python -c 'from dsv3_jax.layers import cpu_gmm; cpu_gmm.main()' || true
