#!/usr/bin/env bash
# Set up (virtualenv, torch 2.13.0 CPU, gcomp) and run the main job: a 2-worker torchrun training
# of a 3.3 M-parameter byte-level language model with a gcomp hook on real text.
# Extra arguments go to launch/train.py (e.g. --data ../shared/data/tinyshakespeare.txt,
# --method topk, --steps 500, --tensorboard runs/example, --no-progress); see `python launch/train.py --help`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "${NPROC:-2}" "$ROOT/launch/train.py" --method powersgd --rank 4 --steps 200 "$@"
