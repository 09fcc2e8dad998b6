"""`amslocal bench quality`: methods, context shift, the wipe-out metric, replay, and whole runs
(JSONL, summary, plots, resume) on the default model with a handful of items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_model
from test_cli_errors import DEFAULT_MODEL, assert_one_line_error, run_cli

from amslocal.bench.methods import parse_method, parse_methods
from amslocal.bench.tasks import load_items, passkey_items
from amslocal.bench.wipeout import longest_false_run, wiped_segments
from amslocal.errors import OptionError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k_test.jsonl").exists(), reason=f"benchmark data missing at {DATA}")


# --- methods, metric, items -----------------------------------------------------------------------


def test_methods_parse_and_pair():
    m = parse_method("ams-tova")
    assert (m.kind, m.scorer, m.ams, m.topk_twin) == ("session", "tova", True, "tova")
    assert parse_method("expected-attention").topk_twin == "ams-expected-attention"
    assert parse_method("context-shift").kind == "context-shift" and not parse_method("full").compresses
    everything = parse_methods("all")
    assert len(everything) == 2 + 2 * 8 and len({m.name for m in everything}) == len(everything)
    assert [m.name for m in parse_methods("tova, ams-tova,tova")] == ["tova", "ams-tova"]
    with pytest.raises(OptionError, match="unknown method 'tovaa'"):
        parse_methods("tovaa")


def _longest_false_run_ref(mask) -> int:
    best = cur = 0
    for x in mask:
        cur = 0 if x else cur + 1
        best = max(best, cur)
    return best


def test_longest_evicted_run_matches_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random(rng.integers(0, 40)) < rng.random()
        assert longest_false_run(mask) == _longest_false_run_ref(mask)


def test_wiped_segments_counts_segments_with_nothing_kept():
    kept = np.array([1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    assert wiped_segments(np.array([0, 2, 5, 8]), kept) == (1, 3)  # [2, 5) lost everything
    assert wiped_segments(np.array([0, 8]), kept) == (0, 1)
    assert wiped_segments(np.array([0, 3, 8]), ~kept) == (0, 2)


def test_passkey_items_hide_the_key_at_the_asked_depth():
    items = passkey_items(2, 600, (0.1, 0.9), tokens_per_filler=20)
    assert [it.depth for it in items] == [0.1, 0.1, 0.9, 0.9]
    assert items == passkey_items(2, 600, (0.1, 0.9), tokens_per_filler=20)  # same questions on a resume
    for it in items:
        text = it.messages[0]["content"]
        at = text.index(f"The pass key is {it.reference}") / len(text)
        assert abs(at - it.depth) < 0.1


@needs_data
def test_gsm8k_items_carry_the_reference_number():
    items = load_items("gsm8k", 3, DATA)
    assert [it.reference for it in items] == ["18", "3", "70000"]
    assert "\\boxed{}" in items[0].messages[0]["content"]


# --- the runner on the default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt(smollm2_model):
    return smollm2_model.tokenize("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:")


@pytest.fixture(scope="module")
def story(smollm2_model):
    return smollm2_model.tokenize(
        "Once upon a time, in a lighthouse on a rocky coast, there lived an old keeper named Tom. Every night"
    )


def test_context_shift_keeps_n_keep_and_the_newer_half(tiny_model):
    from amslocal.bench.context_shift import ContextShiftSession

    cs = ContextShiftSession(tiny_model, n_ctx=40, n_keep=5)
    tokens = [int(t) % 200 + 10 for t in range(70)]
    cs.feed(tokens[:40])
    assert cs.shifts == 0 and cs.n_occupied == 40
    cs.feed(tokens[40:41])  # full: discard half of the 40 - n_keep tokens, then add one
    keep = cs.n_keep
    n_discard = (40 - keep) // 2
    pos, toks = cs.gen.kept_tokens()
    assert pos == list(range(40 - n_discard + 1))  # positions dense again
    assert toks == tokens[:keep] + tokens[keep + n_discard : 41]
    cs.feed(tokens[41:])
    assert cs.n_occupied <= 40 and cs.gen.kept_tokens()[1][-1] == tokens[-1]


def test_memory_that_never_fills_gives_the_full_answer(smollm2_model, prompt):
    from amslocal.bench.runner import RunSettings, run_full, run_method

    settings = RunSettings(max_new=24, interval=16, replay=False)
    full = run_full(smollm2_model, prompt, settings)
    roomy = run_method(smollm2_model, parse_method("ams-tova"), prompt, len(prompt) + 64, settings)
    assert roomy.compressions == 0 and roomy.tokens == full.tokens
    shared = run_method(
        smollm2_model,
        parse_method("ams-tova"),
        prompt,
        len(prompt) + 64,
        RunSettings(max_new=24, interval=16),
        full=full,
    )
    assert shared.shared_with_full and shared.tokens == full.tokens


def test_every_method_follows_the_full_answer_until_its_memory_fills(smollm2_model, story):
    """What replay relies on: the full cache's greedy tokens are every method's tokens up to the
    first eviction, whatever the context size."""
    from amslocal.bench.runner import RunSettings, run_full, run_method

    settings = RunSettings(max_new=80, interval=8, replay=False)
    full = run_full(smollm2_model, story, RunSettings(max_new=80, replay=False))
    kv_budget = len(story) + 24
    before_first_event = kv_budget + settings.interval - len(story)
    for name in ("context-shift", "streaming", "ams-tova", "h2o"):
        out = run_method(smollm2_model, parse_method(name), story, kv_budget, settings)
        assert out.compressions > 0
        assert out.tokens[:before_first_event] == full.tokens[:before_first_event], name
        replayed = run_method(
            smollm2_model, parse_method(name), story, kv_budget, RunSettings(max_new=80, interval=8), full=full
        )
        assert replayed.replayed == before_first_event and replayed.compressions > 0
        assert replayed.tokens[:before_first_event] == full.tokens[:before_first_event]


def test_session_wipeout_is_recorded_per_event(smollm2_model, story):
    from amslocal.bench.runner import RunSettings, run_method

    out = run_method(
        smollm2_model,
        parse_method("streaming"),
        story,
        len(story) + 24,
        RunSettings(max_new=64, interval=8, replay=False),
        keep_events=True,
    )
    w = out.wipeout
    assert w["events"] == out.compressions == len(out.events) > 0
    # StreamingLLM evicts the oldest unprotected tokens: one contiguous run of interval tokens
    assert w["longest_run_max"] == 8 and 0.0 <= w["wiped_frac_mean"] <= 1.0
    ev = out.events[0]
    assert sum(ev["kept"]) == len(story) + 24 and ev["bounds"][0] == 0 and ev["bounds"][-1] == len(ev["positions"])
    assert abs(sum(ev["mass"]) - 1.0) < 1e-3


# --- whole runs through the command line ------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@needs_model
@needs_data
def test_bench_run_writes_results_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [
        "bench",
        "quality",
        "--task",
        "gsm8k",
        "--model",
        str(DEFAULT_MODEL),
        "--budgets",
        "16",
        "--interval",
        "8",
        "--methods",
        "full,context-shift,tova,ams-tova",
        "--max-tokens",
        "48",
        "--out",
        str(out),
        "-q",
        "-t",
        "2",
    ]
    first = run_cli(*args, "--n", "3")
    assert first.returncode == 0, first.stderr
    names = {p.name for p in (out / "items").iterdir()}
    assert names == {"full.jsonl", "context-shift@16.jsonl", "tova@16.jsonl", "ams-tova@16.jsonl"}
    for name in names:
        rows = _lines(out / "items" / name)
        assert [r["id"] for r in rows] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
        assert all(isinstance(r["correct"], bool) and r["reference"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_common"] == 3 and {r["method"] for r in summary["results"]} == {
        "full",
        "context-shift",
        "tova",
        "ams-tova",
    }
    assert all(r["n"] == 3 for r in summary["results"])
    assert (out / "summary.md").read_text().startswith("# gsm8k")
    assert "| ams-tova | 16 | 3 |" in first.stdout
    # one budget: no accuracy-vs-budget line, but the top-k vs AMS bars
    assert not (out / "accuracy.png").exists()
    assert (out / "accuracy-pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "eviction-ams-tova@16.png").exists() and (out / "maps" / "ams-tova@16.json").exists()

    # an interrupted run: one torn line at the end of a file; the item must be redone, nothing else
    before = {n: _lines(out / "items" / n) for n in names}
    tova = out / "items" / "tova@16.jsonl"
    text = tova.read_text()
    tova.write_text(text[: text.rindex("{") + 20])
    second = run_cli(*args, "--n", "4")
    assert second.returncode == 0, second.stderr
    for name in names:
        rows = _lines(out / "items" / name)
        assert [r["id"] for r in rows][:2] == ["gsm8k-0", "gsm8k-1"] and len(rows) == 4
        assert sorted(r["id"] for r in rows) == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"]
        # finished items are read back, not run again (their timings would differ)
        kept = before[name] if name != "tova@16.jsonl" else before[name][:2]
        assert rows[: len(kept)] == kept
    assert json.loads((out / "summary.json").read_text())["n_common"] == 4

    # a second report of a subset of the directory, next to the first, running nothing
    main_summary = (out / "summary.json").read_text()
    subset = run_cli(
        *[a if a != "full,context-shift,tova,ams-tova" else "full,tova,ams-tova" for a in args],
        "--n",
        "2",
        "--report-only",
        "--summary-name",
        "summary-tova",
    )
    assert subset.returncode == 0, subset.stderr
    sub = json.loads((out / "summary-tova.json").read_text())
    assert sub["n_common"] == 2 and {r["method"] for r in sub["results"]} == {"full", "tova", "ams-tova"}
    assert (out / "summary-tova.md").exists() and (out / "summary-tova-accuracy-pairs.png").exists()
    assert (out / "summary.json").read_text() == main_summary
    assert all(len(_lines(out / "items" / n)) == 4 for n in names)

    changed = run_cli(*args, "--n", "4", "--max-tokens", "64")
    assert_one_line_error(changed, "max_new=48")


@needs_model
@needs_data
def test_bench_fidelity_run(tmp_path):
    out = tmp_path / "fid"
    proc = run_cli(
        "bench",
        "quality",
        "--task",
        "fidelity",
        "--model",
        str(DEFAULT_MODEL),
        "--budgets",
        "16",
        "--interval",
        "8",
        "--methods",
        "full,streaming,ams-tova",
        "--max-tokens",
        "40",
        "--n",
        "1",
        "--out",
        str(out),
        "-q",
        "--no-plots",
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["results"]}
    for r in rows.values():
        assert r["kl"] >= 0 and 0 <= r["top1"] <= 1 and r["compressions"] > 0
        assert 0 <= r["first_divergence"] <= 40

    # aggregation and positions are settings of the whole run: recorded, and they change the numbers
    args = [a if a != str(out) else str(tmp_path / "fid2") for a in proc.args[3:]]
    assert_one_line_error(run_cli(*proc.args[3:], "--aggregation", "rank"), "aggregation")
    other = run_cli(*args, "--aggregation", "rank", "--positions", "compact")
    assert other.returncode == 0, other.stderr
    manifest = json.loads((tmp_path / "fid2" / "run.json").read_text())
    assert (manifest["aggregation"], manifest["positions"]) == ("rank", "compact")
    rows2 = {r["method"]: r for r in json.loads((tmp_path / "fid2" / "summary.json").read_text())["results"]}
    assert rows2["ams-tova"]["kl"] != rows["ams-tova"]["kl"]


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--methods", "full,tovaa"], "unknown method 'tovaa'"),
        (["--budgets", "96,abc"], "comma-separated whole numbers"),
        (["--budgets", "0"], "positive whole numbers"),
        (["--shard", "2/2"], "need 0 <= I < K"),
        (["--samples", "2"], "need --temp > 0"),
        (["--data", "/nonexistent-dir"], "benchmark data not found"),
        (["--budgets", "20", "--budget-base", "absolute"], "budget 20 leaves 20 cells"),
        (["--summary-name", "../x"], "plain file stem"),
    ],
)
@needs_model
def test_bench_bad_input_is_one_line(tmp_path, args, phrase):
    # a one-question set of our own, so that checks made after the data is read do not depend on
    # ../shared/data being there
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text(
        json.dumps(
            {
                "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                "answer": "3 + 4 = 7\n#### 7",
            }
        )
        + "\n"
    )
    data_args = [] if "--data" in args else ["--data", str(data)]
    proc = run_cli(
        "bench",
        "quality",
        "--task",
        "gsm8k",
        "--model",
        str(DEFAULT_MODEL),
        "--n",
        "1",
        "--out",
        str(tmp_path / "x"),
        "-q",
        *data_args,
        *args,
    )
    assert_one_line_error(proc, phrase)


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--methods", "tova,nope"], "unknown method 'nope'"),
        (["--depths", "512,x"], "comma-separated whole numbers"),
        (["--budget", "8"], "--budget"),
    ],
)
@needs_model
def test_bench_speed_bad_input_is_one_line(args, phrase):
    proc = run_cli("bench", "speed", "--model", str(DEFAULT_MODEL), "-q", *args)
    assert_one_line_error(proc, phrase)


@needs_model
def test_bench_report_only_needs_a_run(tmp_path):
    proc = run_cli(
        "bench",
        "quality",
        "--task",
        "gsm8k",
        "--model",
        str(DEFAULT_MODEL),
        "--report-only",
        "--out",
        str(tmp_path / "empty"),
        "-q",
    )
    assert_one_line_error(proc, "holds no benchmark run")


@pytest.mark.parametrize(
    "task, first_reference", [("math500", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("aime24", None)]
)
@needs_model
@needs_data
def test_bench_math_tasks_run_end_to_end(tmp_path, task, first_reference):
    items = load_items(task, 2, DATA)
    assert [len(it.messages) for it in items] == [1, 1] and all(it.reference for it in items)
    assert "\\boxed{}" in items[0].messages[0]["content"]
    if first_reference is not None:
        assert items[0].reference == first_reference
    out = tmp_path / task
    proc = run_cli(
        "bench",
        "quality",
        "--task",
        task,
        "--model",
        str(DEFAULT_MODEL),
        "--budgets",
        "16",
        "--interval",
        "8",
        "--methods",
        "full,ams-tova",
        "--max-tokens",
        "24",
        "--n",
        "1",
        "--out",
        str(out),
        "-q",
        "--no-plots",
    )
    assert proc.returncode == 0, proc.stderr
    rows = _lines(out / "items" / "ams-tova@16.jsonl")
    assert len(rows) == 1 and rows[0]["reference"] == items[0].reference and isinstance(rows[0]["correct"], bool)
