#!/usr/bin/env bash
# The seed's test command, runnable from anywhere. RESUME defaults to the newest runs/*/checkpoint/cpBest_*.pth;
# override with environment variables (MODEL, DATASET, BATCH_SIZE, RESUME, LOG, PYTHON) or append test.py flags,
# e.g.  bash run_SSC_test.sh --demo
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x ../.venv/bin/python ]; then PY=../.venv/bin/python; else PY=python3; fi; fi
MODEL="${MODEL:-ddrnet}"
DATASET="${DATASET:-nyu}"
mkdir -p runs
RESUME="${RESUME:-$(ls -t runs/*/checkpoint/cpBest_"${MODEL}".pth runs/*/checkpoint/cpBest_student.pth 2>/dev/null | head -n 1 || true)}"
if [ -z "$RESUME" ]; then
    echo "error: no checkpoint: set RESUME=path/to/cpBest_<model>.pth (or train first: bash run_SSC_train.sh)" >&2
    exit 2
fi
"$PY" ./test.py --model="$MODEL" --dataset="$DATASET" --batch_size="${BATCH_SIZE:-4}" --resume="$RESUME" "$@" \
    2>&1 | tee "${LOG:-runs/test_${MODEL}_${DATASET}.log}"
