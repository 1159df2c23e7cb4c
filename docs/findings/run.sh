#!/usr/bin/env bash
# Reproduce docs/findings: run each study of docs/findings/specs/ (resumable: rerun after an
# interruption) into studies/findings/<name>/, then copy its report, figures and results
# (no checkpoints) into docs/findings/<name>/. Run from the repository root with
# ../shared/datasets/cifar10-jpeg.tar.gz present (or edit data.path in the specs / pass
# --data cifar10:PATH --set data.image_size=... to `normlab study`).
#   bash docs/findings/run.sh                 # all eight studies
#   bash docs/findings/run.sh placement l2    # some of them
#   bash docs/findings/run.sh ladders/batch-size   # a budget ladder (specs/ladders/, issue 15)
#   STUDY_ARGS=--stack-seeds bash docs/findings/run.sh ladders/batch-size   # seeds stacked at batch 8
#   STUDY_ARGS=--momentum-twins bash docs/findings/run.sh ladders/train-mode   # momentum twins trained once
set -euo pipefail
NORMLAB=${NORMLAB:-normlab}
studies=("$@")
[ ${#studies[@]} -eq 0 ] && studies=(train-mode placement l2 l2-lsuv no-norm-resnet batch-size batch-size-shift batch-size-mobilenetv2)
for name in "${studies[@]}"; do
  out=studies/findings/$name
  # finished runs a previous machine recorded in docs/findings/progress/ (progress.py)
  [ -d "docs/findings/progress/$name" ] && python3 docs/findings/progress.py restore "$name"
  start=$(date +%s)
  # shellcheck disable=SC2086  # STUDY_ARGS: extra options, e.g. STUDY_ARGS=--stack-seeds
  $NORMLAB study "docs/findings/specs/$name.yaml" --out "$out" --quiet ${STUDY_ARGS:-}
  end=$(date +%s)
  python3 docs/findings/progress.py save "$name"
  dest=docs/findings/$name
  rm -rf "$dest" && mkdir -p "$dest"
  cp -r "$out/report.md" "$out/results.csv" "$out/study.yaml" "$out/figures" "$dest/"
  printf '%s\n' "study $name: $((end - start)) s wall on $(nproc) cores ($(uname -m)), this invocation only (it trained the runs not already finished; report.md's \"Wall time and throughput\" times every run)" > "$dest/wall_time.txt"
done
