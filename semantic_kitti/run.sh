#!/usr/bin/env bash
# Launch training: torchrun with one process per GPU of the YAML's `gpu` list, or a single CPU process for `gpu: cpu`.
#   bash run.sh [CONFIG.yaml] [main.py flags ...]      e.g.  bash run.sh config_server_kitti.yaml --stage student
#                                                          bash run.sh --demo
# Several machines: torchrun's multi-node settings come from the environment (README "Several machines"):
#   NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR (default 127.0.0.1) and MASTER_PORT (required when
#   NNODES > 1), or RDZV_ENDPOINT=host:port (+ RDZV_ID) for torchrun's c10d rendezvous instead of a fixed node rank.
#   NPROC_PER_NODE overrides the process count per node (default: the length of the gpu list; 1 for gpu: cpu).
#   With gpu: cpu and NNODES > 1 the processes talk over gloo.
# Refuses (exit 2) when the YAML lists GPUs that are not there, or when no GPU is present at all.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
fail() { echo "run.sh: error: $*" >&2; exit 2; }
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES must be a positive integer, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || fail "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"

# One interpreter start resolves the YAML (as main.py will) and counts this machine's GPUs: "<gpu list|cpu> <count>".
read -r GPU AVAILABLE <<< "$("$PYTHON" "$HERE/main.py" "$@" --print-gpu)" || exit 2
[[ -n "${GPU:-}" ]] || exit 2
if [[ "$GPU" == "cpu" ]]; then
  if [[ "$NNODES" -eq 1 && -z "${NPROC_PER_NODE:-}" && -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "run.sh: gpu: cpu in the YAML, one process on the CPU"
    exec "$PYTHON" "$HERE/main.py" "$@"
  fi
  NPROC="${NPROC_PER_NODE:-1}"
else
  IFS=',' read -r -a IDS <<< "$GPU"
  NPROC="${NPROC_PER_NODE:-${#IDS[@]}}"
  if [[ "$AVAILABLE" -eq 0 ]]; then
    fail "the YAML's gpu list is \"$GPU\" (${#IDS[@]} GPU(s)) but no GPU is available here; set gpu: cpu to run on the CPU"
  fi
  for id in "${IDS[@]}"; do
    if (( id >= AVAILABLE )); then
      fail "the YAML's gpu list \"$GPU\" names GPU $id but this machine has $AVAILABLE GPU(s) (ids 0..$((AVAILABLE - 1)))"
    fi
  done
  export CUDA_VISIBLE_DEVICES="$GPU"
fi

ARGS=(--nnodes="$NNODES" --nproc_per_node="$NPROC")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  ARGS+=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-semantic_kitti}")
elif [[ "$NNODES" -gt 1 ]]; then
  [[ -n "${MASTER_PORT:-}" ]] || fail "NNODES=$NNODES: set MASTER_ADDR (node 0's address) and MASTER_PORT (the same on every node)"
  ARGS+=(--node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MASTER_PORT")
else
  ARGS+=(--master_port="${MASTER_PORT:-$(( 20000 + RANDOM % 20000 ))}")
fi
echo "run.sh: torchrun ${ARGS[*]} on ${GPU/cpu/the CPU (gloo)}"
exec "$PYTHON" -m torch.distributed.run "${ARGS[@]}" "$HERE/main.py" "$@"
