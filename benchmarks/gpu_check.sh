#!/bin/bash
# Everything a lent GPU should check, in one call (see ../shared/device/README.md):
# the GPU-marked tests, the decode attention benchmark, the throughput benchmark
# on both real shapes, then the quantized benchmark. Details go under $OUT,
# a short table is printed last.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# .whl holds the wheels the GPU image lacks (../shared/device/prepare_wheels.sh .whl).
# tokenmill is made importable through a shim (its package-dir mapping rebuilt under
# /tmp), so nothing needs setuptools there.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
shim=/tmp/tokenmill_shim
rm -rf "$shim" && mkdir -p "$shim"
cp -r core "$shim/tokenmill" && ln -s "$PWD/plugins" "$shim/tokenmill/plugins" \
  && ln -s "$PWD/kernels" "$shim/tokenmill/kernels" || exit 1
export PYTHONPATH=$shim:/tmp/site:$PWD
python3 -c "import tokenmill.plugins.attention, tokenmill.kernels.paged_attention" || exit 1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1

# only the files with GPU tests: collecting the others needs packages the GPU image lacks
mapfile -t gpu_files < <(grep -l "mark.gpu" tests/test_*.py)
timeout 300 python3 -m pytest -m gpu "${gpu_files[@]}" -q -rfEs -p no:cacheprovider --timeout=240 \
  --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.txt" 2>&1
tests_rc=$?

timeout 240 python3 benchmarks/attention.py --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
bench_rc=$?

# the issue-9 benchmark: both shapes against HF generate on the same random weights, with the roofline
shape_rc=0
for shape in smollm2-135m llama3-8b; do
  timeout 300 python3 benchmarks/throughput.py --device cuda --shape "$shape" --json "$OUT/throughput_$shape.json" \
    > "$OUT/throughput_$shape.txt" 2>&1 || shape_rc=1
done

# the issue-16 benchmark: the Llama-3-8B shape in bf16, fp8 weights, fp8 KV and both
timeout 420 python3 benchmarks/quantized.py --gpu > "$OUT/quantized.txt" 2>&1
quant_rc=$?

echo "== device"; cat "$OUT/device.txt"
echo "== pytest -m gpu (rc $tests_rc; details in gpu_tests.txt)"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.txt" | head -20
tail -n 1 "$OUT/gpu_tests.txt"
echo "== benchmarks/attention.py (rc $bench_rc; details in attention.json)"
tail -n 20 "$OUT/attention.txt"
for shape in smollm2-135m llama3-8b; do
  echo "== benchmarks/throughput.py --shape $shape"; tail -n 8 "$OUT/throughput_$shape.txt"
done
echo "== benchmarks/quantized.py --gpu (rc $quant_rc)"; tail -n 12 "$OUT/quantized.txt"
exit $(( tests_rc != 0 || bench_rc != 0 || shape_rc != 0 || quant_rc != 0 ))
