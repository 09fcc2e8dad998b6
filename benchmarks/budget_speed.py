"""Speed of bounded-memory generation on the default model (SmolLM2-135M), measured side by side.

1. Decode tok/s as generation grows to --depth tokens: full cache vs. budget 256. The two
   sessions live in one process and alternate every --segment tokens, so machine drift hits both.
2. Per scorer, with and without AMS (budget 256, interval 128): milliseconds per compression
   event, the share of wall time spent in the controller (reading evidence back + scoring +
   selecting + evicting), and decode tok/s relative to the same budget with StreamingLLM without
   AMS (which observes nothing), which shows the cost of the evidence side branch.

    python benchmarks/budget_speed.py [--depth 4096] [--segment 512] [--tokens 1024]
        [--out benchmarks/results/budget_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amslocal.backend import ContextParams, Model, SamplerParams  # noqa: E402
from amslocal.scorers import SCORERS  # noqa: E402
from amslocal.session import CompressionConfig, Session  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of lighthouses and the people who kept them."


def depth_curve(model: Model, depth: int, segment: int, budget: int, interval: int) -> dict:
    sessions = {
        "full": Session(model, CompressionConfig(budget=None), ContextParams(n_ctx=depth + 256), SamplerParams(temp=0)),
        f"budget{budget}": Session(
            model,
            CompressionConfig(budget=budget, interval=interval, scorer="tova"),
            ContextParams(),
            SamplerParams(temp=0),
        ),
    }
    prompt = model.tokenize(PROMPT)
    iters = {name: s.generate(prompt, depth, ignore_eos=True) for name, s in sessions.items()}
    curve = {name: [] for name in sessions}
    for start in range(0, depth, segment):
        for name, it in iters.items():
            t0 = time.perf_counter()
            n = sum(1 for _ in zip(range(segment), it))
            curve[name].append(
                {
                    "tokens": start + n,
                    "tok_per_s": n / (time.perf_counter() - t0),
                    "cells": sessions[name].view.n_occupied(0),
                }
            )
        print(
            "  depth "
            + str(start + segment)
            + ": "
            + ", ".join(f"{k}={v[-1]['tok_per_s']:.1f} tok/s" for k, v in curve.items()),
            file=sys.stderr,
        )
    return curve


def scorer_costs(model: Model, tokens: int, budget: int, interval: int, calibration: dict | None) -> list[dict]:
    rows = []
    prompt = model.tokenize(PROMPT)
    variants = [("streaming", False)] + [
        (name, ams) for name in sorted(SCORERS) for ams in (False, True) if (name, ams) != ("streaming", False)
    ]
    for name, ams in variants:
        cfg = CompressionConfig(
            budget=budget,
            interval=interval,
            scorer=name,
            ams=ams,
            calibration=calibration if name == "triattention" else None,
        )
        s = Session(model, cfg, ContextParams(), SamplerParams(temp=0))
        t0 = time.perf_counter()
        for _ in s.generate(prompt, tokens, ignore_eos=True):
            pass
        wall = time.perf_counter() - t0
        st = s.stats
        rows.append(
            {
                "scorer": name,
                "ams": ams,
                "compressions": st.compressions,
                # median: the first event of a process can carry one-off costs (BLAS thread start-up)
                "ms_per_event": float(np.median([e["ms"] for e in s.events])) if s.events else 0.0,
                "ms_per_event_mean": st.compress_ms_total / max(st.compressions, 1),
                "controller_share": (st.compress_ms_total + st.observe_ms_total) / 1e3 / wall,
                "decode_tok_per_s": st.decode_tok_per_s,
                "kv_cells_peak": st.kv_cells_peak,
            }
        )
        r = rows[-1]
        print(
            f"  {name}{'+ams' if ams else ''}: {r['ms_per_event']:.1f} ms/event (median), controller "
            f"{100 * r['controller_share']:.1f}% of wall, {r['decode_tok_per_s']:.1f} tok/s",
            file=sys.stderr,
        )
    base = rows[0]["decode_tok_per_s"]
    for r in rows:
        r["decode_vs_streaming"] = r["decode_tok_per_s"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--interval", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens generated per scorer variant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget_speed.json"))
    args = ap.parse_args()

    model = Model(args.model)
    calibration = None
    try:
        from amslocal.calibration import calibrate, load_for_model

        try:
            calibration = load_for_model(args.model)
        except Exception:
            calibrate(args.model, self_tokens=512)
            calibration = load_for_model(args.model)
    except Exception as exc:  # the table then says triattention was not measured
        print(f"  triattention calibration failed: {exc}", file=sys.stderr)

    print("decode speed by depth:", file=sys.stderr)
    curve = depth_curve(model, args.depth, args.segment, args.budget, args.interval)
    print("per scorer:", file=sys.stderr)
    costs = scorer_costs(model, args.tokens, args.budget, args.interval, calibration)
    result = {
        "command": " ".join(["python"] + sys.argv),
        "model": Path(args.model).name,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "budget": args.budget,
        "interval": args.interval,
        "depth_curve": curve,
        "scorer_costs": costs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    names = list(curve)
    print(f"| generated | {names[0]} tok/s | {names[1]} tok/s | ratio |\n|---|---|---|---|")
    for a, b in zip(*curve.values()):
        print(
            f"| {a['tokens']} | {a['tok_per_s']:.1f} | {b['tok_per_s']:.1f} | {b['tok_per_s'] / a['tok_per_s']:.2f} |"
        )
    print("\n| scorer | AMS | events | ms/event (median) | controller share of wall | decode tok/s | vs streaming |")
    print("|---|---|---|---|---|---|---|")
    for r in costs:
        print(
            f"| {r['scorer']} | {'yes' if r['ams'] else 'no'} | {r['compressions']} | {r['ms_per_event']:.1f} | "
            f"{100 * r['controller_share']:.1f}% | {r['decode_tok_per_s']:.1f} | {r['decode_vs_streaming']:.2f} |"
        )


if __name__ == "__main__":
    main()
