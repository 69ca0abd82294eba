#!/usr/bin/env bash
# Compiler wrapper for the image build: CC="portable-cxx.sh gcc", CXX="portable-cxx.sh g++" while
# scripts/install.sh runs, so DeepSpeed's pre-built CPU ops run on any node, not only on the
# machine that built the image.
#
# DeepSpeed 0.19.8 compiles its CPU ops (CPU Adam, shared-memory comm) for the CPU it is built on:
# op_builder/cpu/builder.py adds -march=native (cpu_arch()) and a SIMD path chosen from that CPU's
# flags (simd_width(): -D__AVX512__ / -D__AVX256__ / -D__SVE__), and no variable overrides either.
# Built on an AVX-512 machine, the op dies with SIGILL on a node without AVX-512. Here both become
# one baseline every node must meet, MMREC_CPU_MARCH (default x86-64-v3: Haswell / Zen 1 and later,
# AVX2 + FMA, DeepSpeed's AVX2 path; on aarch64 armv8-a with the NEON path).
# `make setup` does not use this: a venv runs where it was built, where -march=native is right.
set -euo pipefail
compiler=${MMREC_REAL_CXX:-g++}
case "$(uname -m)" in
  x86_64)  march=${MMREC_CPU_MARCH:-x86-64-v3} ;;
  aarch64) march=${MMREC_CPU_MARCH:-armv8-a} ;;
  *)       exec "$compiler" "$@" ;;
esac
case "$march" in
  x86-64-v4)         simd=-D__AVX512__ ;;
  x86-64-v3)         simd=-D__AVX256__ ;;
  x86-64 | x86-64-v2) simd=-D__SCALAR__ ;;
  armv8*)            simd=-D__NEON__ ;;
  *) echo "portable-cxx.sh: unknown MMREC_CPU_MARCH=$march (x86-64[-v2|-v3|-v4] or armv8*)" >&2; exit 2 ;;
esac
args=()
for arg in "$@"; do
  case "$arg" in
    -march=native | -mcpu=native) arg=-march=$march ;;
    -D__AVX512__ | -D__AVX256__ | -D__SVE__ | -D__NEON__ | -D__SCALAR__) arg=$simd ;;
  esac
  args+=("$arg")
done
exec "$compiler" "${args[@]}"
