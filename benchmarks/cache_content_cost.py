"""What the cache holds, and flash attention, against decode speed on the CPU (BENCHMARKS.md §9.4).

``content`` (default): two sessions, StreamingLLM and TOVA+AMS (with token sets a third, TOVA+AMS
leaving its evicted cells as holes instead of packing its tokens), run to the same point right after
an event (257 cells, the same positions 0..512 over the same 384 cells); then all of them stop
compressing and observing and decode the same tokens, in turn step by step. Any difference is
in llama.cpp's decode of the cache's contents (which tokens, in which cells), not in the
controller.

``halves``: how each session's visible cells split between the two threads' ranges of ggml's
split-KV flash attention, through the interval after an event.

``flash-attn``: each method twice, flash attention on and off, as sessions (budget 256) taking
turns to generate N tokens per round, the order rotated every round, events included.

    .venv/bin/python benchmarks/cache_content_cost.py [content] [--flash-attn auto|on|off] [--kv f16|f32|q8_0|K/V]
    .venv/bin/python benchmarks/cache_content_cost.py halves [--granularity head|token]
    .venv/bin/python benchmarks/cache_content_cost.py flash-attn [--model GGUF] [--methods a,b]
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


def session(model: Model, method: str, cp: ContextParams, prompt: list[int], **kw) -> Session:
    """A budget-256 session of ``method`` (S or ams-S) with ``prompt`` prefilled."""
    ams = method.startswith("ams-")
    cfg = CompressionConfig(budget=256, scorer=method[4:] if ams else method, ams=ams, **kw)
    s = Session(model, cfg, cp, SamplerParams(temp=0))
    s.prefill(prompt)
    return s


def content_table(model: Model, toks: list[int], a: argparse.Namespace) -> None:
    type_k, _, type_v = a.kv.partition("/")
    cp = ContextParams(n_threads=2, flash_attn=a.flash_attn, type_k=type_k, type_v=type_v or type_k)
    sessions = {}
    # token sets pack their kept tokens into the lowest cells (patch 0004); "holes" leaves them
    runs = [("streaming", "streaming", True), ("ams-tova", "ams-tova", True)]
    if a.granularity == "token":
        runs.append(("ams-tova, holes", "ams-tova", False))
    for name, method, pack in runs:
        s = session(model, method, cp, toks[:512], interval=128, granularity=a.granularity)
        s.pack_cells = s.pack_cells and pack
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
    names = list(sessions)
    for i, t in enumerate(toks[1000 : 1000 + a.steps]):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # the order rotates every step
            s = sessions[name]
            t0 = time.perf_counter()
            s.gen.eval([t])
            times[name].append(time.perf_counter() - t0)
    print(f"flash attention {a.flash_attn}, K/V {a.kv}, granularity {a.granularity}, {a.steps} steps each, alternating")
    half = a.steps // 2
    for name in sessions:
        v = np.array(times[name]) * 1e3
        n_occ, n_runs = layout[name]
        print(
            f"  {name:15s} {n_occ} cells in {n_runs} runs; median step: first {half} {np.median(v[:half]):.3f} ms,"
            f" last {a.steps - half} {np.median(v[half:]):.3f} ms"
        )
    base = np.array(times["streaming"])
    for name in names[1:]:
        other = np.array(times[name])
        print(
            f"  {name} / streaming step time: first half {np.median(other[:half]) / np.median(base[:half]):.3f}, "
            f"second half {np.median(other[half:]) / np.median(base[half:]):.3f}"
        )


def halves_table(model: Model, toks: list[int], a: argparse.Namespace) -> None:
    """How the visible cells split between the threads' ranges of ggml's split-KV flash attention
    (2 threads, 512 cells: 0-255 and 256-511), every 32 steps of the interval after an event."""
    cp = ContextParams(n_threads=2, flash_attn=a.flash_attn)
    print(f"visible cells in cells 0-255 / 256-511, every 32 steps after an event; granularity {a.granularity}")
    for name in ("streaming", "ams-tova"):
        s = session(model, name, cp, toks[:512], interval=128, granularity=a.granularity)
        for _ in s.generate([], 300, ignore_eos=True):
            if s.n_occupied <= 257 and s.stats.compressions >= 3:
                break
        counts = []
        for i, t in enumerate(toks[1000:1128]):
            if i % 32 == 0:
                occ = s.view.cell_pos(0) >= 0
                counts.append(f"{int(occ[:256].sum())}/{int(occ[256:512].sum())}")
            s.gen.eval([t])
        print(f"  {name:10s} " + "  ".join(counts))


def flash_attn_table(model: Model, toks: list[int], a: argparse.Namespace) -> None:
    sessions = {}
    for method in a.methods.split(","):
        for fa in ("on", "off"):
            s = session(model, method, ContextParams(n_threads=2, flash_attn=fa), toks[:512], interval=a.interval)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table", nargs="?", choices=("content", "halves", "flash-attn"), default="content")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--flash-attn", default="auto", help="content: the sessions' flash attention")
    ap.add_argument("--kv", default="f16", help="content: the K/V cache type (K/V: two types)")
    ap.add_argument("--granularity", default="head", help="content: token sets")
    ap.add_argument("--steps", type=int, default=128, help="content: steps decoded by each")
    ap.add_argument("--methods", default="streaming,ams-tova,ams-rkv", help="flash-attn: the first is the base")
    ap.add_argument("--interval", type=int, default=128, help="flash-attn")
    ap.add_argument("--n-gen", type=int, default=256, help="flash-attn: tokens per round")
    ap.add_argument("--rounds", type=int, default=4, help="flash-attn")
    a = ap.parse_args()
    model = Model(a.model)
    docs = os.path.join(ROOT, "..", "shared", "data", "longdocs")
    with open(os.path.join(docs, sorted(os.listdir(docs))[0]), encoding="utf-8") as f:
        toks = model.tokenize(f.read()[:20000])
    {"content": content_table, "halves": halves_table, "flash-attn": flash_attn_table}[a.table](model, toks, a)


if __name__ == "__main__":
    main()
