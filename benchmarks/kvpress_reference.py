#!/usr/bin/env python3
"""Teacher-forced perplexity of the reference presses (EIT-NLP/AdaptiveMassSegment, a fork of
NVIDIA kvpress) on amslocal's documents, for comparison with ``amslocal bench quality --task
perplexity``.

This script does NOT run inside amslocal's environment: it needs torch, transformers (4.56/4.57:
the fork's hooks read ``past_key_values`` / ``cache_position``, which transformers 5 renamed) and
the fork itself, in a separate virtualenv. Nothing of the fork is copied here; it is imported.

Setup (outside the repository)::

    git archive of github.com/EIT-NLP/AdaptiveMassSegment HEAD  ->  /work/kvref/src
    python3 -m venv /work/kvref/venv
    /work/kvref/venv/bin/pip install torch transformers gguf numpy
    /work/kvref/venv/bin/pip install "transformers>=4.56,<4.58" accelerate "cachetools<6" "datasets<3" "fire<0.7"
    /work/kvref/venv/bin/pip install --no-deps -e /work/kvref/src

Documents: the token ids amslocal itself feeds (``load_items('perplexity', ...)`` +
``document_tokens``), dumped to JSON with amslocal's own environment; they are fed as they are,
never re-tokenized.

What it does, per document: the full cache and every press are fed the document token by token,
in lockstep, on CPU with one thread. Each press is the reference's ``DecodingPress`` around the
reference scorer, with its own length trigger: when a layer's cache holds ``budget + interval``
tokens (after the current token was appended and attended), it is gathered down to ``budget``.
So the cache grows to B + I, is cut to B, and is cut again every I tokens: the first cut happens
when the cache first holds B + I tokens, before token B + I is added -- amslocal's schedule.
Scored: the predictions made at token t for B + I <= t <= n - 2 (token t predicts t + 1), the
same rows amslocal's ``runner.perplexity`` scores.

Per method and document it writes one JSON line: tokens, nll, full_nll, kl (sum of
KL(p_full || p_method), nats, float64 log-softmax over the whole vocabulary), top1 (argmax agrees
with the full cache's), compressions, seconds (that method's own forward time, compression
included).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

METHODS = ("full", "tova", "ams-tova", "snapkv")

# the fork's paper defaults for AMS (evaluation/evaluate_registry.py AMS_DEFAULTS, README example)
AMS_DEFAULTS = dict(
    window_size=32,
    segment_mass=0.02,
    min_seg_len=32,
    max_seg_len=1024,
    min_keep_per_segment=8,
    n_sink=4,
    always_keep_last=32,
    sort_indices=True,
    use_credit=True,
    credit_decay=0.8,
    mix_beta=0.7,
    record_segment_stats=False,
    visualize=False,
)
# hidden-state buffers as the fork's registry sets them (decoding_tova: 0, AMS variants: 256);
# SnapKV has no decoding entry there: 256 like the other attention-window scorers
HS_BUFFER = {"tova": 0, "ams-tova": 256, "snapkv": 256}

SETUP = """\
# reference checkout and environment (outside the repository)
git --git-dir=/work/.mirror/EIT-NLP+AdaptiveMassSegment/repo archive HEAD | tar -x -C /work/kvref/src
python3 -m venv /work/kvref/venv
/work/kvref/venv/bin/pip install torch transformers gguf numpy
/work/kvref/venv/bin/pip install "transformers>=4.56,<4.58" "accelerate>=1.0.0,<2" "cachetools>=5.5.2,<6" "datasets>=2.21.0,<3" "fire>=0.6.0,<0.7"
/work/kvref/venv/bin/pip install --no-deps -e /work/kvref/src
# amslocal's documents and token ids, dumped with amslocal's own environment
cd /work/main && .venv/bin/python benchmarks/kvpress_docs.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf -n 8 --doc-tokens 1536 --out /work/kvref/docs-1536.json"""


def make_press(method: str, budget: int, interval: int):
    """The reference's DecodingPress around the reference scorer, triggered by cache length."""
    if method == "full":
        return None
    from kvpress import DecodingPress, SnapKVPress, TOVAPress
    from kvpress.presses.adaptive_segment_head_press import AdaptiveMassSegmentWrapperHeadPress

    if method == "tova":
        base = TOVAPress()
    elif method == "ams-tova":
        base = AdaptiveMassSegmentWrapperHeadPress(base_press=TOVAPress(), compression_ratio=0.0, **AMS_DEFAULTS)
    elif method == "snapkv":
        base = SnapKVPress()  # window_size=64, kernel_size=5 (its defaults)
    else:
        raise SystemExit(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return DecodingPress(
        base_press=base,
        compression_interval=10**9,
        target_size=budget,
        hidden_states_buffer_size=HS_BUFFER[method],
        trigger_on_k_len=True,
        k_len_trigger_margin=interval,
        min_steps_before_k_len_trigger=0,
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cache_len(cache) -> int:
    return int(cache.layers[0].keys.shape[2]) if len(cache.layers) and cache.layers[0].keys is not None else 0


def run_document(model, tokens: list[int], methods: list[str], budget: int, interval: int, log) -> dict[str, dict]:
    from transformers import DynamicCache

    n = len(tokens)
    capacity = budget + interval
    if n - 1 <= capacity:
        raise SystemExit(f"a document of {n} tokens never passes {capacity} cells")
    presses = {m: make_press(m, budget, interval) for m in methods}
    caches = {m: DynamicCache() for m in ["full", *methods]}
    acc = {
        m: {
            "tokens": 0,
            "nll": 0.0,
            "full_nll": 0.0,
            "kl": 0.0,
            "top1": 0,
            "compressions": 0,
            "seconds": 0.0,
            "first_eviction_at": None,
            "sizes_after": set(),
        }
        for m in methods
    }
    full_seconds = 0.0
    ids = torch.tensor(tokens, dtype=torch.long)
    t_start = time.perf_counter()
    with torch.inference_mode():
        for t in range(n):
            inp = ids[t : t + 1].view(1, 1)
            pos = torch.tensor([[t]], dtype=torch.long)
            scored = capacity <= t <= n - 2
            t0 = time.perf_counter()
            out = model(input_ids=inp, past_key_values=caches["full"], position_ids=pos, use_cache=True)
            full_seconds += time.perf_counter() - t0
            if scored:
                ref = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
                p_ref = ref.exp()
                ref_top = int(ref.argmax())
                target = tokens[t + 1]
                full_nll = -float(ref[target])
            for m in methods:
                a = acc[m]
                if m == "full":  # the reference itself: KL 0, full agreement
                    a["seconds"] = full_seconds
                    if scored:
                        a["tokens"] += 1
                        a["nll"] += full_nll
                        a["full_nll"] += full_nll
                        a["top1"] += 1
                    continue
                cache, press = caches[m], presses[m]
                before = cache_len(cache)
                t0 = time.perf_counter()
                with press(model):
                    out = model(input_ids=inp, past_key_values=cache, position_ids=pos, use_cache=True)
                a["seconds"] += time.perf_counter() - t0
                after = cache_len(cache)
                if after < before + 1:  # the press gathered this layer-0 cache down
                    a["compressions"] += 1
                    a["sizes_after"].add(after)
                    if a["first_eviction_at"] is None:
                        a["first_eviction_at"] = t  # the cache held t + 1 tokens; token t + 1 sees the cut cache
                    lens = {int(layer.keys.shape[2]) for layer in cache.layers}
                    if lens != {after}:
                        raise RuntimeError(f"{m}: layers disagree on cache length after compression: {lens}")
                if scored:
                    if a["first_eviction_at"] is None or a["first_eviction_at"] != capacity - 1:
                        raise RuntimeError(
                            f"{m}: first eviction at token {a['first_eviction_at']}, expected {capacity - 1}"
                        )
                    lp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
                    a["tokens"] += 1
                    a["nll"] += -float(lp[target])
                    a["full_nll"] += full_nll
                    a["kl"] += float((p_ref * (ref - lp)).sum())
                    a["top1"] += int(int(lp.argmax()) == ref_top)
            if log and (t + 1) % 256 == 0:
                log(
                    f"  token {t + 1}/{n}  {time.perf_counter() - t_start:.0f}s  "
                    + "  ".join(
                        f"{m}:len={cache_len(caches[m]) if m != 'full' else cache_len(caches['full'])}" for m in methods
                    )
                )
    for a in acc.values():
        a["sizes_after"] = sorted(a["sizes_after"])
    return acc


def pooled(rows: list[dict]) -> dict:
    n = sum(r["tokens"] for r in rows)
    if not n:
        return {}
    nll, full = sum(r["nll"] for r in rows), sum(r["full_nll"] for r in rows)
    return {
        "docs": len(rows),
        "tokens": n,
        "ppl": math.exp(nll / n),
        "full_ppl": math.exp(full / n),
        "ratio": math.exp((nll - full) / n),
        "kl": sum(r["kl"] for r in rows) / n,
        "top1": sum(r["top1"] for r in rows) / n,
        "compressions": sum(r["compressions"] for r in rows) / len(rows),
        "seconds": sum(r["seconds"] for r in rows) / len(rows),
    }


def write_summary(out: Path, methods: list[str], budget: int, interval: int, command: str, meta: dict) -> str:
    rows = [r for r in read_jsonl(out / "items.jsonl") if r["budget"] == budget and r["interval"] == interval]
    # pool only over documents every listed method has, so the rows compare the same tokens
    ids = [
        i
        for i in dict.fromkeys(r["id"] for r in rows)
        if all(any(r["id"] == i and r["method"] == m for r in rows) for m in methods)
    ]
    lines = [
        "# Reference kvpress presses (EIT-NLP/AdaptiveMassSegment) on amslocal's perplexity documents",
        "",
        "Commands:",
        "",
        "```",
        SETUP,
        "# this benchmark (resumable: documents already in items.jsonl are skipped)",
        command,
        "```",
        "",
        f"Model: {meta.get('model')} (GGUF dequantized to float32 by transformers {meta.get('transformers')}, "
        f"torch {meta.get('torch')}, attn_implementation={meta.get('attn')}, 1 CPU thread).",
        f"Budget B = {budget} cells, interval I = {interval}: the cache grows to B + I = {budget + interval}, is "
        f"cut to B, then every I tokens. Counted: the predictions at tokens t >= {budget + interval} "
        "(each predicts t + 1), pooled over documents (every counted token weighs the same).",
        f"Documents: {len(ids)} ({', '.join(ids)}), {meta.get('doc_tokens')} tokens each, amslocal's token ids.",
        "",
        "| method | docs | tokens | perplexity | full-cache perplexity | ratio | mean KL (nats) | top-1 | "
        "compressions/doc | s/doc (method's forwards) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        p = pooled([r for r in rows if r["method"] == m and r["id"] in ids])
        if not p:
            continue
        lines.append(
            f"| {m} | {p['docs']} | {p['tokens']} | {p['ppl']:.4f} | {p['full_ppl']:.4f} | {p['ratio']:.4f} | "
            f"{p['kl']:.4f} | {p['top1']:.4f} | {p['compressions']:.1f} | {p['seconds']:.1f} |"
        )
    lines += [
        "",
        "Per document:",
        "",
        "| id | method | tokens | perplexity | full-cache perplexity | ratio | mean KL | top-1 | compressions | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in ids:
        for m in methods:
            for r in rows:
                if r["id"] == i and r["method"] == m:
                    p = pooled([r])
                    lines.append(
                        f"| {i} | {m} | {p['tokens']} | {p['ppl']:.4f} | {p['full_ppl']:.4f} | "
                        f"{p['ratio']:.4f} | {p['kl']:.4f} | {p['top1']:.4f} | {r['compressions']} | "
                        f"{r['seconds']:.1f} |"
                    )
    lines += ["", "Reference parameters: " + meta.get("params", ""), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=Path("/work/kvref/docs-1536.json"))
    ap.add_argument("--model-dir", default="/work/main/models")
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kvpress-reference-smollm2"
    )
    ap.add_argument("--methods", default="full,tova,ams-tova,snapkv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--interval", type=int, default=128)
    ap.add_argument("-n", type=int, default=None, help="at most this many documents (in the dump's order)")
    ap.add_argument(
        "--deadline-min",
        type=float,
        default=None,
        help="start no new document once this many minutes have passed (or the last one's time would overrun it)",
    )
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    if "full" not in methods:
        methods = ["full", *methods]
    args.out.mkdir(parents=True, exist_ok=True)
    items_path = args.out / "items.jsonl"
    dump = json.loads(args.docs.read_text())
    docs = dump["docs"][: args.n]
    command = "cd /work/main && OMP_NUM_THREADS=1 /work/kvref/venv/bin/python " + " ".join(
        shlex.quote(a)
        for a in [
            os.path.relpath(sys.argv[0], "/work/main") if sys.argv[0].startswith("/work/main") else sys.argv[0],
            *sys.argv[1:],
        ]
    )
    import transformers

    params = (
        f"DecodingPress(target_size={args.budget}, compression_interval=10**9 (step trigger off), "
        f"trigger_on_k_len=True, k_len_trigger_margin={args.interval}, min_steps_before_k_len_trigger=0, "
        f"hidden_states_buffer_size={HS_BUFFER}); tova = TOVAPress() (no sinks, no kept window: only the "
        f"current token is protected; scores averaged over heads, one token set per layer); ams-tova = "
        f"AdaptiveMassSegmentWrapperHeadPress(base_press=TOVAPress(), **{AMS_DEFAULTS}); snapkv = "
        f"SnapKVPress(window_size=64, kernel_size=5), per KV head."
    )
    meta = {
        "model": f"{args.model_dir}/{args.gguf}",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn": "sdpa (the fork's evaluation default)",
        "doc_tokens": dump.get("doc_tokens"),
        "params": params,
    }
    if args.summary_only:
        print(write_summary(args.out, methods, args.budget, args.interval, command, meta))
        return

    logging.getLogger("kvpress").setLevel(logging.WARNING)
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, gguf_file=args.gguf, torch_dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    meta["attn"] = model.config._attn_implementation + " (the fork's evaluation default)"
    print(
        f"model loaded in {time.perf_counter() - t0:.1f}s: {type(model).__name__}, "
        f"attn={model.config._attn_implementation}, threads={torch.get_num_threads()}",
        flush=True,
    )

    start = time.perf_counter()
    last_doc_s = 0.0
    for doc in docs:
        done = {
            (r["method"])
            for r in read_jsonl(items_path)
            if r["id"] == doc["id"] and r["budget"] == args.budget and r["interval"] == args.interval
        }
        todo = [m for m in methods if m not in done]
        if not todo:
            print(f"{doc['id']}: done already", flush=True)
            continue
        if args.deadline_min is not None:
            elapsed = (time.perf_counter() - start) / 60
            if elapsed >= args.deadline_min or elapsed + last_doc_s / 60 > args.deadline_min:
                print(f"deadline: stopping before {doc['id']} ({elapsed:.1f} min elapsed)", flush=True)
                break
        run_methods = [m for m in methods if m in todo or m == "full"]
        print(f"{doc['id']}: {len(doc['tokens'])} tokens, methods {run_methods}", flush=True)
        d0 = time.perf_counter()
        res = run_document(
            model, doc["tokens"], run_methods, args.budget, args.interval, log=lambda s: print(s, flush=True)
        )
        last_doc_s = time.perf_counter() - d0
        with items_path.open("a") as f:
            for m in run_methods:
                if m not in todo:
                    continue
                a = res[m]
                rec = {
                    "id": doc["id"],
                    "method": m,
                    "budget": args.budget,
                    "interval": args.interval,
                    "tokens": a["tokens"],
                    "nll": a["nll"],
                    "full_nll": a["full_nll"],
                    "kl": a["kl"],
                    "top1": a["top1"],
                    "compressions": a["compressions"],
                    "seconds": round(a["seconds"], 3),
                    "first_eviction_at": a["first_eviction_at"],
                    "sizes_after": a["sizes_after"],
                    "doc_tokens": len(doc["tokens"]),
                    "doc_seconds": round(last_doc_s, 3),
                }
                f.write(json.dumps(rec) + "\n")
                print(
                    f"  {m}: tokens={a['tokens']} ppl={math.exp(a['nll'] / a['tokens']):.4f} "
                    f"ratio={math.exp((a['nll'] - a['full_nll']) / a['tokens']):.4f} kl={a['kl'] / a['tokens']:.4f} "
                    f"top1={a['top1'] / a['tokens']:.4f} compressions={a['compressions']} sizes={a['sizes_after']} "
                    f"first={a['first_eviction_at']} s={a['seconds']:.1f}",
                    flush=True,
                )
        print(f"{doc['id']}: {last_doc_s:.1f}s", flush=True)
        write_summary(args.out, methods, args.budget, args.interval, command, meta)
    print(write_summary(args.out, methods, args.budget, args.interval, command, meta))


if __name__ == "__main__":
    main()
