"""Time the controller spends after each decode capturing queries (BENCHMARKS.md §9.1).

Runs a budgeted session per configuration and prints the cache view's ``collect_s`` (the Python
side of every observed decode: reading the observed queries into the event log and the window
ring; settling at events is timed apart) per generated token. Run it from a checkout; to compare
with an older checkout, run the older one's copy of this file with that checkout first on
``PYTHONPATH`` (the patched library of the current build serves both).

    .venv/bin/python benchmarks/capture_cost.py [--model GGUF] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import time

from amslocal.backend import ContextParams, Model
from amslocal.session import CompressionConfig, Session

CASES = (
    ("expected-attention, interval 128 (256-query ring)", dict(scorer="expected-attention", ams=False, interval=128)),
    ("tova + AMS, interval 32 (32-query event log)", dict(scorer="tova", ams=True, interval=32)),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    model = Model(args.model)
    prompt = model.tokenize("Once upon a time, in a land far away,")
    for name, fields in CASES:
        s = Session(model, CompressionConfig(budget=256, **fields), ContextParams(n_threads=2))
        t0 = time.perf_counter()
        n = sum(1 for _ in s.generate(prompt, args.tokens, ignore_eos=True))
        wall = time.perf_counter() - t0
        print(
            f"{name}: {s.view.collect_s / n * 1e6:.0f} us per token capturing "
            f"({s.view.collect_s / wall * 100:.1f}% of {wall:.1f} s), {len(s.events)} events"
        )
        s.close()


if __name__ == "__main__":
    main()
