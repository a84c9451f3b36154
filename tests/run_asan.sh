#!/usr/bin/env bash
# Build gcomp._C with AddressSanitizer in a temporary copy of the repository and run the native
# kernel tests (hypothesis fuzzing of the sparse and quantize pack/unpack, malformed messages
# included) under it.
# Needs the virtualenv of launch/setup_env.sh. Any invalid read/write aborts the run with a report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${GCOMP_VENV:-$ROOT/.venv}/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK")
cd "$WORK"
GCOMP_SANITIZE=address "$PYTHON" setup.py build_ext --inplace > build.log 2>&1 || { tail -50 build.log; exit 1; }
# libstdc++ is preloaded with libasan so that ASan's interceptor of C++ exceptions resolves
# (the kernels throw on malformed messages).
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" PYTHONPATH="$WORK" GCOMP_REQUIRE_NATIVE=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_sparse_ops.py tests/test_quantize_kernels.py tests/test_native_build.py "$@"
