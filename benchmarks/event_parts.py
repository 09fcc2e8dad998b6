"""Where a compression event's time goes: ms per event for each part, one session.

    .venv/bin/python benchmarks/event_parts.py [--scorer tova] [--ams/--no-ams] [--granularity head]
        [--interval 32] [--threads 2] [--model GGUF] [--text longdoc|filler] [--warmup 256]

Prefills 512 tokens of the first long document in ../shared/data/longdocs (or of ``bench
speed``'s filler text), decodes ``--warmup`` tokens to settle in, then times every event of the
next 1024 decoded tokens, and the session and cache-view
methods it calls (each part's total over the events, divided by their number; parts nest, so
they do not add up). ``AMSLOCAL_KERNEL_BLAS=0`` in the environment takes numpy's path to the
evidence's products instead of BLAS from the kernels' threads. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amslocal import session as session_module  # noqa: E402
from amslocal.backend import Model, SamplerParams  # noqa: E402
from amslocal.bench.speed import filler_tokens  # noqa: E402
from amslocal.config import CompressionConfig, ContextParams  # noqa: E402
from amslocal.session import Session  # noqa: E402

DOCS = ROOT.parent / "shared" / "data" / "longdocs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--scorer", default="tova")
    ap.add_argument("--ams", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--granularity", default="head", choices=["token", "layer", "head"])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="longdoc", choices=["longdoc", "filler"])
    ap.add_argument("--warmup", type=int, default=256, help="tokens decoded before the timed ones")
    args = ap.parse_args()

    model = Model(args.model)
    text = (DOCS / sorted(os.listdir(DOCS))[0]).read_text(encoding="utf-8")[:8000]
    cfg = CompressionConfig(
        budget=args.budget, interval=args.interval, scorer=args.scorer, ams=args.ams, granularity=args.granularity
    )
    s = Session(model, cfg, ContextParams(n_threads=args.threads), SamplerParams(temp=0))
    s.prefill(filler_tokens(model, 512) if args.text == "filler" else model.tokenize(text)[:512])
    for _ in s.generate([], args.warmup, ignore_eos=True):
        pass

    spent: dict[str, list[float]] = collections.defaultdict(list)

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label].append(time.perf_counter() - t0)

        setattr(owner, name, wrapper)

    for name in ("compress", "score_input"):
        timed(s, name, f"session.{name}")
    timed(s.scorer, "score", "scorer.score")
    for name in ("evidence_mass", "select_event", "select_rows"):
        timed(s.selector, name, f"selector.{name}")
    for name in ("settle", "evidence_since_layers", "read_k", "read_v", "row_positions", "move_rows", "occupied"):
        timed(s.view, name, f"view.{name}")
    timed(s.gen, "evict", "generator.evict")
    for name in ("place_rows", "most_kept"):
        timed(session_module, name, name)

    for _ in s.generate([], 1024, ignore_eos=True):
        pass
    n = len(spent["session.compress"])
    print(
        f"{Path(args.model).name}, {args.scorer}{'+AMS' if args.ams else ''}, {args.granularity} sets, "
        f"budget {args.budget}, interval {args.interval}, {args.threads} threads: {n} events"
    )
    print(f"{'part':28s} {'calls/event':>11s} {'ms/event':>9s}")
    for label, times in sorted(spent.items(), key=lambda kv: -sum(kv[1])):
        print(f"{label:28s} {len(times) / n:11.1f} {1e3 * sum(times) / n:9.2f}")
    s.close()


if __name__ == "__main__":
    main()
