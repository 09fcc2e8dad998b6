"""``amslocal bench quality --task chat``: one long conversation under a budget.

What a user of ``amslocal chat --budget`` lives with. One :class:`~amslocal.chat.ChatSession` per
(conversation, method, budget) receives ``turns`` GSM8K questions as consecutive user messages,
each answered through the model's chat template with the math instruction
(:data:`~.tasks.MATH_INSTRUCTION`), and decoded greedily up to ``max_new`` tokens. The first
message opens with a personal fact ("Before we start: my name is Ada and my locker code is 7341.");
after the last question the session is asked for the code back (:data:`RECALL_QUESTION`), and the
recall is right when the code appears in the reply.

- Conversation ``k`` uses GSM8K rows ``k*turns .. k*turns + turns - 1`` (``-n``: conversations);
  the name and the 4-digit code come from a fixed seed and ``k`` (the same on every resume).
- Methods: ``full`` (no budget, a context that holds the whole conversation) and every session
  method (``S``, ``ams-S``, ``peak-S``, ``vote-S``: :attr:`Method.config` into the session's
  :class:`~amslocal.session.CompressionConfig`). ``context-shift`` is not a chat session: it is
  **refused** with an :class:`~amslocal.errors.OptionError` (the CLI drops it from its default
  method list for this task).
- Budgets are absolute KV cells (``budget_base`` must be ``absolute``); a session holds at most
  ``budget + interval`` cells, by construction, and its peak is recorded from llama.cpp's cell map.
- ``--n-keep N`` protects the conversation's start through the first ``N`` tokens of the first
  message (-1: all of it, the fact included), as ``amslocal chat --keep``.
- Every turn is decoded (no replay of the full cache's answer: the conversations part after the
  first compression and a per-turn replay would not save much); ``samples`` must be 1.

One JSONL record per (conversation, method, budget) in ``items/<method>@<budget>.jsonl``
(``items/full.jsonl``): per-turn correctness, the recall, prompt tokens fed, generated tokens,
compressions, evicted tokens, the KV peak and the seconds; resumable like the other tasks.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..backend import ContextParams, Model
from ..chat import ChatSession, ChatTemplate
from ..errors import BudgetError, InputError, OptionError
from ..session import CompressionConfig
from .answers import gsm8k_reference
from .methods import Method
from .runner import _sampler
from .tasks import FILES, MATH_INSTRUCTION, _read_jsonl, default_data_dir
from .wipeout import WipeoutRecorder

if TYPE_CHECKING:  # quality imports this module lazily; no import cycle at run time
    from .quality import QualityRun

CHAT_SEED = 20_250_601  # the facts of every conversation derive from it and the index
NAMES = (
    "Ada",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemal",
    "Lena",
    "Marek",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tomoko",
    "Ugo",
    "Vera",
    "Wanda",
    "Yusuf",
)
RECALL_QUESTION = "What is my locker code? Answer with the number only."
RECALL_MAX_TOKENS = 32  # the recall reply's length cap (a number, maybe a short sentence)


@dataclass
class Conversation:
    id: str  # chat-<k>
    questions: list[str]  # the user messages; the fact leads the first
    references: list[str]  # GSM8K's final numbers, one per question
    rows: list[int]  # the GSM8K rows asked
    name: str
    code: str  # 4 digits, never 0 first


# --- items ---------------------------------------------------------------------------------------


def personal_fact(k: int, avoid: Sequence[str] = ()) -> tuple[str, str]:
    """(name, 4-digit code) of conversation ``k``, from a fixed seed: the same on every run. The
    code is redrawn while it appears in one of ``avoid`` (the conversation's questions), so that a
    reply cannot get it right by copying a number from a question."""
    rng = random.Random(CHAT_SEED + k)
    name = rng.choice(NAMES)
    code = str(rng.randint(1000, 9999))
    while any(code in a for a in avoid):
        code = str(rng.randint(1000, 9999))
    return name, code


def fact_sentence(name: str, code: str) -> str:
    return f"Before we start: my name is {name} and my locker code is {code}. "


def recall_correct(text: str, code: str) -> bool:
    """Whether ``code`` appears in ``text`` as a whole number ("7341", "7,341", "7 3 4 1" count;
    "17341" does not)."""
    joined = re.sub(r"(?<=\d)[\s,.\-](?=\d)", "", text)
    return re.search(rf"(?<!\d){re.escape(code)}(?!\d)", joined) is not None


def load_conversations(n: Optional[int], turns: int, data_dir: Optional[Path] = None) -> list[Conversation]:
    """The first ``n`` whole conversations of ``turns`` GSM8K questions each (all there are when
    ``n`` is None)."""
    if turns < 1:
        raise OptionError(f"a conversation needs at least one turn (got {turns})")
    rows = _read_jsonl(Path(data_dir or default_data_dir()) / FILES["gsm8k"])
    count = len(rows) // turns if n is None else min(n, len(rows) // turns)
    out = []
    try:
        for k in range(count):
            chunk = rows[k * turns : (k + 1) * turns]
            qs = [f"{r['question'].strip()}\n{MATH_INSTRUCTION}" for r in chunk]
            name, code = personal_fact(k, qs)
            qs[0] = fact_sentence(name, code) + qs[0]
            out.append(
                Conversation(
                    f"chat-{k}",
                    qs,
                    [gsm8k_reference(r["answer"]) for r in chunk],
                    list(range(k * turns, (k + 1) * turns)),
                    name,
                    code,
                )
            )
    except KeyError as exc:
        raise InputError(f"gsm8k data lacks the field {exc}") from None
    return out


# --- checks --------------------------------------------------------------------------------------


def check_chat_run(run: "QualityRun") -> None:
    """Refuse what a chat run cannot do, before anything is written."""
    from .quality import N_SINK_KEEP_LAST

    shift = [m.name for m in run.methods if m.kind == "context-shift"]
    if shift:
        raise OptionError("context-shift is not a chat session; leave it out of --methods for --task chat")
    if run.budget_base != "absolute":
        raise OptionError("chat budgets are whole KV cells: use --budget-base absolute")
    if run.samples != 1:
        raise OptionError("chat runs one conversation per method and budget: --samples must be 1")
    if run.turns < 1:
        raise OptionError(f"--turns must be at least 1 (got {run.turns})")
    if any(m.compresses for m in run.methods):
        for b in run.budgets:
            if b <= N_SINK_KEEP_LAST:
                raise BudgetError(
                    f"budget {b} must be more than {N_SINK_KEEP_LAST} cells "
                    "(4 sink tokens + the 32 last tokens are always kept)"
                )


# --- one conversation ----------------------------------------------------------------------------


def _full_context(model: Model, template: ChatTemplate, conv: Conversation, max_new: int) -> int:
    """Cells a full cache needs for the whole conversation: its messages with empty replies, plus
    every reply at its longest and the end-of-turn tokens."""
    msgs: list[dict] = []
    for q in conv.questions:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]
    msgs.append({"role": "user", "content": RECALL_QUESTION})
    n = len(model.tokenize(template.render(msgs, add_generation_prompt=True), add_special=True, parse_special=True))
    need = n + len(conv.questions) * (max_new + 8) + RECALL_MAX_TOKENS + 64
    if need > model.n_ctx_train:
        raise BudgetError(
            f"a {len(conv.questions)}-turn conversation needs up to {need} cells, more than the model's "
            f"trained context ({model.n_ctx_train}); use fewer --turns or --max-tokens"
        )
    return need


def _hook(chat: ChatSession, recorders: list[WipeoutRecorder]) -> None:
    """Record the wipe-out metric of every event of the session under ``chat`` (a new one after a
    refeed gets a recorder of its own). Top-k sessions observe the mass only for this diagnostic;
    it never changes a choice."""
    s = chat.session
    if s.on_compress is not None or s.config.budget is None:
        return
    rec = WipeoutRecorder(window=s.mass_window, group=s.group)
    s.on_compress = rec
    recorders.append(rec)


def _wipeout_summary(recorders: list[WipeoutRecorder]) -> Optional[dict]:
    if not recorders:
        return None
    if len(recorders) == 1:
        return recorders[0].summary()
    merged = WipeoutRecorder(window=recorders[0].window, group=recorders[0].group)
    for r in recorders:
        merged.wiped_frac += r.wiped_frac
        merged.longest_run += r.longest_run
    return merged.summary()


def run_conversation(
    model: Model, template: ChatTemplate, conv: Conversation, method: Method, budget: Optional[int], run: "QualityRun"
) -> dict:
    """Hold the whole conversation under ``method`` and ``budget``; returns its JSONL record."""
    from .quality import grade_item

    s = run.settings
    if method.kind == "full":
        n_ctx = _full_context(model, template, conv, s.max_new)
        cfg = CompressionConfig(budget=None)
        ctx = ContextParams(n_ctx=n_ctx, n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx), n_threads=s.n_threads)
    elif method.kind == "session":
        cfg = CompressionConfig(budget=budget, **s.session_fields(method))
        ctx = ContextParams(n_threads=s.n_threads)
    else:
        raise OptionError(f"{method.name} is not a chat session; leave it out of --methods for --task chat")
    t0 = time.perf_counter()
    # --n-keep: the first message's first tokens are never evicted (ChatSession's keep, llama.cpp's --keep)
    keep = s.n_keep if method.kind == "session" else 0
    chat = ChatSession(
        model, cfg, ctx, _sampler(s, 0), template=template, max_tokens=s.max_new, keep=keep, observe_attention=True
    )
    recorders: list[WipeoutRecorder] = []
    turns = []
    try:
        for i, (q, ref) in enumerate(zip(conv.questions, conv.references)):
            _hook(chat, recorders)
            text = chat.chat(q, stream=False, max_tokens=s.max_new)
            pred, ok = grade_item("gsm8k", text, ref)
            t = chat.last_turn
            st = chat.stats
            turns.append(
                {
                    "row": conv.rows[i],
                    "reference": ref,
                    "pred": pred,
                    "correct": bool(ok),
                    "text": text,
                    "prompt_tokens": t.prompt_tokens,
                    "generated_tokens": t.reply_tokens,
                    "stop": t.stop,
                    "compressions": st.compressions,
                    "kv_cells": chat.cells_used,
                }
            )
        _hook(chat, recorders)
        recall_text = chat.chat(RECALL_QUESTION, stream=False, max_tokens=RECALL_MAX_TOKENS)
        rt = chat.last_turn
        st = chat.stats
        first = next((i for i, t in enumerate(turns) if t["compressions"] > 0), None)
        if first is None and st.compressions > 0:
            first = len(turns)  # the recall turn
        return {
            "id": conv.id,
            "method": method.name,
            "budget": budget,
            "kv_budget": budget,
            "kv_capacity": cfg.capacity,
            "name": conv.name,
            "code": conv.code,
            "turns": turns,
            "n_turns": len(turns),
            "correct_turns": sum(t["correct"] for t in turns),
            "recall": {
                "text": recall_text,
                "correct": recall_correct(recall_text, conv.code),
                "prompt_tokens": rt.prompt_tokens,
                "generated_tokens": rt.reply_tokens,
                "stop": rt.stop,
                "compressions": st.compressions,
                "kv_cells": chat.cells_used,
            },
            "recall_correct": recall_correct(recall_text, conv.code),
            "first_compressed_turn": first,
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns) + rt.prompt_tokens,
            "generated_tokens": sum(t["generated_tokens"] for t in turns) + rt.reply_tokens,
            "compressions": st.compressions,
            "evicted": st.evicted_tokens,
            "kv_peak": st.kv_cells_peak,
            "refeeds": chat.refeeds,
            "seconds": round(time.perf_counter() - t0, 3),
            "wipeout": _wipeout_summary(recorders),
        }
    finally:
        chat.close()


# --- the run -------------------------------------------------------------------------------------


def run_chat(run: "QualityRun", model: Model, items: list[Conversation], template: ChatTemplate) -> None:
    """Every (conversation, method, budget) not yet in ``run.out_dir``, appended as it finishes."""
    from .quality import Progress, _append, _done_ids, _key

    out = run.out_dir
    keys = [(m, None) for m in run.methods if m.kind == "full"]
    keys += [(m, b) for b in run.budgets for m in run.methods if m.kind == "session"]
    done = {_key(m.name, b): _done_ids(out, _key(m.name, b)) for m, b in keys}
    mine = run.mine(items)
    todo = [c for c in mine if any(c.id not in d for d in done.values())]
    prog = Progress(run.task, len(mine), len(mine) - len(todo), enabled=run.progress is not None)
    prog.show()
    for conv in todo:
        for m, b in keys:
            key = _key(m.name, b)
            if conv.id in done[key]:
                continue
            prog.show(key)
            _append(out / "items" / f"{key}.jsonl", run_conversation(model, template, conv, m, b, run))
        prog.step()
    prog.show(finished=True)


# --- summary -------------------------------------------------------------------------------------


def summarise_chat(run: "QualityRun", items: list[Conversation]) -> dict:
    """Per (method, budget), over the conversations every listed (method, budget) finished: turn
    accuracy, recall, accuracy on the turns after the first compression next to the full cache's
    on the same turns, compressions, KV peak."""
    import json

    from .quality import _done_ids, _key, _mean, _wipeout

    out = run.out_dir
    keys: list[tuple[Method, Optional[int]]] = []
    if (out / "items" / "full.jsonl").exists() or any(m.kind == "full" for m in run.methods):
        keys.append((Method("full", "full"), None))
    keys += [(m, b) for b in run.budgets for m in run.methods if m.kind == "session"]
    rows = {_key(m.name, b): _done_ids(out, _key(m.name, b)) for m, b in keys}
    common = [c.id for c in items if all(c.id in r for r in rows.values())]
    full_rows = rows.get("full", {})
    results = []
    for m, b in keys:
        rs = [rows[_key(m.name, b)][i] for i in common]
        turns = [t for r in rs for t in r["turns"]]
        res: dict = {
            "method": m.name,
            "budget": b,
            "n": len(rs),
            "turns": len(turns),
            "correct_turns": int(sum(t["correct"] for t in turns)),
        }
        res["accuracy"] = res["correct_turns"] / len(turns) if turns else None  # turn accuracy (plots read it)
        res["recall"] = _mean([float(r["recall_correct"]) for r in rs])
        # the turns that ended with the cache compressed at least once, and the full cache on them
        pairs = [(r["id"], j, t) for r in rs for j, t in enumerate(r["turns"]) if t["compressions"] > 0]
        res["compressed_turns"] = len(pairs)
        res["accuracy_compressed"] = _mean([float(t["correct"]) for _, _, t in pairs])
        if full_rows and m.kind != "full":
            res["full_accuracy_compressed"] = _mean(
                [float(full_rows[i]["turns"][j]["correct"]) for i, j, _ in pairs if j < len(full_rows[i]["turns"])]
            )
            res["full_recall"] = _mean([float(full_rows[r["id"]]["recall_correct"]) for r in rs])
            res["same_answer_as_full"] = _mean(
                [
                    float(t["pred"] == full_rows[r["id"]]["turns"][j]["pred"])
                    for r in rs
                    for j, t in enumerate(r["turns"])
                    if j < len(full_rows[r["id"]]["turns"])
                ]
            )
        res["compressions"] = _mean([r["compressions"] for r in rs])
        res["evicted"] = _mean([r["evicted"] for r in rs])
        res["kv_peak_max"] = max((r["kv_peak"] for r in rs), default=None)
        res["kv_capacity"] = None if b is None else b + run.settings.interval
        res["prompt_tokens"] = _mean([r["prompt_tokens"] for r in rs])
        res["generated_tokens"] = _mean([r["generated_tokens"] for r in rs])
        res["seconds"] = _mean([r["seconds"] for r in rs])
        res["wipeout"] = _wipeout(rs)
        results.append(res)
    manifest = json.loads((out / "run.json").read_text())
    return {
        "task": run.task,
        "model": run.model_path.name,
        "budget_base": run.budget_base,
        "n_common": len(common),
        "turns": run.turns,
        "settings": manifest,
        "results": results,
    }


def markdown_chat(summary: dict) -> str:
    from .quality import _fmt, _wipe_cells

    s = summary["settings"]
    lines = [
        f"# {summary['task']} — {summary['model']}",
        "",
        f"{summary['n_common']} conversations common to every row, {summary['turns']} GSM8K questions each, "
        f"then a recall of a fact from the first message; budget = KV cells (memory = budget + interval "
        f"{s['interval']}); replies up to {s['max_new']} tokens.",
        "",
        "| method | budget | KV peak / cap | conv. | turn accuracy | recall | compressed turns | "
        "acc. after first compression (full) | same answer as full | events/conv. | wiped segments | "
        "events with wipe-out | longest evicted run (mean/max) | tokens fed/conv. | generated/conv. | s/conv. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        full = r["method"] == "full"
        cap = "–" if r["kv_capacity"] is None else r["kv_capacity"]
        acc = f"{_fmt(r['accuracy'])} ({r['correct_turns']}/{r['turns']})"
        rec = _fmt(r["recall"]) + ("" if full or r.get("full_recall") is None else f" ({_fmt(r['full_recall'])})")
        acc_c = "–" if full else f"{_fmt(r['accuracy_compressed'])} ({_fmt(r.get('full_accuracy_compressed'))})"
        lines.append(
            f"| {r['method']} | {r['budget'] if r['budget'] is not None else '–'} | {r['kv_peak_max']} / {cap} | "
            f"{r['n']} | {acc} | {rec} | {r['compressed_turns']} | {acc_c} | {_fmt(r.get('same_answer_as_full'))} | "
            f"{_fmt(r['compressions'], '.1f')} | {_wipe_cells(r)} | {_fmt(r['prompt_tokens'], '.0f')} | "
            f"{_fmt(r['generated_tokens'], '.0f')} | {_fmt(r['seconds'], '.1f')} |"
        )
    lines += [
        "",
        "recall: the code from the first message found in the answer to the last "
        "(in brackets: the full cache on the same conversations).",
    ]
    return "\n".join(lines) + "\n"
