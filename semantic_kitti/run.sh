#!/usr/bin/env bash
# Launch training: one torchrun process per GPU of the YAML's `gpu` list, or a single CPU process for `gpu: cpu`.
#   bash run.sh [CONFIG.yaml] [main.py flags ...]      e.g.  bash run.sh config_server_kitti.yaml --stage student
#                                                          bash run.sh --demo
# Refuses (exit 2) when the YAML lists GPUs that are not there, or when no GPU is present at all.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# One interpreter start resolves the YAML (as main.py will) and counts this machine's GPUs: "<gpu list|cpu> <count>".
read -r GPU AVAILABLE <<< "$("$PYTHON" "$HERE/main.py" "$@" --print-gpu)" || exit 2
[[ -n "${GPU:-}" ]] || exit 2
if [[ "$GPU" == "cpu" ]]; then
  echo "run.sh: gpu: cpu in the YAML, one process on the CPU"
  exec "$PYTHON" "$HERE/main.py" "$@"
fi

IFS=',' read -r -a IDS <<< "$GPU"
NPROC=${#IDS[@]}
if [[ "$AVAILABLE" -eq 0 ]]; then
  echo "run.sh: error: the YAML's gpu list is \"$GPU\" ($NPROC GPU(s)) but no GPU is available here; set gpu: cpu to run on the CPU" >&2
  exit 2
fi
for id in "${IDS[@]}"; do
  if (( id >= AVAILABLE )); then
    echo "run.sh: error: the YAML's gpu list \"$GPU\" names GPU $id but this machine has $AVAILABLE GPU(s) (ids 0..$((AVAILABLE - 1)))" >&2
    exit 2
  fi
done
PORT="${MASTER_PORT:-$(( 20000 + RANDOM % 20000 ))}"
echo "run.sh: torchrun --nproc_per_node=$NPROC on GPU(s) $GPU"
export CUDA_VISIBLE_DEVICES="$GPU"
exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --master_port="$PORT" "$HERE/main.py" "$@"
