"""Per-step decode time between events: StreamingLLM (observes nothing) against Expected Attention
(its 256-query window is longer than the interval, so every step captures its queries).

SmolLM2, budget 256, interval 128, 2 threads, 3 rounds of 256 tokens per method, alternating in
one process; the median step that had no event in it, and the median step right after an event.
Run alone on the machine:  .venv/bin/python benchmarks/step_times.py
"""

from __future__ import annotations

import os
import time

import numpy as np

from amslocal.backend import Model, SamplerParams
from amslocal.config import CompressionConfig, ContextParams
from amslocal.session import Session

MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("streaming", "expected-attention")


def main() -> None:
    model = Model(MODEL)
    docs = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "longdocs")
    text = open(os.path.join(docs, sorted(os.listdir(docs))[0]), encoding="utf-8").read()[:8000]
    prompt = model.tokenize(text)[:512]
    sessions = {}
    for name in METHODS:
        cfg = CompressionConfig(budget=256, interval=128, scorer=name, ams=False, granularity="token")
        sessions[name] = Session(model, cfg, ContextParams(n_threads=2), SamplerParams(temp=0))
        sessions[name].prefill(prompt)
    steps: dict[str, list[tuple[float, bool]]] = {n: [] for n in METHODS}
    for _ in range(3):
        for name in METHODS:
            s = sessions[name]
            events = s.stats.compressions
            t = time.perf_counter()
            for _tok in s.generate([], 256, ignore_eos=True):
                now = time.perf_counter()
                steps[name].append((now - t, s.stats.compressions != events))
                events = s.stats.compressions
                t = time.perf_counter()
    base = None
    for name in METHODS:
        r = steps[name]
        plain = np.median([dt for dt, ev in r if not ev]) * 1e3
        after = np.median([r[i][0] for i in range(1, len(r)) if r[i - 1][1] and not r[i][1]]) * 1e3
        capture = sessions[name].view.collect_s / max(sessions[name].stats.generated_tokens, 1) * 1e6
        base = plain if base is None else base
        print(
            f"{name}: median step {plain:.3f} ms ({plain / base:.3f}x StreamingLLM), "
            f"right after an event {after:.3f} ms, query capture {capture:.0f} us per token"
        )


if __name__ == "__main__":
    main()
