"""Fidelity of a compressed cache to the full cache, for choosing defaults by measurement.

(The user-facing version, per method and budget, is ``amslocal bench quality --task fidelity``;
this script also varies the aggregation and the positions mode.)

For each prompt the full-cache greedy continuation is the reference. Every configuration then
teacher-forces that same continuation under its budget, and at every step compares its next-token
distribution with the full cache's: mean KL(full || compressed) and top-1 agreement. Nothing is
sampled, so the numbers compare the caches, not luck.

    python benchmarks/fidelity.py [--model M] [--n 8] [--tokens 320] [--budget 128] [--interval 64]
        [--configs tova:ams:mean,tova:ams:max,...] [--out benchmarks/results/fidelity.json]

A config is scorer:ams|topk:aggregation[:keep|compact].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from amslocal.backend import ContextParams, Model, SamplerParams
from amslocal.bench.runner import log_softmax
from amslocal.session import CompressionConfig, Session

ROOT = Path(__file__).resolve().parents[1]  # default paths only: amslocal comes from the installed package

DATA = ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
DEFAULT_CONFIGS = ",".join(
    [
        "tova:ams:mean",
        "tova:ams:max",
        "tova:ams:rank",
        "snapkv:ams:mean",
        "snapkv:ams:max",
        "snapkv:ams:rank",
        "tova:topk:mean",
        "tova:ams:mean:compact",
    ]
)


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [f"Question: {r['question']}\nLet's think step by step.\nAnswer:" for r in rows]


def reference(model: Model, prompt: list[int], tokens: int) -> tuple[list[int], list[np.ndarray]]:
    s = Session(
        model, CompressionConfig(budget=None), ContextParams(n_ctx=len(prompt) + tokens + 8), SamplerParams(temp=0)
    )
    s.prefill(prompt)
    out, logps = [], []
    for _ in range(tokens):
        logits = s.gen.ctx.logits()
        logps.append(log_softmax(logits))
        tok = int(np.argmax(logits))
        out.append(tok)
        s.feed([tok])
    return out, logps


def forced(model: Model, cfg: CompressionConfig, prompt: list[int], ref: list[int], ref_logp) -> dict:
    s = Session(model, cfg, ContextParams(), SamplerParams(temp=0))
    s.prefill(prompt)
    kl, agree = [], []
    for tok, lp_full in zip(ref, ref_logp):
        lp = log_softmax(s.gen.ctx.logits())
        p_full = np.exp(lp_full)
        kl.append(float((p_full * (lp_full - lp)).sum()))
        agree.append(bool(np.argmax(lp) == np.argmax(lp_full)))
        s.feed([tok])
    first_div = next((i for i, a in enumerate(agree) if not a), len(agree))
    return {
        "kl": float(np.mean(kl)),
        "top1": float(np.mean(agree)),
        "first_divergence": first_div,
        "compressions": s.stats.compressions,
        "kv_cells_peak": s.stats.kv_cells_peak,
    }


def parse(spec: str, budget: int, interval: int) -> CompressionConfig:
    parts = spec.split(":")
    scorer, sel, agg = parts[:3]
    positions = parts[3] if len(parts) > 3 else "keep"
    return CompressionConfig(
        budget=budget, interval=interval, scorer=scorer, ams=(sel == "ams"), aggregation=agg, positions=positions
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fidelity.json"))
    args = ap.parse_args()

    model = Model(args.model)
    specs = args.configs.split(",")
    per_config: dict[str, list[dict]] = {c: [] for c in specs}
    t0 = time.perf_counter()
    for i, text in enumerate(prompts(args.n)):
        prompt = model.tokenize(text)
        ref, ref_logp = reference(model, prompt, args.tokens)
        for spec in specs:
            per_config[spec].append(forced(model, parse(spec, args.budget, args.interval), prompt, ref, ref_logp))
        print(f"prompt {i + 1}/{args.n} ({len(prompt)} tokens) done, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    summary = {
        c: {k: float(np.mean([r[k] for r in rows])) for k in ("kl", "top1", "first_divergence", "compressions")}
        for c, rows in per_config.items()
    }
    result = {
        "command": " ".join(["python"] + sys.argv),
        "model": Path(args.model).name,
        "n": args.n,
        "tokens": args.tokens,
        "budget": args.budget,
        "interval": args.interval,
        "summary": summary,
        "per_prompt": per_config,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| config (scorer:selector:aggregation[:positions]) | mean KL to full | top-1 agreement "
        "| first divergence | events |"
    )
    print("|---|---|---|---|---|")
    for c, s in summary.items():
        print(f"| {c} | {s['kl']:.4f} | {s['top1']:.3f} | {s['first_divergence']:.1f} | {s['compressions']:.1f} |")


if __name__ == "__main__":
    main()
