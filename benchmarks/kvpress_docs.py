#!/usr/bin/env python3
"""Dump the token ids of amslocal's perplexity documents for ``kvpress_reference.py``.

Runs in amslocal's own environment (``.venv``), so the reference is fed exactly the ids that
``amslocal bench quality --task perplexity`` feeds:

    .venv/bin/python benchmarks/kvpress_docs.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        -n 8 --doc-tokens 1536 --out /work/kvref/docs-1536.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amslocal.backend import Model
from amslocal.bench.quality import document_tokens
from amslocal.bench.tasks import load_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=1536)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = Model(args.model)
    items = load_items("perplexity", args.n, Path(args.data), doc_tokens=args.doc_tokens)
    docs = [
        {"id": it.id, "kind": it.kind, "source": it.reference, "tokens": document_tokens(model, it, args.doc_tokens)}
        for it in items
    ]
    Path(args.out).write_text(json.dumps({"model": str(model.path), "doc_tokens": args.doc_tokens, "docs": docs}))
    for d in docs:
        print(d["id"], len(d["tokens"]))


if __name__ == "__main__":
    main()
