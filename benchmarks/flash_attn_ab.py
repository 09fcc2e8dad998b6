"""Flash attention on vs off for budgeted sessions on the CPU (BENCHMARKS.md §9.4).

Each method runs twice, with flash attention on and off, as its own session (budget 256); the
sessions take turns generating N tokens per round, the order rotated every round, events
included. Prints the median tokens/s of each.

    .venv/bin/python benchmarks/flash_attn_ab.py [--model GGUF] [--methods streaming,ams-tova,ams-rkv]
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
    ap.add_argument("--methods", default="streaming,ams-tova,ams-rkv")
    ap.add_argument("--interval", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    model = Model(a.model)
    docs = os.path.join(ROOT, "..", "shared", "data", "longdocs")
    with open(os.path.join(docs, sorted(os.listdir(docs))[0]), encoding="utf-8") as f:
        prompt = model.tokenize(f.read()[:8000])[:512]
    sessions = {}
    for method in a.methods.split(","):
        for fa in ("on", "off"):
            ams = method.startswith("ams-")
            cfg = CompressionConfig(budget=256, interval=a.interval, scorer=method[4:] if ams else method, ams=ams)
            s = Session(model, cfg, ContextParams(n_threads=2, flash_attn=fa), SamplerParams(temp=0))
            s.prefill(prompt)
            for _ in s.generate([], 64, ignore_eos=True):
                pass
            sessions[f"{method}, flash attention {fa}"] = s
    speeds = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in sessions[name].generate([], a.n_gen, ignore_eos=True):
                pass
            speeds[name].append(a.n_gen / (time.perf_counter() - t0))
    model_name = os.path.basename(a.model)
    print(f"{model_name}, budget 256, interval {a.interval}, {a.rounds} rounds of {a.n_gen} tokens, 2 threads")
    first = names[0].split(",")[0]
    base = {fa: np.median(speeds[f"{first}, flash attention {fa}"]) for fa in ("on", "off")}
    for name, v in speeds.items():
        fa = name.rsplit(" ", 1)[1]
        print(f"  {name:36s} {np.median(v):7.2f} t/s   vs {first} ({fa}): {np.median(v) / base[fa]:.3f}")


if __name__ == "__main__":
    main()
