#!/usr/bin/env bash
# Set up (virtualenv, torch 2.13.0 CPU, gcomp with its C++ extension) and run the whole test suite.
# Extra arguments go to pytest (e.g. -k powersgd).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
# The set-up above builds gcomp._C: a missing extension is a test failure here, not a fallback.
export GCOMP_REQUIRE_NATIVE="${GCOMP_REQUIRE_NATIVE:-1}"
python -m pytest -q -p no:cacheprovider tests "$@"
