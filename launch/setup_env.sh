#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and build gcomp into it.
#
# Idempotent: a second call only rebuilds gcomp's extension. Source it from other scripts:
#   source launch/setup_env.sh      -> activates .venv with torch, gcomp and the test tools
# Environment:
#   GCOMP_VENV        where the virtualenv lives (default: <repo>/.venv)
#   GCOMP_TORCH_SPEC  the torch requirement (default: torch==2.13.0, the CPU wheel; an open
#                     range would pull a multi-GB CUDA build)
#   GCOMP_NATIVE=0    skip the C++ extension (gcomp then runs its pure-torch path)
set -euo pipefail
GCOMP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCOMP_VENV="${GCOMP_VENV:-$GCOMP_ROOT/.venv}"
GCOMP_TORCH_SPEC="${GCOMP_TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "$GCOMP_VENV/bin/python" ]]; then
  python3 -m venv "$GCOMP_VENV"
fi
# shellcheck disable=SC1091
source "$GCOMP_VENV/bin/activate"
if ! python -c "import torch, numpy, pytest, hypothesis, matplotlib" >/dev/null 2>&1; then
  python -m pip install --quiet "$GCOMP_TORCH_SPEC" numpy pytest hypothesis matplotlib setuptools wheel ninja
fi
# The integrations and monitoring tools (gcomp's extras lightning, accelerate, tensorboard, progress),
# which the tests exercise. Pinned to the torch just installed: lightning and accelerate require
# torch, and an unconstrained resolve could replace the CPU wheel with a multi-GB CUDA build.
if ! python -c "import lightning, accelerate, tensorboard, tqdm" >/dev/null 2>&1; then
  GCOMP_TORCH_PIN="torch==$(python -c 'import torch; print(torch.__version__)')"
  python -m pip install --quiet --constraint <(echo "$GCOMP_TORCH_PIN") lightning accelerate tensorboard tqdm
fi
# --no-build-isolation: build against the torch installed above instead of fetching another one;
# --use-pep517: without it this pip takes the legacy "setup.py develop" path, which skips the extension.
python -m pip install --quiet --no-build-isolation --use-pep517 --no-deps -e "$GCOMP_ROOT"
