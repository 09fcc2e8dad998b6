"""``amslocal bench quality``: accuracy, fidelity and passkey retrieval under a KV budget.

Layout of an output directory (one task, one model)::

    run.json                      the settings every result in the directory was made with
    items/<method>@<budget>.jsonl one line per finished item (full cache: items/full.jsonl)
    maps/<method>@<budget>.json   every compression event of one item (for the eviction map)
    summary.json, summary.md      per method and budget, over the items every method finished
    accuracy.png, eviction-*.png  the pictures

A run appends to the JSONL files as items finish, so an interrupted run continues where it
stopped; a re-run with other result-changing settings (model, max tokens, interval, ...) into the
same directory is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..backend import Model
from ..config import DEFAULT_KEEP_LAST, DEFAULT_N_SINK
from ..errors import BudgetError, InputError, OptionError
from ..templates import ChatTemplate
from .answers import grade
from .methods import Method
from .runner import Generation, RunSettings, fidelity, perplexity, run_method
from .tasks import FILLER, Item, load_items

FORMAT = 1  # bump when prompts or records change meaning; a directory of another format is refused
N_SINK_KEEP_LAST = DEFAULT_N_SINK + DEFAULT_KEEP_LAST  # the session's always-kept tokens: a budget must exceed them


@dataclass
class QualityRun:
    task: str
    model_path: Path
    methods: list[Method]
    budgets: list[int]
    out_dir: Path
    n: Optional[int] = None
    data_dir: Optional[Path] = None
    budget_base: str = "prompt"  # "prompt": a budget is tokens on top of the prompt; "absolute"
    samples: int = 1
    settings: RunSettings = field(default_factory=RunSettings)
    passkey_tokens: int = 2048
    doc_tokens: int = 2048  # perplexity: tokens of each document
    step: Optional[int] = None  # perplexity: tokens per lockstep slice (default: the interval; 1 = token by token)
    plots: bool = True
    progress: Optional[Callable[[str], None]] = None
    shard: tuple[int, int] = (0, 1)  # (i, k): run only the items whose index % k == i
    report_only: bool = False  # summarise what the directory holds, run nothing
    summary_name: str = "summary"  # NAME.json, NAME.md; plots get a NAME- prefix unless the default
    turns: int = 12  # chat: GSM8K questions per conversation (see chat_task)

    def mine(self, items: list[Item]) -> list[Item]:
        i, k = self.shard
        return [it for j, it in enumerate(items) if j % k == i]


# --- files -------------------------------------------------------------------------------------


def _key(method: str, budget: Optional[int]) -> str:
    return method if budget is None else f"{method}@{budget}"


def read_jsonl(path: Path) -> list[dict]:
    """Finished records; a torn last line (the run was killed mid-write) is dropped and the file
    rewritten without it, so that appending goes on cleanly."""
    if not path.exists():
        return []
    rows, torn = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn = True
    if torn:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def _append(path: Path, record: dict) -> None:
    """One whole line per ``write`` on an O_APPEND file: shards of one run may share the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # regular files do not write short; a full disk does
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(run: QualityRun, model: Model) -> dict:
    s = run.settings
    return {
        "format": FORMAT,
        "task": run.task,
        "model": run.model_path.name,
        "model_bytes": run.model_path.stat().st_size,
        "budget_base": run.budget_base,
        "max_new": s.max_new,
        "interval": s.interval,
        "n_keep": s.n_keep,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "samples": run.samples,
        "replay": s.replay,
        "passkey_tokens": run.passkey_tokens if run.task == "passkey" else None,
        **({} if s.question_aware else {"question_aware": False}),
        **({} if s.aggregation == "mean" else {"aggregation": s.aggregation}),
        **({} if s.positions == "keep" else {"positions": s.positions}),
        **({"doc_tokens": run.doc_tokens} if run.task == "perplexity" else {}),
        **({"turns": run.turns} if run.task == "chat" else {}),
    }


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path} is not JSON; use another --out") from None
        diff = [k for k in manifest if old.get(k) != manifest[k]]
        if diff:
            k = diff[0]
            raise OptionError(
                f"{out} holds a run made with {k}={old.get(k)!r}, not {manifest[k]!r}; use another --out to keep both"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n")


# --- prompts and grading -------------------------------------------------------------------------


def prompt_tokens(model: Model, template: ChatTemplate, item: Item) -> list[int]:
    text = template.render(item.messages, add_generation_prompt=True)
    tokens = model.tokenize(text, add_special=False, parse_special=True)
    if model.add_bos and model.bos >= 0 and (not tokens or tokens[0] != model.bos):
        tokens = [model.bos] + tokens
    return tokens


def detokenize(model: Model, tokens: Sequence[int]) -> str:
    return b"".join(model.token_bytes(t) for t in tokens).decode("utf-8", "replace")


def grade_item(task: str, text: str, reference: str) -> tuple[Optional[str], bool]:
    if task == "passkey":
        found = re.findall(r"\d+", text.replace(",", ""))
        return (found[0] if found else None), reference in found[:1]
    return grade(task, text, reference)


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """``[gsm8k] 37/200 items  ams-tova@96  4.1 s/item  ETA 11m02s`` on stderr, redrawn in place on
    a terminal, one line per item otherwise (logs)."""

    def __init__(self, label: str, total: int, done: int, stream=sys.stderr, enabled: bool = True):
        self.label, self.total, self.done0, self.done = label, total, done, done
        self.t0 = time.perf_counter()
        self.stream, self.enabled = stream, enabled
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def show(self, what: str = "", finished: bool = False) -> None:
        if not self.enabled:
            return
        ran = self.done - self.done0
        rate = (time.perf_counter() - self.t0) / ran if ran else None
        left = self.total - self.done
        eta = "" if rate is None else f"  {rate:.1f} s/item  ETA {int(rate * left) // 60}m{int(rate * left) % 60:02d}s"
        width = 24
        bar = "#" * int(width * self.done / max(self.total, 1))
        line = f"[{self.label}] [{bar:<{width}}] {self.done}/{self.total} items{eta}  {what}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if finished else ""))
        elif what == "" and not finished:  # a log gets one line per finished item
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self) -> None:
        self.done += 1
        self.show()


# --- the run -------------------------------------------------------------------------------------


def _kv_budget(run: QualityRun, budget: int, n_prompt: int) -> int:
    kv = n_prompt + budget if run.budget_base == "prompt" else budget
    if kv <= N_SINK_KEEP_LAST:
        raise BudgetError(
            f"budget {budget} leaves {kv} cells; it must be more than {N_SINK_KEEP_LAST} "
            "(4 sink tokens + the 32 last tokens are always kept)"
        )
    return kv


def _record(
    run: QualityRun,
    model: Model,
    item: Item,
    method: Method,
    budget: Optional[int],
    kv_budget: Optional[int],
    n_prompt: int,
    gens: list[Generation],
) -> dict:
    preds = []
    for g in gens:
        text = detokenize(model, g.tokens)
        pred, ok = grade_item(run.task, text, item.reference)
        preds.append((text, pred, ok))
    g = gens[0]
    rec = {
        "id": item.id,
        "method": method.name,
        "budget": budget,
        "kv_budget": kv_budget,
        "prompt_tokens": n_prompt,
        "generated_tokens": len(g.tokens),
        "finish": g.finish,
        "text": preds[0][0],
        "pred": preds[0][1],
        "reference": item.reference,
        "correct": preds[0][2],
        "seconds": round(g.seconds, 3),
        "compressions": g.compressions,
        "evicted": g.evicted,
        "kv_peak": g.kv_peak,
        "replayed": g.replayed,
        "shared_with_full": g.shared_with_full,
        "wipeout": g.wipeout,
    }
    if item.depth is not None:
        rec["depth"] = item.depth
    if method.kind == "full" and run.settings.greedy:
        rec["tokens"] = g.tokens  # what every other method replays
    if len(gens) > 1:
        rec["samples"] = [
            {"pred": p, "correct": ok, "generated_tokens": len(x.tokens)} for (_, p, ok), x in zip(preds, gens)
        ]
        rec["pass_at_k"] = any(ok for _, _, ok in preds)
    return rec


def run_quality(run: QualityRun, model: Model) -> dict:
    """Run every (item, method, budget) not yet in ``run.out_dir``; returns the summary."""
    out = run.out_dir
    if run.report_only and not (out / "run.json").exists():
        raise InputError(f"{out} holds no benchmark run to report")
    if run.task == "chat":
        from .chat_task import check_chat_run, load_conversations

        check_chat_run(run)
    _check_manifest(out, _manifest(run, model))
    per_filler = len(model.tokenize(FILLER, add_special=False)) if run.task == "passkey" else 12.0
    if run.task == "chat":
        items = load_conversations(run.n, run.turns, run.data_dir)
    else:
        items = load_items(
            run.task,
            run.n,
            run.data_dir,
            passkey_tokens=run.passkey_tokens,
            tokens_per_filler=per_filler,
            doc_tokens=run.doc_tokens,
        )
    if not items:
        raise InputError(f"no {run.task} items to run")
    template = ChatTemplate.for_model(model)
    if run.report_only:
        pass
    elif run.task == "fidelity":
        _run_fidelity(run, model, items, template)
    elif run.task == "perplexity":
        _run_perplexity(run, model, items)
    elif run.task == "chat":
        from .chat_task import run_chat

        run_chat(run, model, items, template)
    else:
        _run_generation(run, model, items, template)
    summary = summarise(run, items)
    name = run.summary_name
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(summary))
    if run.plots:
        make_plots(out, summary, prefix="" if name == "summary" else f"{name}-")
    return summary


def _done_ids(out: Path, key: str) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(out / "items" / f"{key}.jsonl")}


def _run_generation(run: QualityRun, model: Model, items: list[Item], template: ChatTemplate) -> None:
    out, s = run.out_dir, run.settings
    full_m = Method("full", "full")
    compressing = [m for m in run.methods if m.compresses]
    want_full = any(m.kind == "full" for m in run.methods) or (s.replay and s.greedy and bool(compressing))
    done = {_key(m.name, b): _done_ids(out, _key(m.name, b)) for m in compressing for b in run.budgets}
    full_done = _done_ids(out, "full")
    mine = run.mine(items)
    todo = [it for it in mine if (want_full and it.id not in full_done) or any(it.id not in d for d in done.values())]
    prog = Progress(run.task, len(mine), len(mine) - len(todo), enabled=run.progress is not None)
    prog.show()
    for item in todo:
        tokens = prompt_tokens(model, template, item)
        full = None
        if want_full:
            if item.id in full_done:
                rec = full_done[item.id]
                full = Generation(rec.get("tokens", []), rec["finish"], rec["seconds"])
            else:
                prog.show("full")
                gens = [run_method(model, full_m, tokens, 0, s, sample=k) for k in range(run.samples)]
                rec = _record(run, model, item, full_m, None, None, len(tokens), gens)
                _append(out / "items" / "full.jsonl", rec)
                full = gens[0]
        for budget in run.budgets:
            kv = _kv_budget(run, budget, len(tokens))
            for m in compressing:
                key = _key(m.name, budget)
                if item.id in done[key]:
                    continue
                prog.show(key)
                map_path = out / "maps" / f"{key}.json"
                want_map = not map_path.exists()
                gens = [
                    run_method(
                        model,
                        m,
                        tokens,
                        kv,
                        s,
                        full=full if k == 0 else None,
                        keep_events=want_map and k == 0,
                        sample=k,
                    )
                    for k in range(run.samples)
                ]
                _append(out / "items" / f"{key}.jsonl", _record(run, model, item, m, budget, kv, len(tokens), gens))
                if want_map and gens[0].events:
                    map_path.parent.mkdir(parents=True, exist_ok=True)
                    map_path.write_text(
                        json.dumps(
                            {
                                "title": f"{m.name} @ budget {budget}, {item.id}",
                                "item": item.id,
                                "method": m.name,
                                "budget": budget,
                                "prompt_tokens": len(tokens),
                                "n_positions": len(tokens) + len(gens[0].tokens),
                                "events": gens[0].events,
                            }
                        )
                    )
        prog.step()
    prog.show(finished=True)


def _run_fidelity(run: QualityRun, model: Model, items: list[Item], template: ChatTemplate) -> None:
    out, s = run.out_dir, run.settings
    compressing = [m for m in run.methods if m.compresses]
    done = {_key(m.name, b): _done_ids(out, _key(m.name, b)) for m in compressing for b in run.budgets}
    mine = run.mine(items)
    todo = [it for it in mine if any(it.id not in d for d in done.values())]
    prog = Progress(run.task, len(mine), len(mine) - len(todo), enabled=run.progress is not None)
    prog.show()
    for item in todo:
        tokens = prompt_tokens(model, template, item)
        for budget in run.budgets:
            missing = [m for m in compressing if item.id not in done[_key(m.name, budget)]]
            if not missing:
                continue
            kv = _kv_budget(run, budget, len(tokens))
            prog.show(f"budget {budget}")
            t0 = time.perf_counter()
            res = fidelity(model, missing, tokens, kv, s)
            for m in missing:
                rec = {
                    "id": item.id,
                    "method": m.name,
                    "budget": budget,
                    "kv_budget": kv,
                    "prompt_tokens": len(tokens),
                    "seconds": round(time.perf_counter() - t0, 3),
                    **res[m.name],
                }
                _append(out / "items" / f"{_key(m.name, budget)}.jsonl", rec)
        prog.step()
    prog.show(finished=True)


def document_tokens(model: Model, item: Item, n: int) -> list[int]:
    """The first ``n`` tokens of a document (BOS first when the model adds one)."""
    tokens = model.tokenize(item.text or "", add_special=True)[:n]
    if len(tokens) < n:
        raise InputError(f"document {item.id} has only {len(tokens)} tokens, fewer than {n}")
    return tokens


def _run_perplexity(run: QualityRun, model: Model, items: list[Item]) -> None:
    out, s = run.out_dir, run.settings
    if not any(m.compresses for m in run.methods):
        raise OptionError("perplexity compares methods with the full cache: name at least one other method")
    measured = list(run.methods)  # "full" here is the noise floor, per budget (see runner.perplexity)
    done = {_key(m.name, b): _done_ids(out, _key(m.name, b)) for m in measured for b in run.budgets}
    for b in run.budgets:
        _kv_budget(run, b, 0)  # budgets are whole cells here; the same floor as every task
        if b + s.interval + 1 >= run.doc_tokens:
            raise BudgetError(
                f"budget {b} + interval {s.interval} leaves no token of a {run.doc_tokens}-token "
                "document after the first eviction; raise --doc-tokens"
            )
    mine = run.mine(items)
    todo = [it for it in mine if any(it.id not in d for d in done.values())]
    prog = Progress(run.task, len(mine), len(mine) - len(todo), enabled=run.progress is not None)
    prog.show()
    for item in todo:
        tokens = document_tokens(model, item, run.doc_tokens)
        for budget in run.budgets:
            missing = [m for m in measured if item.id not in done[_key(m.name, budget)]]
            if not missing:
                continue
            prog.show(f"budget {budget}")
            t0 = time.perf_counter()
            res = perplexity(model, missing, tokens, budget, s, step=run.step)
            for m in missing:
                rec = {
                    "id": item.id,
                    "kind": item.kind,
                    "source": item.reference,
                    "method": m.name,
                    "budget": budget,
                    "kv_budget": budget,
                    "doc_tokens": len(tokens),
                    "seconds": round(time.perf_counter() - t0, 3),
                    **res[m.name],
                }
                _append(out / "items" / f"{_key(m.name, budget)}.jsonl", rec)
        prog.step()
    prog.show(finished=True)


# --- summary -------------------------------------------------------------------------------------


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _wipeout(rows: list[dict]) -> Optional[dict]:
    w = [r["wipeout"] for r in rows if r.get("wipeout") and r["wipeout"]["events"]]
    if not w:
        return None
    events = sum(x["events"] for x in w)
    with_frac = [x for x in w if x["wiped_frac_mean"] is not None]
    return {
        "events": events,
        "wiped_frac_mean": (
            sum(x["wiped_frac_mean"] * x["events"] for x in with_frac) / sum(x["events"] for x in with_frac)
            if with_frac
            else None
        ),
        "events_with_wipeout_frac": (
            sum(x["events_with_wipeout"] for x in with_frac) / sum(x["events"] for x in with_frac)
            if with_frac
            else None
        ),
        "longest_run_mean": sum(x["longest_run_mean"] * x["events"] for x in w) / events,
        "longest_run_max": max(x["longest_run_max"] for x in w),
    }


def summarise(run: QualityRun, items: list[Item]) -> dict:
    """Per (method, budget), over the items that every listed (method, budget) has finished, so
    that every row is measured on the same questions."""
    if run.task == "chat":
        from .chat_task import summarise_chat

        return summarise_chat(run, items)
    out = run.out_dir
    keys: list[tuple[Method, Optional[int]]] = []
    if run.task != "perplexity" and (
        (out / "items" / "full.jsonl").exists() or any(m.kind == "full" for m in run.methods)
    ):
        keys.append((Method("full", "full"), None))
    keys += [(m, b) for b in run.budgets for m in run.methods if m.compresses or run.task == "perplexity"]
    rows = {_key(m.name, b): _done_ids(out, _key(m.name, b)) for m, b in keys}
    order = [it.id for it in items]
    common = [i for i in order if all(i in r for r in rows.values())]
    full_rows = rows.get("full", {})
    results = []
    for m, b in keys:
        rs = [rows[_key(m.name, b)][i] for i in common]
        res: dict = {"method": m.name, "budget": b, "n": len(rs)}
        if run.task == "fidelity":
            for k in ("kl", "top1", "first_divergence", "compressions"):
                res[k] = _mean([r[k] for r in rs])
            res["wipeout"] = _wipeout(rs)
        elif run.task == "perplexity":
            res.update(_pooled_perplexity(rs))
            res["wipeout"] = _wipeout(rs)
        else:
            res["correct"] = int(sum(r["correct"] for r in rs))
            res["accuracy"] = res["correct"] / len(rs) if rs else None
            if run.samples > 1:
                res["pass_at_k"] = _mean([float(r.get("pass_at_k", r["correct"])) for r in rs])
            compressed = [r for r in rs if r.get("compressions")]
            res["compressed_items"] = len(compressed)
            res["accuracy_compressed"] = _mean([float(r["correct"]) for r in compressed])
            if full_rows and m.kind != "full":
                res["full_accuracy_compressed"] = _mean([float(full_rows[r["id"]]["correct"]) for r in compressed])
                # far less noisy than accuracy: did the method reach the full cache's own answer?
                res["same_answer_as_full"] = _mean([float(r["pred"] == full_rows[r["id"]]["pred"]) for r in rs])
            res["generated_tokens"] = _mean([r["generated_tokens"] for r in rs])
            res["compressions"] = _mean([r["compressions"] for r in rs])
            res["seconds"] = _mean([r["seconds"] for r in rs])
            res["kv_peak_max"] = max((r["kv_peak"] for r in rs), default=None)
            res["wipeout"] = _wipeout(rs)
            if run.task == "passkey":
                depths = sorted({r["depth"] for r in rs})
                res["by_depth"] = {
                    f"{d:.2f}": _mean([float(r["correct"]) for r in rs if r["depth"] == d]) for d in depths
                }
        results.append(res)
    manifest = json.loads((out / "run.json").read_text())
    summary = {
        "task": run.task,
        "model": run.model_path.name,
        "budget_base": run.budget_base,
        "n_common": len(common),
        "settings": manifest,
        "results": results,
    }
    if run.task not in ("fidelity", "perplexity"):
        summary["ams_vs_topk"] = _paired(rows, common, keys)
    return summary


def _pooled_perplexity(rs: list[dict]) -> dict:
    """Pooled over documents (every scored token weighs the same): perplexity of the text under
    the method and under the full cache on the same tokens, their ratio, mean KL, top-1."""
    n = sum(r["tokens"] for r in rs)
    if not n:
        return {
            "tokens": 0,
            "ppl": None,
            "full_ppl": None,
            "ppl_ratio": None,
            "kl": None,
            "top1": None,
            "compressions": None,
        }
    ppl = float(np.exp(sum(r["nll"] for r in rs) / n))
    full = float(np.exp(sum(r["full_nll"] for r in rs) / n))
    return {
        "tokens": n,
        "ppl": ppl,
        "full_ppl": full,
        "ppl_ratio": ppl / full,
        "kl": sum(r["kl"] for r in rs) / n,
        "top1": sum(r["top1"] for r in rs) / n,
        "compressions": _mean([r["compressions"] for r in rs]),
    }


def _paired(
    rows: dict[str, dict[str, dict]], common: list[str], keys: list[tuple[Method, Optional[int]]]
) -> list[dict]:
    """Per scorer and budget, on the same items: correct under AMS only, under top-k only, both."""
    out = []
    for m, b in keys:
        twin = m.topk_twin
        if not m.ams or twin is None or _key(twin, b) not in rows:
            continue
        ams, topk = rows[_key(m.name, b)], rows[_key(twin, b)]
        a = [bool(ams[i]["correct"]) for i in common]
        t = [bool(topk[i]["correct"]) for i in common]
        out.append(
            {
                "scorer": m.scorer,
                "budget": b,
                "n": len(common),
                "ams_only": sum(x and not y for x, y in zip(a, t)),
                "topk_only": sum(y and not x for x, y in zip(a, t)),
                "both": sum(x and y for x, y in zip(a, t)),
            }
        )
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _wipe_cells(r: dict) -> str:
    """The three wipe-out columns of a row: wiped share, events with any, longest run mean/max."""
    w = r.get("wipeout") or {}
    if not w:
        return "– | – | –"
    return (
        f"{_fmt(w.get('wiped_frac_mean'))} | {_fmt(w.get('events_with_wipeout_frac'))} | "
        f"{_fmt(w.get('longest_run_mean'), '.1f')}/{w.get('longest_run_max', '–')}"
    )


def markdown(summary: dict) -> str:
    if summary["task"] == "chat":
        from .chat_task import markdown_chat

        return markdown_chat(summary)
    base = "over the prompt" if summary["budget_base"] == "prompt" else "KV cells"
    lines = [
        f"# {summary['task']} — {summary['model']}",
        "",
        f"{summary['n_common']} items common to every row; budget = {base} "
        f"(memory = budget + interval {summary['settings']['interval']}).",
        "",
    ]
    if summary["task"] == "perplexity":
        lines += [
            "Teacher-forced documents; counted: the tokens after the first eviction, pooled over documents.",
            "",
            "| method | budget | docs | tokens | perplexity | full cache | ratio | mean KL to full | top-1 agreement | "
            "events/doc | wiped segments | events with wipe-out | longest evicted run (mean/max) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["results"]:
            lines.append(
                f"| {r['method']} | {r['budget']} | {r['n']} | {r['tokens']} | {_fmt(r['ppl'], '.3f')} | "
                f"{_fmt(r['full_ppl'], '.3f')} | {_fmt(r['ppl_ratio'], '.4f')} | {_fmt(r['kl'], '.4f')} | "
                f"{_fmt(r['top1'])} | {_fmt(r['compressions'], '.1f')} | {_wipe_cells(r)} |"
            )
        return "\n".join(lines) + "\n"
    if summary["task"] == "fidelity":
        lines += [
            "| method | budget | n | mean KL to full | top-1 agreement | first divergence | events | "
            "wiped segments | events with wipe-out | longest evicted run (mean/max) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["results"]:
            lines.append(
                f"| {r['method']} | {r['budget']} | {r['n']} | {_fmt(r['kl'], '.4f')} | {_fmt(r['top1'])} | "
                f"{_fmt(r['first_divergence'], '.1f')} | {_fmt(r['compressions'], '.1f')} | {_wipe_cells(r)} |"
            )
        return "\n".join(lines) + "\n"
    lines += [
        "| method | budget | n | accuracy | same answer as full | compressed items | acc. on compressed (full) | "
        "events/item | wiped segments | events with wipe-out | longest evicted run (mean/max) | tokens | s/item |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        acc_c = (
            f"{_fmt(r['accuracy_compressed'])} ({_fmt(r.get('full_accuracy_compressed'))})"
            if r["method"] != "full"
            else "–"
        )
        acc = _fmt(r["accuracy"]) + (f" (pass@k {_fmt(r['pass_at_k'])})" if r.get("pass_at_k") is not None else "")
        lines.append(
            f"| {r['method']} | {r['budget'] if r['budget'] is not None else '–'} | {r['n']} | {acc} | "
            f"{_fmt(r.get('same_answer_as_full'))} | {r['compressed_items']} | {acc_c} | "
            f"{_fmt(r['compressions'], '.1f')} | {_wipe_cells(r)} | "
            f"{_fmt(r['generated_tokens'], '.0f')} | {_fmt(r['seconds'], '.1f')} |"
        )
    if summary.get("ams_vs_topk"):
        lines += [
            "",
            "AMS vs global top-k on the same items (correct under one selector only):",
            "",
            "| scorer | budget | n | AMS only | top-k only | both |",
            "|---|---|---|---|---|---|",
        ]
        for p in summary["ams_vs_topk"]:
            lines.append(
                f"| {p['scorer']} | {p['budget']} | {p['n']} | {p['ams_only']} | {p['topk_only']} | {p['both']} |"
            )
    if summary["task"] == "passkey":
        depths = sorted({d for r in summary["results"] for d in (r.get("by_depth") or {})})
        lines += [
            "",
            "Retrieval accuracy by depth of the key (0 = start of the filler):",
            "",
            "| method | budget | " + " | ".join(depths) + " |",
            "|---|---|" + "---|" * len(depths),
        ]
        for r in summary["results"]:
            bd = r.get("by_depth") or {}
            lines.append(
                f"| {r['method']} | {r['budget'] if r['budget'] is not None else '–'} | "
                + " | ".join(_fmt(bd.get(d), ".2f") for d in depths)
                + " |"
            )
    return "\n".join(lines) + "\n"


def make_plots(out: Path, summary: dict, prefix: str = "") -> list[Path]:
    from .plots import plot_accuracy, plot_eviction_map, plot_pairs

    made = []
    metric = "kl" if summary["task"] in ("fidelity", "perplexity") else "accuracy"
    budgets = {r["budget"] for r in summary["results"] if r["budget"] is not None}
    if len(budgets) > 1:
        made.append(plot_accuracy(summary, out / f"{prefix}{metric}.png", metric=metric))
    made.append(plot_pairs(summary, out / f"{prefix}{metric}-pairs.png", metric=metric))
    for path in sorted((out / "maps").glob("*.json")) if (out / "maps").exists() else []:
        made.append(plot_eviction_map(json.loads(path.read_text()), out / f"eviction-{path.stem}.png"))
    return made
