"""amslocal's perplexity rows against the reference kvpress presses, on the documents both ran.

    .venv/bin/python benchmarks/compare_kvpress.py --ours benchmarks/results/perplexity-rows-qwen \
        --reference benchmarks/results/kvpress-reference-qwen --budget 256

Pools, over the documents present in both (every counted token weighs the same): perplexity over
the full cache's (each side against its own full cache), mean KL(full || method) and top-1
agreement. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def pooled(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    return {
        "tokens": tokens,
        "ratio": math.exp((sum(r["nll"] for r in rows) - sum(r["full_nll"] for r in rows)) / tokens),
        "kl": sum(r["kl"] for r in rows) / tokens,
        "top1": sum(r["top1"] for r in rows) / tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", type=Path, required=True, help="a bench quality --task perplexity directory")
    ap.add_argument("--reference", type=Path, required=True, help="a kvpress_reference.py directory")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument(
        "--methods",
        default="tova,tova@layer,tova@head,ams-tova@head,snapkv@head,ams-snapkv@head,ams-h2o@head,ams-rkv@head",
    )
    args = ap.parse_args()
    ref_rows = [json.loads(line) for line in (args.reference / "items.jsonl").read_text().splitlines() if line.strip()]
    ref_rows = [r for r in ref_rows if r["budget"] == args.budget]
    docs = sorted({r["id"] for r in ref_rows if r["method"] != "full"})
    ours = {}
    for m in args.methods.split(","):
        path = args.ours / "items" / f"{m}@{args.budget}.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            ours[m] = {r["id"]: r for r in rows}
    docs = [d for d in docs if all(d in rows for rows in ours.values())]
    print(f"Documents in both: {', '.join(docs)}; budget {args.budget}.\n")
    print("| method | tokens | perplexity / full | mean KL | top-1 |")
    print("|---|---|---|---|---|")
    for m in sorted({r["method"] for r in ref_rows} - {"full"}):
        p = pooled([r for r in ref_rows if r["method"] == m and r["id"] in docs])
        print(f"| kvpress {m} | {p['tokens']} | {p['ratio']:.4f} | {p['kl']:.4f} | {p['top1']:.3f} |")
    for m, rows in ours.items():
        p = pooled([rows[d] for d in docs])
        print(f"| amslocal {m} | {p['tokens']} | {p['ratio']:.4f} | {p['kl']:.4f} | {p['top1']:.3f} |")


if __name__ == "__main__":
    main()
