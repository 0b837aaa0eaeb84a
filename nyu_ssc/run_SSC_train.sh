#!/usr/bin/env bash
# The seed's training command, runnable from anywhere. Override with environment variables (MODEL, DATASET, EPOCHS,
# BATCH_SIZE, WORKERS, LR, LR_ADJ_N, LR_ADJ_RATE, MODEL_NAME, LOG, PYTHON) or append any main.py flags, e.g.
#   bash run_SSC_train.sh --demo        bash run_SSC_train.sh --kd --set data.root=/data/NYU_SSC
# Defaults: 50 epochs, lr 0.01, StepLR every 20 epochs × 0.1 (0.01 → 1e-4 at epoch 41). The reference README's
# `--epochs=5 --lr_adj_n=1 --lr_adj_rate=0.1` meant a constant LR there (its scheduler was never stepped); stepped,
# it decays 0.01 → 1e-6, and main.py warns when the last epoch's LR is ≤ 1e-4 × the initial one.
#
# Distributed (torchrun, common.ddp): NPROC_PER_NODE processes on this node (default 1 = no torchrun), NNODES nodes
# (default 1), this node's NODE_RANK (default 0), and the rendezvous: MASTER_ADDR / MASTER_PORT (default
# 127.0.0.1:29500), or RDZV_ENDPOINT (host:port, c10d rendezvous, e.g. under SLURM; README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x ../.venv/bin/python ]; then PY=../.venv/bin/python; else PY=python3; fi; fi
MODEL="${MODEL:-ddrnet}"
DATASET="${DATASET:-nyu}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
mkdir -p runs
ARGS=(--model="$MODEL" --dataset="$DATASET" --epochs="${EPOCHS:-50}" --batch_size="${BATCH_SIZE:-4}"
      --workers="${WORKERS:-4}" --lr="${LR:-0.01}" --lr_adj_n="${LR_ADJ_N:-20}" --lr_adj_rate="${LR_ADJ_RATE:-0.1}"
      --model_name="${MODEL_NAME:-SSC_DDRNet}")
if [ "$NNODES" -gt 1 ] || [ "$NPROC_PER_NODE" -gt 1 ]; then
    if [ -n "${RDZV_ENDPOINT:-}" ]; then
        RDZV=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-nyu_ssc}")
    else
        RDZV=(--node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
              --master_port="${MASTER_PORT:-29500}")
    fi
    echo "run_SSC_train.sh: torchrun, $NNODES node(s) × $NPROC_PER_NODE process(es)"
    CMD=("$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" "${RDZV[@]}" ./main.py)
else
    CMD=("$PY" ./main.py)
fi
"${CMD[@]}" "${ARGS[@]}" "$@" 2>&1 | tee "${LOG:-runs/train_${MODEL}_${DATASET}.log}"
