"""Does what a cache holds change what a decode step costs? (BENCHMARKS.md §9.4)

Two sessions, StreamingLLM and TOVA+AMS, run to the same point right after an event (257 cells,
the same positions 0..512 spread over the same 384 cells); then both stop compressing and
observing, and decode the same 100 tokens, alternating step by step. Any difference is then in
llama.cpp's decode of the cache's contents (which tokens, in which cells), not in the controller.

    .venv/bin/python benchmarks/cache_content_cost.py [--flash-attn auto|on|off] [--kv f16|f32|q8_0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from amslocal.backend import Model, SamplerParams  # noqa: E402
from amslocal.config import CompressionConfig, ContextParams  # noqa: E402
from amslocal.session import Session  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--flash-attn", default="auto")
    ap.add_argument("--kv", default="f16")
    ap.add_argument("--granularity", default="head")
    ap.add_argument("--steps", type=int, default=128)
    a = ap.parse_args()
    model = Model(a.model)
    docs = os.path.join(ROOT, "..", "shared", "data", "longdocs")
    with open(os.path.join(docs, sorted(os.listdir(docs))[0]), encoding="utf-8") as f:
        toks = model.tokenize(f.read()[:20000])
    cp = ContextParams(n_threads=2, flash_attn=a.flash_attn, type_k=a.kv, type_v=a.kv)
    sessions = {}
    for name, scorer, ams in (("streaming", "streaming", False), ("ams-tova", "tova", True)):
        cfg = CompressionConfig(budget=256, interval=128, scorer=scorer, ams=ams, granularity=a.granularity)
        s = Session(model, cfg, cp, SamplerParams(temp=0))
        s.prefill(toks[:512])
        for _ in s.generate([], 300, ignore_eos=True):
            if s.n_occupied <= 257 and s.stats.compressions >= 3:
                break
        s.view.observe(0)
        sessions[name] = s
    layout = {}
    for name, s in sessions.items():
        occ = np.flatnonzero(s.view.cell_pos(0) >= 0)
        layout[name] = (occ.size, 1 + int(np.count_nonzero(np.diff(occ) > 1)))
    times = {name: [] for name in sessions}
    feed = toks[1000 : 1000 + a.steps]
    for i, t in enumerate(feed):
        order = list(sessions.items()) if i % 2 == 0 else list(sessions.items())[::-1]
        for name, s in order:
            t0 = time.perf_counter()
            s.gen.eval([t])
            times[name].append(time.perf_counter() - t0)
    print(f"flash attention {a.flash_attn}, K/V {a.kv}, granularity {a.granularity}, {a.steps} steps each, alternating")
    half = a.steps // 2
    for name in sessions:
        v = np.array(times[name]) * 1e3
        n_occ, runs = layout[name]
        print(
            f"  {name:10s} {n_occ} cells in {runs} runs; median step: first {half} {np.median(v[:half]):.3f} ms,"
            f" last {a.steps - half} {np.median(v[half:]):.3f} ms"
        )
    base, other = (np.array(times[n]) for n in sessions)
    print(
        f"  ams-tova / streaming step time: first half {np.median(other[:half]) / np.median(base[:half]):.3f}, "
        f"second half {np.median(other[half:]) / np.median(base[half:]):.3f}"
    )


if __name__ == "__main__":
    main()
