#!/usr/bin/env bash
# Build, test and benchmark adaptok on a GPU machine in one go.
# Usage: bench/run_gpu.sh OUT_DIR   (needs torch, triton, pytest and
# pytest-benchmark installed; builds the extension for sm_90 unless
# ADAPTOK_CUDA_ARCHS says otherwise). Writes into OUT_DIR: info.txt, tests.txt,
# tests.xml, gpu_validated.json (bench/gpu_validation.py),
# bench.json (pytest-benchmark), report.md (bench/report.py: times against the
# floors), adaptok-bench.json and adaptok-bench.png (adaptok-bench), and the ReViT and routing
# benchmarks (revit-bench.*, routing-*) and CF-ViT's (cfvit-*). Extra arguments go to the benchmark
# run (e.g. -k "256img-H6-50_50").
set -uo pipefail
out=${1:?usage: bench/run_gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ADAPTOK_REQUIRE_EXTENSION=1
export ADAPTOK_CUDA_ARCHS="${ADAPTOK_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

pip install --no-build-isolation --no-deps -e . >"$out/build.txt" 2>&1 || { tail -40 "$out/build.txt"; exit 1; }
python -m adaptok.info | tee "$out/info.txt"
python -m pytest tests -q -rs --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
# The (op, backend) pairs whose GPU tests passed: copy over adaptok/gpu_validated.json and commit.
python bench/gpu_validation.py "$out/tests.xml" --out "$out/gpu_validated.json"
shift
python -m pytest bench -q -rs --benchmark-max-time=0.25 --benchmark-json "$out/bench.json" "$@" >"$out/bench.txt" 2>&1
tail -20 "$out/bench.txt"
python bench/report.py "$out/bench.json" | tee "$out/report.md"
adaptok-bench --out "$out"
# The model families end to end (the lab-model routing run needs animal-mnist; DeiT-S needs nothing).
python -m adaptok.bench.revit --out "$out" >"$out/revit-bench.txt" 2>&1 || echo "revit bench failed (see revit-bench.txt)"
python -m adaptok.bench.routing --model deit_small_patch16_224 --out "$out/routing-deit_s" >"$out/routing-bench-deit_s.txt" 2>&1 \
  || echo "routing bench (DeiT-S) failed (see routing-bench-deit_s.txt)"
python -m adaptok.bench.routing --out "$out/routing-lab" >"$out/routing-bench-lab.txt" 2>&1 \
  || echo "routing bench (lab models) failed (see routing-bench-lab.txt)"
python -m adaptok.bench.cfvit --model deit_small_patch16_224 --batch 256 --out "$out/cfvit-deit_s" >"$out/cfvit-bench-deit_s.txt" 2>&1 \
  || echo "CF-ViT bench (DeiT-S) failed (see cfvit-bench-deit_s.txt)"
python -m adaptok.bench.cfvit --out "$out/cfvit-lab" >"$out/cfvit-bench-lab.txt" 2>&1 \
  || echo "CF-ViT bench (lab models) failed (see cfvit-bench-lab.txt)"
exit "$tests_rc"
