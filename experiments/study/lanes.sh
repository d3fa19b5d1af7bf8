#!/usr/bin/env bash
# The rerun in the background on two lanes, one core each (RESULTS.md "The rerun"); returns at once.
#   experiments/study/lanes.sh [RUNS_DIR]        start, or resume after a stop: every step resumes
# Lane 1: math-easy, then math-hard (its core methods, spd-fullseq, then whatever is left). Lane 2:
# code, then math-hard-chosen and ood (their own methods, beside math-hard), then math-hard's ssd
# and spd-fullseq's seed 2 in directories of their own (math-hard-ssd, math-hard-seed2). When both
# are done, math-hard takes those seeds,
# math-hard-chosen and ood take math-hard's base and psr evaluations (seconds), the tables are
# printed and the finished files kept (run.sh `keep`).
# Multiple choice is finished (its data gate stopped its training; `run.sh RUNS mc` runs it again).
# Logs: RUNS_DIR/lane1.log, lane2.log, lanes.log.
# Pause both: pkill -STOP -f "spd_lens.cli|spd-lens --threads"; go on: the same with -CONT.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${1:-runs/study}"
mkdir -p "$RUNS"
RUN=experiments/study/run.sh
export SPD_LENS_THREADS=1
# A lane of steps in the background; prints its pid.
lane() {
  local log="$RUNS/$1.log"
  shift
  echo "== $(date -u +%FT%TZ) start: $*" >> "$log"
  nohup nice -n 10 "$RUN" "$RUNS" "$@" >> "$log" 2>&1 &
  echo $!
}
first=$(lane lane1 math-easy math-hard)
second=$(lane lane2 code math-hard-chosen ood math-hard-ssd math-hard-seed2)
nohup bash -c "while kill -0 $first 2>/dev/null || kill -0 $second 2>/dev/null; do sleep ${LANES_POLL_S:-60}; done
               exec nice -n 10 $RUN '$RUNS' math-hard math-hard-chosen ood tables keep" >> "$RUNS/lanes.log" 2>&1 &
echo "lanes started (pids $first, $second); logs under $RUNS; the tables so far: $RUN $RUNS tables"
