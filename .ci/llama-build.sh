#!/usr/bin/env bash
# Puts into .venv a llama-cpp-python (the lock's version) that decodes on this machine.
#
# pip's wheel cache keys the wheel it compiled by version only, not by CMAKE_ARGS: a machine whose
# cache holds a native build (AMX kernels on an AMX Xeon, which die on the first decode in a VM
# that does not grant AMX) would get that build back and crash the test run. So:
#   --install-only  installs the wheel this script built before with the portable flags (a folder
#                   named after the version and the flags); else a wheel from pip's cache, on
#                   probation; else it builds the portable one (5-12 min, pip's cache off).
#   (no argument)   after the rest of the install, .ci/llama_smoke.py decodes with it; a wheel on
#                   probation that fails is replaced by the portable build, and a build that
#                   fails by a plainer one (no OpenMP, no llamafile kernels; then no AVX).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^llama-cpp-python==//p' requirements/lock.txt)
[ -n "$version" ] || { echo "error: llama-cpp-python is not in requirements/lock.txt" >&2; exit 1; }
cache=${RMA_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rma-ci}/llama
stamp=.venv/.rma-llama-build

portable="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
plain="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
sse="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"

install_with() {  # $1: CMAKE_ARGS
  local key dir
  key="$version-$(uname -m)-$(printf '%s' "$1" | sha256sum | cut -c1-12)"
  dir="$cache/$key"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && .venv/bin/python -m pip show -q llama-cpp-python 2>/dev/null; then
    echo "llama-cpp-python $version already built with: $1"
    return 0
  fi
  if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $version (5-12 min) with CMAKE_ARGS=$1"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    CMAKE_ARGS="$1" .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$dir.tmp" "llama-cpp-python==$version"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  .venv/bin/python -m pip install -q --no-deps --force-reinstall "$dir"/llama_cpp_python-*.whl
  echo "$key" >"$stamp"
}

smoke() { timeout 300 .venv/bin/python .ci/llama_smoke.py; }

built() {  # $1: CMAKE_ARGS; is a wheel built with them in the cache?
  ls "$cache/$version-$(uname -m)-$(printf '%s' "$1" | sha256sum | cut -c1-12)"/llama_cpp_python-*.whl \
    >/dev/null 2>&1
}

from_pip_cache() {  # install the newest wheel of this version in pip's cache, if any
  local wheel
  wheel=$(.venv/bin/python -m pip cache list --format=abspath "llama_cpp_python-$version-*" 2>/dev/null \
    | xargs -r ls -t 2>/dev/null | head -1)
  [ -n "$wheel" ] || return 1
  echo "llama-cpp-python $version from pip's cache, until it proves it decodes: $wheel"
  .venv/bin/python -m pip install -q --no-deps --force-reinstall "$wheel"
  echo "pip-cache" >"$stamp"
}

if [ "${1:-}" = "--install-only" ]; then
  # its dependencies (numpy, jinja2, ...) come with the project's install, from the lock
  current=$(cat "$stamp" 2>/dev/null || true)
  if built "$portable"; then
    install_with "$portable"  # built here before: no compiling
  elif [ -n "$current" ] && .venv/bin/python -m pip show -q llama-cpp-python 2>/dev/null; then
    echo "keeping this venv's llama-cpp-python ($current) until the smoke test"
  elif ! from_pip_cache; then
    install_with "$portable"
  fi
  exit 0
fi
smoke && exit 0
if [ "$(cat "$stamp" 2>/dev/null)" = "pip-cache" ]; then
  echo "the wheel from pip's cache does not decode on this machine; building the portable one"
  install_with "$portable"
  smoke && exit 0
fi
for flags in "$plain" "$sse"; do
  echo "llama-cpp-python does not decode on this machine with that build; trying a plainer one"
  install_with "$flags"
  smoke && exit 0
done
echo "error: no build of llama-cpp-python $version decodes on this machine" >&2
exit 1
