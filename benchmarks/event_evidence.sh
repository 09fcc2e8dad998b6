#!/usr/bin/env bash
# Issue 11's measurements: evidence at the event vs the per-step side branch, side by side in one
# process per table (amslocal bench speed --evidence both: rows alternate round-robin).
# Run alone on the machine. Results: benchmarks/results/event-evidence/*.md and *.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=benchmarks/results/event-evidence
mkdir -p "$OUTDIR"
A=.venv/bin/amslocal
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
run() { local name=$1; shift; echo "== $name: $*" >&2; $A bench speed --no-stock --evidence both -q --json "$OUTDIR/$name.json" "$@" > "$OUTDIR/$name.md"; }
for iv in 128 32; do
    run "smollm2-tova-vs-streaming-i$iv" --model $SMOL --depths 512 --interval $iv --n-gen 512 --rounds 3 --methods streaming,ams-tova
    run "qwen-tova-vs-streaming-i$iv" --model $QWEN --depths 512 --interval $iv --n-gen 384 --rounds 3 --methods streaming,ams-tova
done
run smollm2-every-scorer-i128 --model $SMOL --depths 512 --interval 128 --n-gen 256 --rounds 2
run smollm2-default-d4096 --model $SMOL --depths 4096 --interval 128 --n-gen 256 --rounds 3 --methods ams-rkv
