#!/usr/bin/env bash
# Train benchmark presets side by side on one machine (one GPU shared), each for MAX_TIME s.
#   benchmarks/train_all.sh MAX_TIME RUNS_DIR PRESET [PRESET ...]
# Extra arguments for every run (e.g. --resume) come from $TRAIN_ARGS. Logs: RUNS_DIR/PRESET.log
set -u
max_time=$1; runs=$(realpath -m "$2"); shift 2
mkdir -p "$runs"
for preset in "$@"; do
  (cd "$(dirname "$0")/.." && OMP_NUM_THREADS=2 ${PYTHON:-python3} -m benchmarks.train_bmnist "$preset" --max-time "$max_time" \
    --runs-dir "$runs" ${TRAIN_ARGS:-}) > "$runs/$preset.log" 2>&1 &
done
wait
for preset in "$@"; do tail -n 1 "$runs/$preset.log"; done
