#!/usr/bin/env bash
# Builds the llama.cpp peer (llama-cpp-python, bench/requirements.txt) at its best on this CPU:
# a native build, except that on a CPU with AMX the AMX kernels are left out (they crashed a
# native build on Sapphire Rapids Xeons) while AVX-512, VNNI and BF16 stay on. Prints the flags
# it used; the benchmark records llama.cpp's own system info beside its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
if grep -qw amx_tile /proc/cpuinfo; then
  flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  flags+=" -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON"
  flags+=" -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  flags="-DGGML_NATIVE=ON"
fi
echo "llama.cpp build flags: $flags"
CMAKE_ARGS="$flags" .venv/bin/pip install --no-cache-dir --force-reinstall --no-deps \
  -r bench/requirements.txt
.venv/bin/pip install -r bench/requirements.txt
.venv/bin/python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
