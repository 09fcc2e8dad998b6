#!/usr/bin/env bash
# Issue 11's controller-cost measurements of this round (BENCHMARKS.md §9.1): Expected Attention's
# events and the share of wall time the controller takes, and TOVA+AMS against StreamingLLM at
# interval 32 (SmolLM2 and Qwen). Rows of one table alternate round-robin in one process. Run alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=benchmarks/results/controller-cost
mkdir -p "$OUTDIR"
A=.venv/bin/amslocal
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
$A bench speed --model $SMOL --depths 512 --interval 128 --n-gen 1024 --rounds 2 --no-stock -q \
    --methods streaming,expected-attention,ams-expected-attention,ams-rkv \
    --json "$OUTDIR/smollm2-ea-i128.json" > "$OUTDIR/smollm2-ea-i128.md"
$A bench speed --model $SMOL --depths 512 --interval 32 --n-gen 512 --rounds 5 --no-stock -q \
    --methods streaming,ams-tova,ams-rkv \
    --json "$OUTDIR/smollm2-i32.json" > "$OUTDIR/smollm2-i32.md"
QWEN=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
$A bench speed --model $QWEN --depths 512 --interval 32 --n-gen 384 --rounds 3 --no-stock -q \
    --methods streaming,ams-tova,ams-rkv \
    --json "$OUTDIR/qwen-i32.json" > "$OUTDIR/qwen-i32.md"
