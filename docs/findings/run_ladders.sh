#!/usr/bin/env bash
# The four budget ladders of issue 15 on a 2-core machine, in the compute plan's order
# (docs/findings.md, "Budget ladders"): one core runs the batch-size ladder (batch 8 stacked),
# the other train-mode (momentum twins trained once), then l2, then placement. Each study
# resumes where it stopped, so rerun this after any interruption; each finished ladder's report
# is copied to docs/findings/ladders/NAME/ by run.sh. Run from the repository root.
#   bash docs/findings/run_ladders.sh            # both lanes, pinned to cores 0 and 1 (taskset)
#   DRY=1 bash docs/findings/run_ladders.sh      # print the commands only
set -euo pipefail
pin() { if command -v taskset > /dev/null; then echo "taskset -c $1"; fi; }
lane() {  # lane CORE NAME:ARGS ...
  local core=$1
  shift
  for item in "$@"; do
    local cmd="STUDY_ARGS='${item#*:}' $(pin "$core") bash docs/findings/run.sh ladders/${item%%:*}"
    if [ -n "${DRY:-}" ]; then
      echo "$cmd"
    else  # a ladder that stops with an error does not hold up the rest of its lane
      eval "$cmd" || echo "run_ladders: ladders/${item%%:*} exited with status $?" >&2
    fi
  done
}
lane 0 "batch-size:--stack-seeds --jobs 1" &
lane 1 "train-mode:--momentum-twins --jobs 1" "l2:--jobs 1" "placement:--jobs 1" &
wait
