#!/usr/bin/env bash
# The study (RESULTS.md "The study redone"), step by step, in the order it was run. Every step
# resumes where it stopped, so running this again goes on; a step that is finished costs seconds.
#   experiments/study/run.sh [RUNS_DIR] [STEP ...]      default: runs/study, every step
#   experiments/study/run.sh runs/study lr math-hard    only these steps
# Two lanes on two cores: two calls with different steps, each passing SPD_LENS_THREADS=1; the
# rerun's lanes, in the background: experiments/study/lanes.sh RUNS_DIR (math-easy math-hard beside
# code math-hard-chosen ood math-hard-ssd math-hard-seed2, then math-hard to take those seeds and
# math-hard-chosen ood again to take math-hard's base and psr).
# RUNS_DIR is relative to the repository root. spd-lens: the one on PATH, else .venv's (run.sh setup).
# Steps: gate-rank gate-data-paper gate-data-chosen gate-sampled gate-layers gate-seeds gate-kinds
#        gate-heads gate-ood gate-seeds-chosen gate-sampled-chosen lr gate-test math-hard math-hard-ssd
#        math-hard-seed2 math-hard-chosen ood gate-test-clean (the test gate with fresh test-split
#        random draws: `nohup nice -n 10 experiments/study/run.sh runs/study gate-test-clean
#        > runs/study/gate-test-clean.log 2>&1 &`, resumable; it copies its table into the kept copy)
#        gate-test-code (the code subspace at three seeds on test, post hoc; likewise kept)
#        Gemma-3-270M, pre-registered (RESULTS.md), in this order: gemma-presets gemma-gate
#        gemma-gate-test gemma-gate-data gemma-main (not in the default list: run them by name)
#        math-easy code mc; `tables` (the rerun's tables so far, spd-lens summary); and `keep`
# `keep` copies every rerun's finished files (evaluations, training data and its quality, subspaces,
# metrics; not the adapters) into experiments/results/study/NAME/ to be committed: a rerun step whose
# RUNS_DIR/NAME is missing starts from that copy, so a new machine goes on where the last one stopped
# (only the trained models of unevaluated methods are lost).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${1:-runs/study}"
shift || true
BIN="$(command -v spd-lens || echo .venv/bin/spd-lens)"
PY="$(dirname "$BIN")/python"; [ -x "$PY" ] || PY=python3
SPD=("$BIN" --threads "${SPD_LENS_THREADS:-2}")
STUDY=experiments/study
KEPT="${SPD_LENS_KEPT:-experiments/results/study}"
RERUNS=(math-hard math-hard-ssd math-hard-seed2 math-hard-chosen ood math-easy code mc)
CHOSEN_LR="${CHOSEN_LR:-1e-3}"  # the lr sweep's choice on dev (RESULTS.md); every trained method of the rerun uses it

# A rerun's finished files into its kept copy: final names only (an unfinished file ends in .partial
# and every finished one is renamed into place whole), without the adapters, redrawable HTML and the
# plotly.min.js it loads, or an evaluation's checkpoint once the evaluation is finished.
keep() {
  local from="$RUNS/$1" to="$KEPT/$1" file
  [ -d "$from" ] || return 0
  (cd "$from" && find . -path ./adapters -prune -o -type f ! -name '*.partial' ! -name '.spd-lens.lock' \
     ! -name '*.html' ! -name 'plotly.min.js' -print) | while IFS= read -r file; do
    # A finished evaluation's .json holds every completion with its verdict; its .jsonl (the
    # generation's checkpoint, settings repeated on every line) is then not needed.
    case "$file" in ./eval/*.jsonl) [ -f "$from/${file%l}" ] && continue ;; esac
    mkdir -p "$to/$(dirname "$file")"
    cp "$from/$file" "$to/$file"
  done
}
# A rerun starts from its kept copy on a machine that has none of it (only a copy with evaluations
# counts: the first math-hard runs' copies hold their metrics alone).
restore() {
  if [ -d "$KEPT/$1/eval" ]; then take "$KEPT/$1" "$RUNS/$1"; fi
}

ablate() { "${SPD[@]}" ablate "$STUDY/$1.toml" --out "$RUNS/$1"; }
gemma() { "$PY" "$STUDY/gemma_rules.py" "$1" "$RUNS" "${@:2}"; }

# Copies a finished file or directory from one run into another when the target lacks it; the
# run that finds it checks its settings before using it (and refuses it if they differ). The copy
# lands under another name first, so an interrupted one is never taken for a finished one.
take() {
  local from="$1" to="$2"
  if [ -e "$from" ] && [ ! -e "$to" ]; then
    mkdir -p "$(dirname "$to")"
    rm -rf "$to.partial"
    cp -r "$from" "$to.partial"
    mv "$to.partial" "$to"
  fi
}

# A method's finished seeds (evaluation, training data and its quality) from one run directory
# into another of the same config, which then finds them done: take_finished FROM TO METHOD.
take_finished() {
  local from="$RUNS/$1" to="$RUNS/$2" method="$3" seed
  for seed in 0 1 2; do
    [ -f "$from/eval/$method-seed$seed.json" ] || continue
    take "$from/generations/$method-seed$seed.jsonl" "$to/generations/$method-seed$seed.jsonl"
    take "$from/generations/$method-seed$seed.quality.json" "$to/generations/$method-seed$seed.quality.json"
    take "$from/eval/$method-seed$seed.json" "$to/eval/$method-seed$seed.json"
  done
}

# A run at math-hard's questions and training settings: its own methods (those that depend on
# its subspace) first, so it can run on the other lane while math-hard does; base and psr are
# math-hard's evaluations, taken once math-hard has every one of them (until then this says so,
# and running the step again later takes them in seconds).
beside_math_hard() {
  local name="$1" own="$2" stem
  "${SPD[@]}" run "$STUDY/rerun/$name.toml" --methods "$own" --out "$RUNS/$name"
  for stem in base psr-seed0 psr-seed1 psr-seed2; do
    if [ ! -f "$RUNS/math-hard/eval/$stem.json" ]; then
      echo "$name: base and psr wait for the math-hard step's evaluations ($stem is not finished); run this step again after it" >&2
      return 0
    fi
  done
  "${SPD[@]}" run "$STUDY/rerun/$name.toml" --out "$RUNS/$name" --reuse "$RUNS/math-hard"
}

# The comparisons the study turns on (spd against psr and its random control, with base and
# hook-only) at every seed first, the other baselines (ssd, spd-fullseq) after: a study stopped
# part way holds its main comparison at every seed rather than every baseline at the first.
CORE=base,psr,spd,spd-random,hook-only
core_first() {
  "${SPD[@]}" run "$STUDY/rerun/$1.toml" --methods "$CORE" --out "$RUNS/$1"
  "${SPD[@]}" run "$STUDY/rerun/$1.toml" --out "$RUNS/$1"
}
step() {
  case " ${RERUNS[*]} " in *" $1 "*) restore "$1" ;; esac
  case "$1" in
    gate-rank | gate-sampled | gate-layers | gate-kinds | gate-heads | gate-ood | gate-test) ablate "$1" ;;
    gate-test-code)  # the code subspace at three seeds on test; its table into the kept copy
      ablate gate-test-code
      mkdir -p "$KEPT/gate-test-code"
      cp "$RUNS/gate-test-code/"{ablation.json,ablation.csv,config.json} "$KEPT/gate-test-code/" ;;
    gate-test-clean)
      # gate-test's baseline and gradient rows (the same settings) come from its committed table:
      # only the random rows, drawn from the test split's own seeds, run here.
      # A kept rows file (committed while it ran) carries its finished rows to a new machine.
      take "$KEPT/gate-test-clean/ablation.jsonl" "$RUNS/gate-test-clean/ablation.jsonl"
      take "$KEPT/gate-test/ablation.json" "$RUNS/gate-test-clean/ablation.json"
      ablate gate-test-clean
      # Its table and figure into the kept copy (the rows' outcomes are in ablation.json).
      mkdir -p "$KEPT/gate-test-clean"
      cp "$RUNS/gate-test-clean/"{ablation.json,ablation.csv,config.json} "$KEPT/gate-test-clean/"
      rm -f "$KEPT/gate-test-clean/ablation.jsonl"
      "$BIN" report "$KEPT/gate-test-clean" >/dev/null || true ;;
    gate-data-paper) "${SPD[@]}" run "$STUDY/gate-data-paper.toml" --data-only --out "$RUNS/gate-data-paper" ;;
    gate-data-chosen)
      # psr samples without a projection: its files are the paper gate's.
      for seed in 0 1 2; do
        take "$RUNS/gate-data-paper/generations/psr-seed$seed.jsonl" "$RUNS/gate-data-chosen/generations/psr-seed$seed.jsonl"
      done
      "${SPD[@]}" run "$STUDY/gate-data-chosen.toml" --data-only --out "$RUNS/gate-data-chosen" ;;
    gate-seeds)
      # The kept cells' seed-0 and random rows are gate-layers' own: start from a copy of it.
      take "$RUNS/gate-layers" "$RUNS/gate-seeds"
      ablate gate-seeds ;;
    gate-seeds-chosen)
      take "$RUNS/gate-kinds" "$RUNS/gate-seeds-chosen"
      ablate gate-seeds-chosen ;;
    gate-sampled-chosen)
      take "$RUNS/gate-sampled" "$RUNS/gate-sampled-chosen"
      ablate gate-sampled-chosen ;;
    lr)
      local first="$RUNS/lr/psr-lr1e-5"
      "${SPD[@]}" run "$STUDY/lr/psr-lr1e-5.toml" --out "$first"
      for lr in 2e-4 5e-5 1e-3 3e-3; do
        take "$first/generations/psr-seed0.jsonl" "$RUNS/lr/psr-lr$lr/generations/psr-seed0.jsonl"
        "${SPD[@]}" run "$STUDY/lr/psr-lr$lr.toml" --out "$RUNS/lr/psr-lr$lr" --reuse "$first"
      done ;;
    math-hard)
      # psr's seed 0 is the lr sweep's run at the chosen lr: the same prompts, samples and training.
      local sweep="$RUNS/lr/psr-lr$CHOSEN_LR"
      take "$sweep/generations/psr-seed0.jsonl" "$RUNS/math-hard/generations/psr-seed0.jsonl"
      take "$sweep/adapters/psr-seed0" "$RUNS/math-hard/adapters/psr-seed0"
      "${SPD[@]}" run "$STUDY/rerun/math-hard.toml" --methods "$CORE" --out "$RUNS/math-hard"
      # spd-fullseq's seed 2 is the other lane's (math-hard-seed2), when it has finished it.
      take_finished math-hard-seed2 math-hard spd-fullseq
      take "$RUNS/math-hard-seed2/subspaces/fullseq-seed2" "$RUNS/math-hard/subspaces/fullseq-seed2"
      "${SPD[@]}" run "$STUDY/rerun/math-hard.toml" --methods spd-fullseq --out "$RUNS/math-hard"
      # ssd is the other lane's (math-hard-ssd): take its finished seeds, run what is left.
      take_finished math-hard-ssd math-hard ssd
      "${SPD[@]}" run "$STUDY/rerun/math-hard.toml" --out "$RUNS/math-hard" ;;
    math-hard-ssd)
      # math-hard's ssd in a directory of its own, so a second lane can run it beside math-hard
      # (one process per run directory); the math-hard step takes its finished seeds.
      "${SPD[@]}" run "$STUDY/rerun/math-hard.toml" --methods ssd --out "$RUNS/math-hard-ssd" ;;
    math-hard-seed2)
      # The same for spd-fullseq's last seed (--seeds runs a subset of the config's seeds).
      "${SPD[@]}" run "$STUDY/rerun/math-hard.toml" --methods spd-fullseq --seeds 2 --out "$RUNS/math-hard-seed2" ;;
    math-hard-chosen) beside_math_hard math-hard-chosen spd,spd-random,hook-only ;;
    ood) beside_math_hard ood spd,hook-only ;;
    math-easy) "${SPD[@]}" run "$STUDY/rerun/math-easy.toml" --out "$RUNS/math-easy" ;;  # its methods are the core
    code) core_first code ;;
    mc)
      # The data gate first; training waits on it (see mc.toml).
      "${SPD[@]}" run "$STUDY/rerun/mc.toml" --data-only --out "$RUNS/mc"
      "${SPD[@]}" run "$STUDY/rerun/mc.toml" --methods base,hook-only --out "$RUNS/mc" ;;
    # Gemma-3-270M (RESULTS.md "Gemma-3-270M: pre-registered"): each step takes its config from
    # gemma_rules.py, which applies the pre-registered rules to the finished steps before it.
    gemma-presets)
      "${SPD[@]}" run "$STUDY/gemma-preset-hard.toml" --out "$RUNS/gemma-preset-hard"
      "${SPD[@]}" run "$STUDY/gemma-preset-easy.toml" --out "$RUNS/gemma-preset-easy"
      echo "gemma preset (base k-shot score on dev in [0.1, 0.5]): $(gemma preset)" >&2 ;;
    gemma-gate)
      # A kept rows file (committed while it ran) carries its finished rows to a new machine.
      take "$KEPT/gemma-gate/ablation.jsonl" "$RUNS/gemma-gate/ablation.jsonl"
      "${SPD[@]}" ablate "$(gemma config gemma-gate)" --out "$RUNS/gemma-gate"
      mkdir -p "$KEPT/gemma-gate"
      cp "$RUNS/gemma-gate/"{ablation.json,ablation.csv,config.json} "$KEPT/gemma-gate/"
      rm -f "$KEPT/gemma-gate/ablation.jsonl" ;;
    gemma-gate-test)
      take "$KEPT/gemma-gate-test/ablation.jsonl" "$RUNS/gemma-gate-test/ablation.jsonl"
      "${SPD[@]}" ablate "$(gemma config gemma-gate-test)" --out "$RUNS/gemma-gate-test"
      mkdir -p "$KEPT/gemma-gate-test"
      cp "$RUNS/gemma-gate-test/"{ablation.json,ablation.csv,config.json} "$KEPT/gemma-gate-test/"
      rm -f "$KEPT/gemma-gate-test/ablation.jsonl" ;;
    gemma-gate-data)
      "${SPD[@]}" run "$(gemma config gemma-gate-data)" --data-only --out "$RUNS/gemma-gate-data"
      # At the hook-only gate's chosen cell too, when it chose one.
      keep gemma-gate-data
      if chosen=$(gemma config gemma-gate-data-chosen 2>/dev/null); then
        "${SPD[@]}" run "$chosen" --data-only --out "$RUNS/gemma-gate-data-chosen"
        keep gemma-gate-data-chosen
      fi ;;
    gemma-main)
      local gates
      gates=$(gemma passed)
      if [ -z "$gates" ]; then
        echo "gemma-main: no gate's gradient - random interval is above zero; as pre-registered, the gates are the answer for this model" >&2
        return 0
      fi
      echo "gates passed: $gates" >&2
      if grep -q -e "data gate gemma-gate-data$" -e "rank 128, layers 9,17, k,v$" <<< "$gates"; then
        "${SPD[@]}" run "$(gemma config gemma-main)" --out "$RUNS/gemma-main"
      fi
      if grep -q -e "gemma-gate-data-chosen" <<< "$gates" || grep "hook-only on test" <<< "$gates" | grep -qv "rank 128, layers 9,17, k,v$"; then
        "${SPD[@]}" run "$(gemma config gemma-main-chosen)" --out "$RUNS/gemma-main-chosen"
      fi ;;
    tables)
      # The rerun's tables (RESULTS.md), from the runs that have metrics so far; prints, runs nothing.
      local runs=() name
      for name in math-hard math-hard-chosen ood math-easy code mc; do
        [ -f "$RUNS/$name/metrics.json" ] && runs+=("$name=$RUNS/$name")
      done
      [ ${#runs[@]} -gt 0 ] || { echo "no rerun has metrics yet under $RUNS" >&2; return 0; }
      "$BIN" summary "${runs[@]}" ;;
    keep)
      local name
      for name in "${RERUNS[@]}"; do keep "$name"; done
      echo "kept the reruns' finished files under $KEPT (commit them)" >&2 ;;
    *) echo "unknown step '$1'; steps: see the header of $0" >&2; exit 2 ;;
  esac
}

ALL=(gate-rank gate-data-paper gate-data-chosen gate-sampled gate-layers gate-seeds gate-kinds gate-heads gate-ood
     gate-seeds-chosen gate-sampled-chosen lr gate-test math-hard math-hard-ssd math-hard-seed2 math-hard-chosen ood
     math-easy code mc gate-test-clean gate-test-code tables keep)
for s in "${ALL[@]}"; do
  if [ "$RUNS" = "$s" ]; then
    echo "'$RUNS' is a step, not a runs directory: $0 RUNS_DIR $RUNS" >&2
    exit 2
  fi
done
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${ALL[@]}")
for s in "${steps[@]}"; do
  echo "== $s" >&2
  step "$s"
done
