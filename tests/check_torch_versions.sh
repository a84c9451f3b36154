#!/usr/bin/env bash
# Build gcomp's C++ extension against another torch release and run the native kernel tests with
# it: the check behind the README's "tested torch versions". CI runs the default torch (2.13.0);
# run this by hand for the newest release before a release of gcomp, one torch spec per argument:
#
#   bash tests/check_torch_versions.sh                    # torch==2.14.1 (the newest that installs here)
#   bash tests/check_torch_versions.sh torch==2.14.1 torch==2.13.0
#
# For each spec it creates (or reuses) a virtualenv under ${GCOMP_CHECK_ROOT:-/tmp/gcomp-torch-check},
# installs that torch with numpy, pytest and hypothesis, builds gcomp._C in a temporary copy of the
# repository (so the checkout's own build for its .venv is left alone) and runs
# tests/test_sparse_ops.py and tests/test_native_build.py against it, with the extension required.
# The CPU extension is built even where the torch wheel is a CUDA build (GCOMP_WITH_CUDA=0): this
# checks the C++ standard and the CPU kernels; the CUDA glue needs a toolkit set-up of its own
# (see setup.py). torch 2.14.1 is a CUDA build of about 5.5 GB; installing it takes about a minute
# from a local package mirror, building the extension against it a minute or two.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECK_ROOT="${GCOMP_CHECK_ROOT:-/tmp/gcomp-torch-check}"
SPECS=("$@")
[[ ${#SPECS[@]} -gt 0 ]] || SPECS=("torch==2.14.1")
mkdir -p "$CHECK_ROOT"
summary=()
for spec in "${SPECS[@]}"; do
  venv="$CHECK_ROOT/venv-${spec//[^A-Za-z0-9.]/_}"
  echo "=== $spec (virtualenv $venv)"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  if ! "$venv/bin/python" -c "import torch, numpy, pytest, hypothesis" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet "$spec" numpy pytest hypothesis setuptools wheel ninja
  fi
  "$venv/bin/python" -c "import torch; print('torch', torch.__version__, '(CUDA build %s)' % torch.version.cuda if torch.version.cuda else '(CPU build)')"
  work="$(mktemp -d)"
  git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$work")
  start=$SECONDS
  if ! (cd "$work" && GCOMP_WITH_CUDA=0 "$venv/bin/python" setup.py build_ext --inplace > build.log 2>&1); then
    tail -40 "$work/build.log"
    summary+=("$spec: BUILD FAILED")
    rm -rf "$work"
    continue
  fi
  std="$(grep -o -- '-std=c++[0-9]*' "$work/build.log" | sort -u | tr '\n' ' ')"
  echo "built in $((SECONDS - start)) s with ${std:-?}"
  status=passed
  (cd "$work" && PYTHONPATH="$work" GCOMP_REQUIRE_NATIVE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      tests/test_sparse_ops.py tests/test_native_build.py) || status=FAILED
  level="$(cd "$work" && PYTHONPATH="$work" "$venv/bin/python" -c 'from gcomp import ops; print(ops.simd_level())')"
  summary+=("$spec: built with ${std:-?}in $((SECONDS - start)) s, native tests $status (SIMD level $level)")
  rm -rf "$work"
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
[[ "${summary[*]}" != *FAIL* ]]
