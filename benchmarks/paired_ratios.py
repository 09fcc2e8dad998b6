"""Per-round ratios of ``amslocal bench speed`` rows against one reference row, from its --json.

    .venv/bin/python benchmarks/paired_ratios.py RESULT.json [RESULT.json ...] [--against streaming]

The bench's table divides medians taken over the rounds. Its rows take turns within each round,
so a round's samples were measured minutes apart at most, while the machine's speed drifts by
10-15% between hours and single rounds dip (another process, a slow core). Dividing within each
round first, then taking the median of those ratios, cancels what a round's rows shared. Prints,
per row: the ratio of medians (as the table), the median of the per-round ratios, and their range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--against", default="streaming", help="the reference row's method (default: streaming)")
    args = ap.parse_args()
    for path in args.results:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            rows = [r for r in data["rows"] if r.get("samples") and r["test"].startswith("tg")]
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {path}: not a bench speed --json file ({e})")
        print(f"{path} (interval {data.get('interval')}, {data.get('rounds')} rounds)")
        print(f"  {'method':24s} {'test':14s} {'ratio of medians':>16s} {'median ratio':>12s} {'range':>13s}")
        for test in sorted({r["test"] for r in rows}):
            ref = next((r for r in rows if r["test"] == test and r["method"] == args.against), None)
            if ref is None:
                continue
            for r in rows:
                if r["test"] != test or r is ref:
                    continue
                ratios = [a / b for a, b in zip(r["samples"], ref["samples"])]
                print(
                    f"  {r['method']:24s} {test:14s} {r['tok_per_s'] / ref['tok_per_s']:16.3f} "
                    f"{statistics.median(ratios):12.3f} {min(ratios):6.3f}-{max(ratios):.3f}"
                )


if __name__ == "__main__":
    main()
