"""`amslocal bench quality --task chat`: one conversation of GSM8K turns per method and budget, with
a fact from the first message recalled at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs_model
from test_bench_quality import _lines
from test_cli_errors import DEFAULT_MODEL, assert_one_line_error, run_cli

from amslocal.bench.chat_task import fact_sentence, load_conversations, personal_fact, recall_correct
from amslocal.bench.tasks import MATH_INSTRUCTION

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k_test.jsonl").exists(), reason=f"benchmark data missing at {DATA}")


# --- facts, recall, conversations ------------------------------------------------------------------


def test_personal_fact_is_deterministic_and_varies_per_conversation():
    facts = [personal_fact(k) for k in range(20)]
    assert facts == [personal_fact(k) for k in range(20)]  # the same on every run and resume
    assert len({code for _, code in facts}) >= 15 and len({name for name, _ in facts}) >= 5
    for name, code in facts:
        assert name.isalpha() and len(code) == 4 and code.isdigit() and code[0] != "0"
    name, code = facts[3]
    # a code that appears in one of the conversation's questions is drawn again, deterministically
    other = personal_fact(3, [f"A locker holds {code} apples."])
    assert other[0] == name and other[1] != code and other == personal_fact(3, [f"A locker holds {code} apples."])
    assert fact_sentence("Ada", "7341") == "Before we start: my name is Ada and my locker code is 7341. "


@pytest.mark.parametrize(
    "text, ok",
    [
        ("7341", True),
        ("Your locker code is 7341.", True),
        ("**7,341**", True),
        ("7 3 4 1", True),
        ("The code: 7341\n", True),
        ("17341", False),
        ("73410", False),
        ("7342", False),
        ("", False),
        ("I don't know your locker code.", False),
    ],
)
def test_recall_grading(text, ok):
    assert recall_correct(text, "7341") is ok


def test_conversations_take_consecutive_rows(tmp_path):
    rows = [
        {"question": f"Q{i}: Tom has {i} apples and buys 2 more. How many?", "answer": f"x\n#### {i + 2}"}
        for i in range(7)
    ]
    (tmp_path / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs = load_conversations(10, 2, tmp_path)  # only whole conversations: 7 rows make 3
    assert [c.id for c in convs] == ["chat-0", "chat-1", "chat-2"]
    assert [c.rows for c in convs] == [[0, 1], [2, 3], [4, 5]]
    assert [c.references for c in convs] == [["2", "3"], ["4", "5"], ["6", "7"]]
    for k, c in enumerate(convs):
        assert (c.name, c.code) == personal_fact(
            k, [f"{r['question']}\n{MATH_INSTRUCTION}" for r in rows[2 * k : 2 * k + 2]]
        )
        assert (
            c.questions[0] == fact_sentence(c.name, c.code) + f"Q{2 * k}: Tom has {2 * k} apples and buys 2 more. "
            f"How many?\n{MATH_INSTRUCTION}"
        )
        assert "locker" not in c.questions[1] and c.questions[1].endswith(MATH_INSTRUCTION)
    assert load_conversations(1, 2, tmp_path)[0] == convs[0]


# --- a whole run on the default model --------------------------------------------------------------


@needs_model
@needs_data
def test_chat_run_end_to_end(tmp_path):
    out = tmp_path / "chat"
    args = [
        "bench",
        "quality",
        "--task",
        "chat",
        "--model",
        str(DEFAULT_MODEL),
        "--budgets",
        "64",
        "--interval",
        "16",
        "--methods",
        "full,tova,ams-tova",
        "--turns",
        "2",
        "--max-tokens",
        "8",
        "-n",
        "1",
        "--out",
        str(out),
        "-q",
        "-t",
        "1",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (out / "items").iterdir()} == {"full.jsonl", "tova@64.jsonl", "ams-tova@64.jsonl"}
    recs = {}
    for name in ("full", "tova@64", "ams-tova@64"):
        rows = _lines(out / "items" / f"{name}.jsonl")
        assert len(rows) == 1 and rows[0]["id"] == "chat-0"
        r = recs[name] = rows[0]
        assert len(r["turns"]) == r["n_turns"] == 2 and [t["row"] for t in r["turns"]] == [0, 1]
        assert [t["reference"] for t in r["turns"]] == ["18", "3"]
        for t in r["turns"]:
            assert isinstance(t["correct"], bool) and isinstance(t["text"], str)
            assert t["prompt_tokens"] > 0 and 0 < t["generated_tokens"] <= 8
        assert r["correct_turns"] == sum(t["correct"] for t in r["turns"])
        assert isinstance(r["recall_correct"], bool) and r["recall"]["correct"] == r["recall_correct"]
        assert r["recall_correct"] == recall_correct(r["recall"]["text"], r["code"])
        # every message was fed exactly once (no refeed), the same for every method
        assert r["refeeds"] == 0
        assert r["prompt_tokens"] == sum(t["prompt_tokens"] for t in r["turns"]) + r["recall"]["prompt_tokens"]
        assert r["seconds"] > 0
    assert len({r["prompt_tokens"] for r in recs.values()}) == 1
    assert len({(r["name"], r["code"]) for r in recs.values()}) == 1
    full = recs["full"]
    assert full["compressions"] == 0 and full["evicted"] == 0 and full["first_compressed_turn"] is None
    assert full["kv_peak"] > 64 + 16  # the conversation does not fit the budget: the others must compress
    for name in ("tova@64", "ams-tova@64"):
        r = recs[name]
        assert r["compressions"] > 0 and r["evicted"] > 0 and r["first_compressed_turn"] == 0
        assert r["kv_peak"] <= 64 + 16 and all(t["kv_cells"] <= 64 + 16 for t in r["turns"])
        counts = [t["compressions"] for t in r["turns"]] + [r["recall"]["compressions"]]
        assert counts == sorted(counts) and counts[-1] == r["compressions"]
        assert r["wipeout"]["events"] == r["compressions"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "chat" and summary["n_common"] == 1 and summary["turns"] == 2
    rows = {(r["method"], r["budget"]): r for r in summary["results"]}
    assert set(rows) == {("full", None), ("tova", 64), ("ams-tova", 64)}
    for (m, _), r in rows.items():
        assert r["turns"] == 2 and 0 <= r["accuracy"] <= 1 and r["recall"] in (0.0, 1.0)
    assert rows[("tova", 64)]["compressed_turns"] == 2 and rows[("tova", 64)]["kv_peak_max"] <= 80
    assert rows[("tova", 64)]["full_accuracy_compressed"] == full["correct_turns"] / 2
    md = (out / "summary.md").read_text()
    assert md.startswith("# chat") and md == proc.stdout
    for row in ("| full | – |", "| tova | 64 | ", "| ams-tova | 64 | "):
        assert row in md
    assert "| tova | 64 | " + f"{recs['tova@64']['kv_peak']} / 80 |" in md

    # a re-run finds everything done and runs nothing
    before = {n: (out / "items" / n).read_text() for n in ("full.jsonl", "tova@64.jsonl", "ams-tova@64.jsonl")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert {n: (out / "items" / n).read_text() for n in before} == before
    changed = run_cli(*[a if a != "2" else "3" for a in args])
    assert_one_line_error(changed, "turns=2")


@needs_model
def test_chat_refuses_context_shift(tmp_path):
    out = tmp_path / "x"
    proc = run_cli(
        "bench",
        "quality",
        "--task",
        "chat",
        "--model",
        str(DEFAULT_MODEL),
        "--methods",
        "full,context-shift",
        "-n",
        "1",
        "--out",
        str(out),
        "-q",
    )
    assert_one_line_error(proc, "context-shift is not a chat session")
    assert not out.exists()  # refused before anything was written
