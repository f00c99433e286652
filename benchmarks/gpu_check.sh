#!/usr/bin/env bash
# GPU figures in one command, on one CUDA GPU (H200: about 8 minutes, most of it process start-up). Idempotent: each run rewrites
#   benchmarks/gpu_results.json  (every figure, with device, torch and triton versions)
#   benchmarks/gpu_results.md    (the tables for RESULTS.md)
# It runs: the compiled Triton kernels against their definitions (benchmarks/gpu_kernel_check.py), kernel GB/s
# against the copy floor (benchmarks/kernels.py), and the DPZero / DP-SGD step ratios on a RoBERTa-large-sized
# encoder built from a config (benchmarks/zo_memory_speed.py, benchmarks/dpsgd_memory_speed.py).
# Without a CUDA GPU it says so and exits 2; a failed kernel check exits 1 (after writing the results).
# Opacus variants of the DP-SGD benchmark run only where opacus is importable.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT_DIR="${GPU_CHECK_OUT:-benchmarks}"
QUICK="${GPU_CHECK_QUICK:-0}"   # 1: smaller sizes (a smoke test of this script)
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing measured" >&2
    exit 2
fi
TMP="$(mktemp -d)"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$TMP/nvidia_smi.txt" 2>/dev/null || true

echo "== compiled Triton kernels against their definitions"
python benchmarks/gpu_kernel_check.py --json "$TMP/kernel_check.json" || status=1

echo "== kernel bandwidth against the copy floor"
if [ "$QUICK" = 1 ]; then MODELS="opt-125m:float32"; else MODELS="opt-1.3b:bfloat16 lora-opt-1.3b:float32"; fi
for spec in $MODELS; do
    python benchmarks/kernels.py --device cuda --model "${spec%%:*}" --dtype "${spec##*:}" --repeats 10 \
        --json "$TMP/kernels_${spec%%:*}_${spec##*:}.json" || status=1
done

if [ "$QUICK" = 1 ]; then
    SIZE=(--hidden 256 --layers 2 --heads 4 --intermediate 1024 --vocab 30522)
else  # RoBERTa-large: 24 layers, 1024 wide, 16 heads, ffn 4096, vocab 50265 (355M parameters)
    SIZE=(--hidden 1024 --layers 24 --heads 16 --intermediate 4096 --vocab 50265)
fi
echo "== DPZero step against inference"
python benchmarks/zo_memory_speed.py --device cuda "${SIZE[@]}" --batch-size 16 --seq-len 256 --repeats 5 \
    --warmup 2 --mem-steps 2 --variants inference,dpzero-2pass,trainer --json "$TMP/dpzero.json" || status=1
echo "== DP-SGD step against non-private"
VARIANTS=non-private,ours,ours-ghost
python -c "import opacus" 2>/dev/null && VARIANTS="$VARIANTS,opacus-ghost"
python benchmarks/dpsgd_memory_speed.py --device cuda "${SIZE[@]}" --batch-size 16 --seq-len 128 --repeats 5 \
    --warmup 2 --mem-steps 2 --variants "$VARIANTS" --json "$TMP/dpsgd.json" || status=1
python benchmarks/dpsgd_memory_speed.py --device cuda "${SIZE[@]}" --batch-size 16 --seq-len 128 --repeats 5 \
    --warmup 2 --mem-steps 2 --lora 8 --variants non-private,ours,ours-ghost --json "$TMP/dpsgd_lora.json" || status=1

python benchmarks/gpu_report.py "$TMP" --out-json "$OUT_DIR/gpu_results.json" --out-md "$OUT_DIR/gpu_results.md" || status=1
cat "$OUT_DIR/gpu_results.md"
exit $status
