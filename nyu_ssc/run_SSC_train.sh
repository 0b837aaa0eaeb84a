#!/usr/bin/env bash
# The seed's training command, runnable from anywhere. Override with environment variables
# (MODEL, DATASET, EPOCHS, BATCH_SIZE, WORKERS, LR, LR_ADJ_N, LR_ADJ_RATE, MODEL_NAME, LOG, PYTHON) or append
# any main.py flags, e.g.  bash run_SSC_train.sh --demo   or   bash run_SSC_train.sh --kd --set data.root=/data/NYU_SSC
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x ../.venv/bin/python ]; then PY=../.venv/bin/python; else PY=python3; fi; fi
MODEL="${MODEL:-ddrnet}"
DATASET="${DATASET:-nyu}"
mkdir -p runs
"$PY" ./main.py --model="$MODEL" --dataset="$DATASET" --epochs="${EPOCHS:-5}" --batch_size="${BATCH_SIZE:-4}" \
    --workers="${WORKERS:-4}" --lr="${LR:-0.01}" --lr_adj_n="${LR_ADJ_N:-1}" --lr_adj_rate="${LR_ADJ_RATE:-0.1}" \
    --model_name="${MODEL_NAME:-SSC_DDRNet}" "$@" 2>&1 | tee "${LOG:-runs/train_${MODEL}_${DATASET}.log}"
