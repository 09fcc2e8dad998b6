#!/usr/bin/env bash
# Section 3 of BENCHMARKS.md: fidelity to the full cache by aggregation and positions mode
# (the options of `amslocal bench quality --task fidelity`), SmolLM2-135M, 6 GSM8K questions,
# 256 teacher-forced tokens at 128 cells + 64. One directory per setting.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/fidelity-aggregation}
common=(--task fidelity --budgets 128 --budget-base absolute --interval 64 --max-tokens 256 -n 6
        --methods tova,ams-tova,ams-snapkv --no-plots -q -t 1)
for agg in mean max rank; do
    .venv/bin/amslocal bench quality "${common[@]}" --aggregation "$agg" --out "$OUT/$agg"
done
.venv/bin/amslocal bench quality "${common[@]}" --positions compact --out "$OUT/compact"
