"""Per-step decode time between events, and what observing queries costs a step (issue 11).

1. Sessions: StreamingLLM and KeyDiff (neither observes anything) against TOVA (observes the 32
   steps before each event) and Expected Attention (its 256-query window is longer than the
   interval, so every step captures its queries). SmolLM2, budget 256, interval 128, 2 threads,
   8 rounds of 256 tokens per method in one process, the order rotated every round; the median
   step that had no event in it, and the median step right after an event.
2. The same cache, observation on and off: two contexts prefilled with the same 512 tokens decode
   the same tokens one at a time, one capturing every step's queries as Expected Attention does
   (the patch's output, then the ring), the other observing nothing; 8 rounds of 48 steps each,
   alternating. This is the issue's "observation off" baseline: the sessions above also differ
   in which tokens their caches hold.

Run alone on the machine:  .venv/bin/python benchmarks/step_times.py
"""

from __future__ import annotations

import os
import time

import numpy as np

from amslocal.backend import Model, SamplerParams
from amslocal.config import CompressionConfig, ContextParams
from amslocal.engine import Generator
from amslocal.session import Session

MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("streaming", "keydiff", "tova", "expected-attention")
ROUNDS = 8


def sessions_table(model: Model, prompt: list[int]) -> None:
    sessions = {}
    for name in METHODS:
        cfg = CompressionConfig(budget=256, interval=128, scorer=name, ams=False, granularity="token")
        sessions[name] = Session(model, cfg, ContextParams(n_threads=2), SamplerParams(temp=0))
        sessions[name].prefill(prompt)
    steps: dict[str, list[tuple[float, bool]]] = {n: [] for n in METHODS}
    for r in range(ROUNDS):
        for name in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
            s = sessions[name]
            events = s.stats.compressions
            t = time.perf_counter()
            for _tok in s.generate([], 256, ignore_eos=True):
                now = time.perf_counter()
                steps[name].append((now - t, s.stats.compressions != events))
                events = s.stats.compressions
                t = time.perf_counter()
    print("## 1. Sessions: the median step between events\n")
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


def observation_table(model: Model, prompt: list[int], text_tokens: list[int]) -> None:
    gens = {}
    for name in ("off", "on"):
        g = Generator(model, ContextParams(n_ctx=1024, n_threads=2), SamplerParams(temp=0))
        g.eval(prompt)
        if name == "on":
            g.view.observe(1, attn=False, queries=True)  # as Expected Attention's every step
        gens[name] = g
    times: dict[str, list[float]] = {n: [] for n in gens}
    block = 48
    for r in range(ROUNDS):
        for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
            g = gens[name]
            for i in range(block):
                tok = text_tokens[r * block + i]
                t = time.perf_counter()
                g.eval([tok])  # the decode, then (observing) the capture into the ring
                times[name].append(time.perf_counter() - t)
    off, on = (np.median(times[n]) * 1e3 for n in ("off", "on"))
    print("\n## 2. The same cache: capturing every step's queries vs observing nothing\n")
    print(
        f"observation off: median step {off:.3f} ms; on: {on:.3f} ms; "
        f"speed with observation on: {off / on:.3f}x of off ({len(times['on'])} steps each)"
    )


def main() -> None:
    model = Model(MODEL)
    docs = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "longdocs")
    text = open(os.path.join(docs, sorted(os.listdir(docs))[0]), encoding="utf-8").read()[:12000]
    tokens = model.tokenize(text)
    prompt = tokens[:512]
    sessions_table(model, prompt)
    observation_table(model, prompt, tokens[512:])


if __name__ == "__main__":
    main()
