"""Long-context perplexity: batched lockstep vs token by token, fair ± AMS pairs, the CLI task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli_errors import DEFAULT_MODEL, assert_one_line_error, run_cli

from amslocal.backend import ContextParams
from amslocal.bench.documents import DOCUMENTS, load_documents
from amslocal.bench.methods import parse_method, parse_methods
from amslocal.bench.runner import RunSettings, perplexity
from amslocal.errors import OptionError
from amslocal.scorers import make_scorer
from amslocal.session import CompressionConfig, Session

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "longdocs").exists(), reason=f"benchmark data missing at {DATA}")

BUDGET, INTERVAL = 64, 16


@pytest.fixture(scope="module")
def doc_tokens(smollm2_model) -> list[int]:
    if not (DATA / "longdocs").exists():
        pytest.skip(f"benchmark data missing at {DATA}")
    doc = load_documents(DATA, 1, 400)[0]
    return smollm2_model.tokenize(doc.text)[:200]


def _feed(model, tokens, step: int, **cfg) -> tuple[np.ndarray, list[list[int]]]:
    s = Session(model, CompressionConfig(budget=BUDGET, interval=INTERVAL, **cfg), ContextParams(n_threads=2))
    kept: list[list[int]] = []
    s.on_compress = lambda pos, k, inp: kept.append(pos[k].tolist())
    logits = np.concatenate([s.feed(tokens[i : i + step], logits=True) for i in range(0, len(tokens), step)])
    return logits, kept


@pytest.mark.parametrize(
    "cfg",
    [
        dict(scorer="tova", ams=False),
        dict(scorer="rkv", ams=True),
        dict(scorer="h2o", ams=True, ams_variant="vote"),
        dict(scorer="expected-attention", ams=True, ams_variant="peaked"),
    ],
)
def test_batched_feed_keeps_what_token_by_token_keeps(smollm2_model, doc_tokens, cfg):
    """Cut at its own events and windows, a batch sees the same queries as single tokens: the same
    tokens are evicted at every event, and the logits agree (flash attention, the default here)."""
    a, kept_a = _feed(smollm2_model, doc_tokens, 48, **cfg)
    b, kept_b = _feed(smollm2_model, doc_tokens, 1, **cfg)
    assert len(kept_a) >= 5 and kept_a == kept_b
    assert a.shape == b.shape == (len(doc_tokens), smollm2_model.n_vocab)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_batched_perplexity_equals_token_by_token_lockstep(smollm2_model, doc_tokens):
    methods = parse_methods("context-shift,tova,ams-tova,vote-snapkv,rkv")
    settings = RunSettings(interval=INTERVAL, n_threads=2)
    batched = perplexity(smollm2_model, methods, doc_tokens, BUDGET, settings)
    single = perplexity(smollm2_model, methods, doc_tokens, BUDGET, settings, step=1)
    for m in methods:
        x, y = batched[m.name], single[m.name]
        assert x["tokens"] == y["tokens"] == len(doc_tokens) - 1 - (BUDGET + INTERVAL)
        assert x["compressions"] == y["compressions"] > 0
        # the method's own predictions are the same numbers
        np.testing.assert_allclose(x["nll"], y["nll"], rtol=1e-5)
        # the reference (full cache) is computed batched vs one token at a time: llama.cpp's
        # kernels round differently there, so KL and agreement carry that small noise
        np.testing.assert_allclose(x["kl"], y["kl"], rtol=0.05)
        assert abs(x["top1"] - y["top1"]) <= 0.02 * x["tokens"]


def test_rkv_scores_the_same_with_and_without_ams(smollm2_model, doc_tokens):
    """AMS observes 32 queries for its mass; R-KV still averages its own 8."""
    seen = {}
    for ams in (False, True):
        s = Session(
            smollm2_model,
            CompressionConfig(budget=BUDGET, interval=INTERVAL, scorer="rkv", ams=ams),
            ContextParams(n_threads=2),
            observe_attention=True,
        )
        s.on_compress = lambda pos, k, inp, ams=ams: seen.setdefault(ams, (inp, make_scorer("rkv").score(inp)))
        s.feed(doc_tokens[: BUDGET + INTERVAL + 1])
    (i0, s0), (i1, s1) = seen[False], seen[True]
    assert i0.n_queries == i1.n_queries == 8
    assert i0.mass_queries == i1.mass_queries == 32  # the mass window of AMS (and of the diagnostics)
    np.testing.assert_array_equal(i0.attn, i1.attn)
    np.testing.assert_array_equal(s0, s1)


def test_documents_cover_every_kind_and_are_long():
    if not (DATA / "longdocs").exists():
        pytest.skip(f"benchmark data missing at {DATA}")
    docs = load_documents(DATA, None, 2048)
    assert [d.id for d in docs] == [d[0] for d in DOCUMENTS]
    assert {d.kind for d in docs[:3]} == {"prose", "code", "dialogue"}
    for d in docs:
        assert len(d.text) >= 2048 * 4, d.id  # enough characters for 2,048 tokens
        assert "Project Gutenberg" not in d.text and "***" not in d.text[:200]
    assert "def " in docs[1].text and "User: " in docs[2].text and "Assistant: " in docs[2].text


def test_method_names_pick_the_ams_variant():
    assert parse_method("vote-tova").config == {
        "scorer": "tova",
        "ams": True,
        "ams_variant": "vote",
        "granularity": "token",
    }
    assert parse_method("peak-rkv").config == {
        "scorer": "rkv",
        "ams": True,
        "ams_variant": "peaked",
        "granularity": "token",
    }
    assert parse_method("ams-rkv").config["ams_variant"] == "mean" and parse_method("vote-rkv").topk_twin == "rkv"


def test_method_names_pick_the_granularity():
    m = parse_method("ams-tova@head")
    assert m.name == "ams-tova@head" and m.config["granularity"] == "head" and m.ams and m.topk_twin == "tova@head"
    assert parse_method("tova@layer").topk_twin == "ams-tova@layer"
    assert parse_method("tova@token").name == "tova"
    with pytest.raises(OptionError, match="granularity"):
        parse_method("tova@cell")
    with pytest.raises(OptionError, match="per row"):
        parse_method("vote-tova@head")


@needs_data
@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="default model missing; run models/fetch.py")
def test_perplexity_task_end_to_end(tmp_path: Path):
    out = tmp_path / "ppl"
    args = [
        "bench",
        "quality",
        "--task",
        "perplexity",
        "-n",
        "1",
        "--doc-tokens",
        "160",
        "--budgets",
        "64",
        "--interval",
        "16",
        "--methods",
        "full,context-shift,tova,vote-tova",
        "--out",
        str(out),
        "-t",
        "2",
        "-q",
    ]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = {x["method"]: x for x in summary["results"]}
    assert set(rows) == {"full", "context-shift", "tova", "vote-tova"}
    # "full" is the noise floor: the full cache fed in a session's batches, compared with the reference
    assert rows["full"]["kl"] < 0.1 * rows["tova"]["kl"] and rows["full"]["ppl"] == pytest.approx(
        rows["full"]["full_ppl"], rel=1e-3
    )
    for x in rows.values():
        assert x["tokens"] == 160 - 1 - 80 and x["ppl"] > 1 and x["full_ppl"] > 1
        assert x["ppl_ratio"] == pytest.approx(x["ppl"] / x["full_ppl"]) and 0 <= x["top1"] <= 1 and x["kl"] >= 0
    assert rows["tova"]["compressions"] >= 5 and rows["tova"]["wipeout"]["events"] >= 5
    assert "| vote-tova | 64 | 1 | 79 |" in (out / "summary.md").read_text()
    # a re-run finds everything done and changes nothing
    before = (out / "items" / "tova@64.jsonl").read_text()
    assert run_cli(*args).returncode == 0 and (out / "items" / "tova@64.jsonl").read_text() == before
    # a budget that leaves no token after the first eviction is one clear line
    bad = run_cli(
        "bench",
        "quality",
        "--task",
        "perplexity",
        "-n",
        "1",
        "--doc-tokens",
        "100",
        "--budgets",
        "96",
        "--interval",
        "16",
        "--methods",
        "tova",
        "--out",
        str(tmp_path / "bad"),
        "-q",
    )
    assert_one_line_error(bad, "leaves no token")
