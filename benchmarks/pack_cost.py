"""What packing the cells costs a token-set event (BENCHMARKS.md §9.8): TOVA+AMS and StreamingLLM
token-set sessions on SmolLM2 (budget 256, 2 threads) decode after a 512-token prompt; printed are
the cells moved by the last events, and the median time of the move and of the whole event.

    .venv/bin/python benchmarks/pack_cost.py [--interval 32] [--flash-attn auto,off] [--n-gen 400]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from amslocal.backend import Model, SamplerParams  # noqa: E402
from amslocal.config import CompressionConfig, ContextParams  # noqa: E402
from amslocal.session import Session  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--flash-attn", default="auto,off")
    ap.add_argument("--n-gen", type=int, default=400)
    a = ap.parse_args()
    model = Model(a.model)
    docs = os.path.join(ROOT, "..", "shared", "data", "longdocs")
    with open(os.path.join(docs, sorted(os.listdir(docs))[0]), encoding="utf-8") as f:
        toks = model.tokenize(f.read()[:20000])
    print(f"{os.path.basename(a.model)}, budget 256, interval {a.interval}, token sets, 2 threads; the last 10 events")
    for scorer, ams in (("tova", True), ("streaming", False)):
        for fa in a.flash_attn.split(","):
            cfg = CompressionConfig(budget=256, interval=a.interval, scorer=scorer, ams=ams, granularity="token")
            s = Session(model, cfg, ContextParams(n_threads=2, flash_attn=fa), SamplerParams(temp=0))
            s.prefill(toks[:512])
            for _ in s.generate([], a.n_gen, ignore_eos=True):
                pass
            events = s.events[-10:]
            moved = [e["cells_moved"] for e in events][:5]
            pack_ms = np.median([e["move_ms"] for e in events])
            event_ms = np.median([e["ms"] for e in events])
            print(
                f"  {'ams-' if ams else ''}{scorer:10s} flash attention {fa:4s}: cells moved {moved}..., "
                f"pack median {pack_ms:.2f} ms, event median {event_ms:.2f} ms"
            )


if __name__ == "__main__":
    main()
