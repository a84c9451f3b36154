#!/usr/bin/env bash
# Launch launch/train.py on several real machines: run this once on every machine, each with its own
# NODE_RANK, all with the same NNODES, MASTER_ADDR and MASTER_PORT.
#
#   host0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 bash launch/multinode.sh --method powersgd --rank 4
#   host1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 MASTER_PORT=29500 bash launch/multinode.sh --method powersgd --rank 4
#
# Arguments go to launch/train.py (identical on every machine). torchrun's c10d rendezvous runs on
# MASTER_ADDR:MASTER_PORT (node 0 hosts it, so that port must be reachable from the other machines),
# waits until NNODES machines have joined, then starts NPROC_PER_NODE workers on each.
#
# Environment:
#   NNODES            machines taking part (required)
#   NODE_RANK         this machine's index, 0 .. NNODES-1; node 0 hosts the rendezvous (required)
#   MASTER_ADDR       address or name of node 0, as the other machines reach it (required)
#   MASTER_PORT       rendezvous port on node 0 (default 29500)
#   NPROC_PER_NODE    workers per machine (default 1; on GPU machines: the number of GPUs)
#   MAX_RESTARTS      how often torchrun restarts the whole group after a worker failure (default 0;
#                     with train.py's --checkpoint DIR --checkpoint-every N --resume a restart continues
#                     from the last checkpoint)
#   RDZV_ID           a job id shared by all machines (default gcomp); change it between concurrent jobs
#   LOCAL_ADDR        the address other machines reach this one by, if the hostname does not resolve to it
#   GLOO_SOCKET_IFNAME  the network interface gloo should use (e.g. eth0), if it picks a wrong one
#   GCOMP_SKIP_SETUP=1  only activate the existing virtualenv instead of running launch/setup_env.sh
#                     (use it when the machines share one filesystem: set up once, then launch)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

missing=()
for name in NNODES NODE_RANK MASTER_ADDR; do
  [[ -n "${!name:-}" ]] || missing+=("$name")
done
if (( ${#missing[@]} )); then
  echo "multinode.sh: set ${missing[*]} (e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash launch/multinode.sh ...)" >&2
  exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  echo "multinode.sh: need NNODES >= 1 and 0 <= NODE_RANK < NNODES; got NNODES=$NNODES NODE_RANK=$NODE_RANK" >&2
  exit 2
fi
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_ID="${RDZV_ID:-gcomp}"

if [[ "${GCOMP_SKIP_SETUP:-0}" == "1" ]]; then
  # shellcheck disable=SC1091
  source "${GCOMP_VENV:-$ROOT/.venv}/bin/activate"
else
  # shellcheck disable=SC1091
  source "$ROOT/launch/setup_env.sh"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Node 0 hosts the rendezvous store. Saying so explicitly (is_host) instead of letting torchrun guess
# from hostnames keeps working behind NAT, with aliases, and on machines that share a hostname.
is_host=$(( NODE_RANK == 0 ? 1 : 0 ))
extra=()
[[ -n "${LOCAL_ADDR:-}" ]] && extra+=(--local-addr "$LOCAL_ADDR")

set -x
exec torchrun \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --node-rank "$NODE_RANK" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id "$RDZV_ID" \
  --rdzv-conf "is_host=$is_host" \
  --max-restarts "$MAX_RESTARTS" \
  "${extra[@]}" \
  "$ROOT/launch/train.py" "$@"
