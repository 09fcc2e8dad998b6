"""Decode speed of the patched library (evidence off / on every step) against the stock code path.

Each measurement runs in its own process, because a process can load only one libllama; the
modes alternate round by round so that drift of a noisy machine hits all of them alike, and the
ratios are taken from the same run. Every worker uses the same raw llama_cpp decode loop: the
only difference between modes is the library (stock vs. patched) and, for `obs`, the call that
turns the evidence side branch on.

    python benchmarks/decode_overhead.py --stock-lib DIR [--patched-lib DIR] [--depths 512,2048]
        [--rounds 5] [--steps 64] [--obs-window 1] [--out benchmarks/results/decode_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def worker(model: str, depths: list[int], steps: int, obs: int, threads: int) -> dict:
    """Prefill to each depth and time `steps` single-token decodes; returns tok/s per depth."""
    import ctypes

    import llama_cpp as L

    global _quiet  # the callback must outlive the library's use of it
    _quiet = L.llama_log_callback(lambda *a: None)
    L.llama_log_set(_quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    m = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(m)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    out = {}
    for depth in depths:
        cp = L.llama_context_default_params()
        cp.n_ctx = depth + steps + 16
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        ctx = L.llama_init_from_model(m, cp)
        if obs:
            fn = L.llama_cpp._lib.llama_ams_set_obs
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32]
            fn(ctx, obs, 1)
        batch = L.llama_batch_init(512, 0, 1)
        # deterministic filler tokens: the content does not change the cost of a step
        toks = [(i * 7919) % (n_vocab - 100) + 50 for i in range(depth)]
        pos = 0
        for i in range(0, depth, 512):
            chunk = toks[i : i + 512]
            for j, t in enumerate(chunk):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = t, pos + j, 1
                batch.seq_id[j][0], batch.logits[j] = 0, 0
            batch.logits[len(chunk) - 1] = 1
            batch.n_tokens = len(chunk)
            assert L.llama_decode(ctx, batch) == 0
            pos += len(chunk)
        tok = 100
        t0 = time.perf_counter()
        for _ in range(steps):
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = tok, pos, 1, 0, 1
            batch.n_tokens = 1
            assert L.llama_decode(ctx, batch) == 0
            logits = L.llama_get_logits_ith(ctx, 0)
            tok = max(range(0, n_vocab, 97), key=lambda i: logits[i])  # cheap, fixed-cost "sampling"
            pos += 1
        out[str(depth)] = steps / (time.perf_counter() - t0)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    return out


def run_worker(lib: str | None, args, obs: int) -> dict:
    env = dict(os.environ)
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        args.model,
        "--depths",
        args.depths,
        "--steps",
        str(args.steps),
        "--obs",
        str(obs),
        "--threads",
        str(args.threads),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"decode_overhead: worker failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument(
        "--stock-lib", help="directory holding a stock libllama.so (python native/build.py --stock-lib DIR)"
    )
    ap.add_argument(
        "--patched-lib", default=None, help="directory of the patched libllama.so (default: the installed one)"
    )
    ap.add_argument("--depths", default="512,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--obs-window", type=int, default=1, help="observed queries per step in the `obs` mode")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_overhead.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--obs", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    if args.worker:
        print(json.dumps(worker(args.model, depths, args.steps, args.obs, args.threads)))
        return
    if not args.stock_lib:
        sys.exit(
            "decode_overhead: --stock-lib DIR is required (build one with: python native/build.py --stock-lib DIR)"
        )

    modes = {
        "stock": (args.stock_lib, 0),
        "patched_off": (args.patched_lib, 0),
        "patched_obs": (args.patched_lib, args.obs_window),
    }
    samples: dict[str, dict[str, list[float]]] = {m: {str(d): [] for d in depths} for m in modes}
    for r in range(args.rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))  # alternate the order too
        for mode in order:
            lib, obs = modes[mode]
            for d, tps in run_worker(lib, args, obs).items():
                samples[mode][d].append(tps)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{m}@{d}={samples[m][d][-1]:.1f}" for m in modes for d in samples[m]),
            file=sys.stderr,
        )

    summary = {}
    for d in map(str, depths):
        med = {m: statistics.median(samples[m][d]) for m in modes}
        # per-round paired ratios (same round, adjacent in time) and their median
        paired_off = [a / b for a, b in zip(samples["patched_off"][d], samples["stock"][d])]
        paired_obs = [a / b for a, b in zip(samples["patched_obs"][d], samples["patched_off"][d])]
        summary[d] = {
            "tok_per_s_median": med,
            "patched_off_vs_stock": statistics.median(paired_off),
            "obs_every_step_vs_patched_off": statistics.median(paired_obs),
        }
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "model": Path(args.model).name,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "threads": args.threads,
        "steps_per_sample": args.steps,
        "rounds": args.rounds,
        "obs_window": args.obs_window,
        "samples": samples,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| depth | stock tok/s | patched, evidence off | ratio | evidence every step (W={args.obs_window}) | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for d, s in summary.items():
        m = s["tok_per_s_median"]
        print(
            f"| {d} | {m['stock']:.1f} | {m['patched_off']:.1f} | {s['patched_off_vs_stock']:.3f} | "
            f"{m['patched_obs']:.1f} | {s['obs_every_step_vs_patched_off']:.3f} |"
        )


if __name__ == "__main__":
    main()
