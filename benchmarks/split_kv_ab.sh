#!/usr/bin/env bash
# Patch 0003 (balanced split-KV) A/B (BENCHMARKS.md §9.7): the same commands with the patched
# library and with one built without patch 0003, alternating, each a separate process.
# OLD_LIB: a directory with that library, e.g. the previous wheel's llama_cpp/lib unzipped from
# the build cache (~/.cache/amslocal/wheels/<key>/). Run alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD_LIB:?set OLD_LIB to a llama_cpp/lib directory built without patch 0003}"
OUTDIR=benchmarks/results/split-kv
mkdir -p "$OUTDIR"
A=.venv/bin/amslocal
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
run() {  # name, then the bench arguments
    local name=$1
    shift
    for i in 1 2; do
        $A bench speed --model $SMOL "$@" -q > "$OUTDIR/$name-new-$i.md"
        LLAMA_CPP_LIB_PATH=$OLD_LIB $A bench speed --model $SMOL "$@" -q > "$OUTDIR/$name-old-$i.md"
    done
}
run i128 --depths 512 --interval 128 --n-gen 512 --rounds 3 --no-stock --methods streaming,ams-tova@head,ams-tova
run i32 --depths 512 --interval 32 --n-gen 512 --rounds 3 --no-stock --methods streaming,ams-tova@head,ams-tova
run d4096 --depths 4096 --n-gen 256 --rounds 2 --no-stock --methods ams-rkv@head
for i in 1 2; do
    .venv/bin/python benchmarks/cache_content_cost.py content --granularity token > "$OUTDIR/content-token-new-$i.txt" 2>/dev/null
    LLAMA_CPP_LIB_PATH=$OLD_LIB .venv/bin/python benchmarks/cache_content_cost.py content --granularity token \
        > "$OUTDIR/content-token-old-$i.txt" 2>/dev/null
done
