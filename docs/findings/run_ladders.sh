#!/usr/bin/env bash
# The four budget ladders of issue 15 on a 2-core machine (docs/findings.md, "Budget ladders"):
# two lanes, pinned to cores 0 and 1, take the ladders from one queue in the compute plan's
# order (batch-size with seeds stacked at batch 8; train-mode with momentum twins trained once;
# l2; placement), each lane the next ladder nobody has taken, so neither core idles while work
# is left. Each study resumes where it stopped (and first restores the finished runs recorded
# in docs/findings/progress/ where that exists, see progress.py), so rerun this after any
# interruption; each finished ladder's report is copied to docs/findings/ladders/NAME/ by
# run.sh. Run from the repository root.
#   bash docs/findings/run_ladders.sh            # both lanes
#   DRY=1 bash docs/findings/run_ladders.sh      # print the commands only
set -euo pipefail
queue=(
  "batch-size:--stack-seeds --jobs 1"
  "train-mode:--momentum-twins --jobs 1"
  "l2:--jobs 1"
  "placement:--jobs 1"
)
# a dry run claims in a directory of its own: the live one belongs to lanes that may be running
if [ -n "${DRY:-}" ]; then claims=$(mktemp -d); else claims=studies/findings/ladders/.claims; fi
rm -rf "$claims" && mkdir -p "$claims"
pin() { if command -v taskset > /dev/null; then echo "taskset -c $1"; fi; }
lane() {  # lane CORE: run every queued ladder no other lane has claimed (mkdir is atomic)
  local core=$1
  for item in "${queue[@]}"; do
    local name=${item%%:*}
    mkdir "$claims/$name" 2> /dev/null || continue
    local cmd="STUDY_ARGS='${item#*:}' $(pin "$core") bash docs/findings/run.sh ladders/$name"
    if [ -n "${DRY:-}" ]; then
      echo "lane $core: $cmd"
    else  # a ladder that stops with an error does not hold up the rest of the queue
      eval "$cmd" || echo "run_ladders: ladders/$name exited with status $?" >&2
    fi
  done
}
lane 0 &
lane 1 &
wait
rm -rf "$claims"
