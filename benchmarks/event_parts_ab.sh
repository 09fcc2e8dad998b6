#!/usr/bin/env bash
# What an event costs under two versions of the code, alternating, twice per setting
# (benchmarks/event_parts.py; SmolLM2, 2 threads, bench speed's filler text). Run alone.
#   git worktree add /work/before <commit>
#   bash benchmarks/event_parts_ab.sh /work/before [/work/main] > RESULT.txt
# Both trees must sit next to shared/ (event_parts.py reads ../shared/data), and use this
# checkout's virtual environment and model.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BEFORE=${1:?usage: event_parts_ab.sh BEFORE_TREE [AFTER_TREE]}
AFTER=${2:-$ROOT}
M=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf
PY=$ROOT/.venv/bin/python
for args in "--granularity token --interval 32" "--granularity head --interval 32" \
    "--scorer h2o --granularity head --interval 128" "--scorer expected-attention --granularity head --interval 128"; do
    echo "== event_parts.py $args --text filler"
    for rep in 1 2; do
        for tree in "$BEFORE" "$AFTER"; do
            printf '%-13s rep %s: ' "$tree" "$rep"
            # shellcheck disable=SC2086
            $PY "$tree/benchmarks/event_parts.py" --model "$M" $args --text filler 2>&1 |
                awk '/session.compress/ {c=$3} /view.settle/ {s=$3} END {printf "event %s ms, settle %s ms\n", c, s}'
        done
    done
done
