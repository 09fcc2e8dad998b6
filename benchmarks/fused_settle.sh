#!/usr/bin/env bash
# Issue 11, after the event's evidence went into one kernel for every layer (BENCHMARKS.md §9.9):
# TOVA+AMS against StreamingLLM at intervals 32 and 128 (SmolLM2, Qwen), every scorer's event at
# interval 128, and the controller's share for Expected Attention and H2O. Rows of one table
# alternate round-robin in one process. Run alone on the machine.
# RUNS="1 2": the SmolLM2 TOVA tables once per name (files ...-run<name>); ROUNDS: their rounds
# (10); SMOL_ONLY=1: only those.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/fused-settle
mkdir -p "$OUT"
A=.venv/bin/amslocal
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
TOVA=streaming,ams-tova@head,ams-tova
for run in ${RUNS:-1}; do
    for i in 128 32; do
        $A bench speed --model $SMOL --depths 512 --interval $i --n-gen 512 --rounds "${ROUNDS:-10}" --no-stock -q \
            --methods $TOVA --json "$OUT/smollm2-tova-i$i-run$run.json" > "$OUT/smollm2-tova-i$i-run$run.md"
    done
done
[ -n "${SMOL_ONLY:-}" ] && exit 0
for i in 128 32; do
    $A bench speed --model $QWEN --depths 512 --interval $i --n-gen 384 --rounds 3 --no-stock -q \
        --methods $TOVA --json "$OUT/qwen-tova-i$i.json" > "$OUT/qwen-tova-i$i.md"
done
$A bench speed --model $SMOL --depths 512 --interval 128 --n-gen 256 --rounds 2 --no-stock -q \
    --json "$OUT/smollm2-every-scorer-i128.json" > "$OUT/smollm2-every-scorer-i128.md"
$A bench speed --model $SMOL --depths 512 --interval 128 --n-gen 1024 --rounds 2 --no-stock -q \
    --methods streaming,expected-attention,ams-expected-attention,h2o,ams-h2o \
    --json "$OUT/smollm2-ea-h2o-i128.json" > "$OUT/smollm2-ea-h2o-i128.md"
