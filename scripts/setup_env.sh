#!/usr/bin/env bash
# Creates ./.work/venv with every dependency, idempotently. Used by `make setup` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.work/venv
STAMP=$VENV/.installed-$(cat requirements.txt pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)
if [ -f "$STAMP" ]; then exit 0; fi
# System packages: redis-server (the tests and the local launcher start it themselves), chromium
# (the playground's headless browser test), cmake/g++ (llama-cpp-python has no wheel).
MISSING=()
command -v redis-server >/dev/null 2>&1 || MISSING+=(redis-server)
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
command -v cmake >/dev/null 2>&1 || MISSING+=(cmake)
command -v g++ >/dev/null 2>&1 || MISSING+=(g++)
if [ ${#MISSING[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${MISSING[@]}") >/dev/null
  else
    echo "missing system packages: ${MISSING[*]} (Debian: apt-get install ${MISSING[*]})" >&2; exit 1
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
mkdir -p .work
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
$VENV/bin/pip install -q --upgrade pip wheel
$VENV/bin/pip install -q -r requirements.txt
# llama-cpp-python (the built-in dialogue LLM runtime) only exists as a source package: build the
# wheel once (about 12 min on 2 cores) and keep it in .work/wheels/<flags digest> for later
# environments. Not -march=native: on CPUs with AMX tiles ggml then uses AMX kernels, which crash
# (SIGSEGV in decode) where the kernel does not grant AMX state to the process, as in some
# sandboxes and VMs; AVX2 is enough for a 270M model. --no-cache-dir: pip's wheel cache is keyed
# by the package alone, so a cached build with other CMAKE_ARGS would be reused silently.
LLAMA=llama-cpp-python==0.3.36
LLAMA_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
LLAMA_WHEELS=.work/wheels/llama-$(echo "$LLAMA $LLAMA_ARGS from-source" | sha1sum | cut -c1-8)
if [ ! -f "$VENV/.llama-$(basename "$LLAMA_WHEELS")" ]; then
  mkdir -p "$LLAMA_WHEELS"
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building $LLAMA (once, ~12 min)..."
    CMAKE_ARGS="$LLAMA_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      $VENV/bin/pip wheel -q --no-deps --no-cache-dir -w "$LLAMA_WHEELS" "$LLAMA"
  fi
  $VENV/bin/pip install -q --no-deps --force-reinstall "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl
  $VENV/bin/pip install -q "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0"
  rm -f $VENV/.llama-*
  touch "$VENV/.llama-$(basename "$LLAMA_WHEELS")"
fi
$VENV/bin/pip install -q --no-deps --no-build-isolation -e .
rm -f $VENV/.installed-*
touch "$STAMP"
echo "environment ready: $VENV"
