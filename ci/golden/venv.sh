#!/usr/bin/env bash
# The golden environment: prints the path of its Python on stdout, building it first when missing or
# made from another ci/golden/requirements.txt (progress on stderr). Used by ci/regenerate-golden and by
# `lockstep golden` (src/ondemand.rs), so both run the same pinned llama.cpp.
# $LOCKSTEP_GOLDEN_VENV, else $LOCKSTEP_CACHE/venv (default ~/.cache/lockstep/venv), ci/golden/requirements.txt with llama-cpp-python
# built from source: about 5 minutes on 2 cores, once. A stamp file (.lockstep-requirements, a copy of
# the requirements it was made from) marks a finished environment; a lock keeps two builders apart.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
venv=${LOCKSTEP_GOLDEN_VENV:-$cache/venv}
req=$here/requirements.txt
stamp=$venv/.lockstep-requirements
ready() { [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp" 2>/dev/null; }
if ! ready; then
  mkdir -p "$cache"
  exec 9>"$cache/.venv.lock"
  if ! flock -n 9; then
    echo "golden venv: another process is building $venv; waiting for it" >&2
    flock 9
  fi
  if ! ready; then
    echo "golden venv: preparing $venv (llama-cpp-python builds from source; ~5 min)" >&2
    python3 -m venv "$venv"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$venv/bin/python" -m pip install --no-binary llama-cpp-python -r "$req" >&2
    cp "$req" "$stamp"
    echo "golden venv: ready" >&2
  fi
fi
echo "$venv/bin/python"
