"""Load on `amslocal serve`: concurrent clients, multi-turn conversations resent in full each turn.

    .venv/bin/python benchmarks/serve_load.py --out benchmarks/results/serve-load

Starts the server twice (same settings) and runs the same conversations against each:
- **reuse**: every turn sends the whole conversation, as OpenAI clients do; the server continues the
  session that holds it and reads only the new messages;
- **no reuse**: the same requests, each with a fresh ``session_id``, so every turn reads the whole
  conversation into a new session (what a server without prefix reuse does).

Reports requests/s, time to first token (p50/p95, queueing included), the server's peak RSS
(VmHWM), the most live sessions seen (polled on /health, and the pool's own peak), failed requests
and the prompt tokens read per turn. Writes ``summary.json`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serving import Server  # noqa: E402

TOPICS = [
    "lighthouses", "volcanoes", "honey bees", "the moon", "glaciers", "coral reefs", "trains", "violins",
    "deserts", "owls", "bridges", "tea", "comets", "rivers", "castles", "maple trees", "octopuses",
    "clocks", "bicycles", "thunderstorms",
]  # fmt: skip
FOLLOW_UPS = ["Tell me one more surprising fact about that.", "Now sum it all up in one sentence."]


def conversations(n: int) -> list[list[str]]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        opener = f"Conversation {i}: tell me about {topic} in a short paragraph."
        out.append([opener, *FOLLOW_UPS])
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def run_pass(server: Server, convs: list[list[str]], clients: int, max_tokens: int, reuse: bool) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, c in enumerate(convs):
        queue.put_nowait((i, c))
    records: list[dict] = []
    failures: list[str] = []
    live_max = 0
    rss_max = 0
    done = asyncio.Event()

    async def poll(http: httpx.AsyncClient) -> None:
        nonlocal live_max, rss_max
        while not done.is_set():
            try:
                h = (await http.get(server.base + "/health")).json()
                live_max = max(live_max, h["live_sessions"])
            except (httpx.HTTPError, ValueError):
                pass
            rss_max = max(rss_max, vm_kib(server.proc.pid, "VmRSS"))
            await asyncio.sleep(0.1)

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            try:
                i, turns = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            messages: list[dict] = []
            for t, text in enumerate(turns):
                messages.append({"role": "user", "content": text})
                body = {
                    "messages": messages,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                if not reuse:
                    body["session_id"] = "noreuse-" + uuid.uuid4().hex[:12]
                t0 = time.perf_counter()
                ttft = None
                reply, usage = [], None
                try:
                    async with http.stream("POST", server.base + "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            failures.append(f"conv {i} turn {t}: HTTP {r.status_code} {await r.aread()!r}")
                            break
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                failures.append(f"conv {i} turn {t}: {ev['error']['message']}")
                            if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                                if ttft is None:
                                    ttft = time.perf_counter() - t0
                                reply.append(ev["choices"][0]["delta"]["content"])
                            if ev.get("usage"):
                                usage = ev["usage"]
                except httpx.HTTPError as exc:
                    failures.append(f"conv {i} turn {t}: {exc.__class__.__name__}: {exc}")
                    break
                if usage is None:
                    failures.append(f"conv {i} turn {t}: no usage chunk")
                    break
                records.append(
                    {
                        "conv": i,
                        "turn": t,
                        "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
                        "total_s": time.perf_counter() - t0,
                        **{k: usage[k] for k in ("prompt_tokens", "prompt_tokens_fed", "completion_tokens")},
                        "compressions": usage["compressions"],
                        "restored": usage["session_restored"],
                    }
                )
                messages.append({"role": "assistant", "content": "".join(reply)})

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        poller = asyncio.create_task(poll(http))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
        done.set()
        await poller
        health = (await http.get(server.base + "/health")).json()
    turns = max((r["turn"] for r in records), default=-1) + 1
    per_turn = []
    for t in range(turns):
        rows = [r for r in records if r["turn"] == t]
        per_turn.append(
            {
                "turn": t + 1,
                "requests": len(rows),
                "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in rows),
                "prompt_tokens_fed_mean": statistics.mean(r["prompt_tokens_fed"] for r in rows),
            }
        )
    ttfts = [r["ttft_s"] for r in records]
    return {
        "reuse": reuse,
        "requests": len(records),
        "failed": len(failures),
        "failures": failures[:20],
        "wall_s": wall,
        "requests_per_s": len(records) / wall if wall else 0.0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "completion_tokens": sum(r["completion_tokens"] for r in records),
        "prompt_tokens_fed": sum(r["prompt_tokens_fed"] for r in records),
        "restores": sum(1 for r in records if r["restored"]),
        "compressions": sum(r["compressions"] for r in records),
        "per_turn": per_turn,
        "live_sessions_max_polled": live_max,
        "live_sessions_peak_pool": health["live_sessions_peak"],
        "rss_max_polled_mib": rss_max / 1024,
        "records": records,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--interval", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--out", default="bench-results/serve-load")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = conversations(args.conversations)
    server_args = [
        "--budget", str(args.budget), "--interval", str(args.interval), "--sessions", str(args.sessions),
        "-t", str(args.threads), "--max-queue", str(args.clients * 2),
    ]  # fmt: skip
    results = {}
    for reuse in (True, False):
        with Server(args.model, *server_args) as server:
            res = asyncio.run(run_pass(server, convs, args.clients, args.max_tokens, reuse))
            res["rss_peak_mib"] = vm_kib(server.proc.pid, "VmHWM") / 1024
        results["reuse" if reuse else "no_reuse"] = res
        print(
            f"{'reuse' if reuse else 'no reuse'}: {res['requests']} requests, {res['failed']} failed, "
            f"{res['requests_per_s']:.2f} req/s, TTFT p50 {res['ttft_p50_s']:.2f} s p95 {res['ttft_p95_s']:.2f} s, "
            f"peak RSS {res['rss_peak_mib']:.0f} MiB, live sessions max {res['live_sessions_max_polled']}",
            flush=True,
        )
    doc = {"settings": vars(args), "results": results}
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    r, n = results["reuse"], results["no_reuse"]
    lines = [
        f"# amslocal serve under load: {args.clients} clients, {args.conversations} conversations x 3 turns",
        "",
        f"Model {Path(args.model).name}, budget {args.budget} + interval {args.interval}, --sessions "
        f"{args.sessions}, replies up to {args.max_tokens} tokens, greedy. Command: `.venv/bin/python "
        f"benchmarks/serve_load.py {' '.join(sys.argv[1:])}`.",
        "",
        "| | reuse (full history resent) | no reuse (a new session per request) |",
        "|---|---|---|",
        f"| requests (failed) | {r['requests']} ({r['failed']}) | {n['requests']} ({n['failed']}) |",
        f"| requests/s | {r['requests_per_s']:.2f} | {n['requests_per_s']:.2f} |",
        f"| time to first token p50 / p95 | {r['ttft_p50_s']:.2f} s / {r['ttft_p95_s']:.2f} s | "
        f"{n['ttft_p50_s']:.2f} s / {n['ttft_p95_s']:.2f} s |",
        f"| peak RSS (VmHWM) | {r['rss_peak_mib']:.0f} MiB | {n['rss_peak_mib']:.0f} MiB |",
        f"| live sessions, max seen / pool peak (K = {args.sessions}) | {r['live_sessions_max_polled']} / "
        f"{r['live_sessions_peak_pool']} | {n['live_sessions_max_polled']} / {n['live_sessions_peak_pool']} |",
        f"| sessions restored from disk | {r['restores']} | {n['restores']} |",
        f"| prompt tokens read, all requests | {r['prompt_tokens_fed']} | {n['prompt_tokens_fed']} |",
    ]
    for tr, tn in zip(r["per_turn"], n["per_turn"]):
        lines.append(
            f"| turn {tr['turn']}: prompt tokens read / in the prompt (mean) | {tr['prompt_tokens_fed_mean']:.0f} / "
            f"{tr['prompt_tokens_mean']:.0f} | {tn['prompt_tokens_fed_mean']:.0f} / {tn['prompt_tokens_mean']:.0f} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if r["failed"] or n["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
