"""`amslocal bench speed` as a library call, with tiny settings on the default model (a few seconds)."""

from __future__ import annotations

import json

import pytest
from conftest import DEFAULT_MODEL

from amslocal.bench.speed import STOCK, filler_text, format_table, run_speed
from amslocal.errors import OptionError

# n_gen = interval: in steady state any `interval` decode steps contain exactly one compression
BUDGET, INTERVAL, DEPTH, N_GEN = 48, 16, 64, 16


@pytest.fixture(scope="module")
def result():
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"default model missing at {DEFAULT_MODEL}; run: python models/fetch.py")
    messages = []
    res = run_speed(
        DEFAULT_MODEL,
        depths=(DEPTH,),
        budget=BUDGET,
        interval=INTERVAL,
        n_gen=N_GEN,
        rounds=1,
        methods=["streaming", "ams-tova"],
        include_stock=True,
        progress=messages.append,
    )
    assert messages, "progress was never called"
    return res


def test_filler_text_is_deterministic_and_varied():
    text = filler_text(40)
    assert text == filler_text(40)
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if s.strip()]
    assert len(set(sentences)) == len(sentences) == 40


def test_rows_and_ratios(result):
    json.dumps(result)  # JSON-able
    tg = f"tg{N_GEN}@d{DEPTH}"
    rows = {(r["method"], r["test"]): r for r in result["rows"]}
    assert set(rows) == {("full", f"pp{DEPTH}"), ("full", tg), (STOCK, tg), ("streaming", tg), ("ams-tova", tg)}
    for r in result["rows"]:
        assert r["tok_per_s"] > 0 and r["depth"] == DEPTH and len(r["samples"]) == 1  # rounds=1
    assert rows[("full", tg)]["vs_full"] == 1.0 and rows[("full", tg)]["budget"] is None
    assert rows[("full", tg)]["compressions"] == 0
    for method in ("streaming", "ams-tova"):
        r = rows[(method, tg)]
        assert r["budget"] == BUDGET
        assert r["compressions"] == 1  # counted in the timed steps only
        assert r["ms_per_event"] > 0  # that one event's time
        assert r["tok_per_s_between_events"] > r["tok_per_s"]  # the same steps without it
        # the controller's share: at least that event's time over the timed steps' wall time
        assert r["ms_per_event"] / 1e3 * r["tok_per_s"] / N_GEN * (1 - 1e-6) <= r["controller_share"] < 1
        assert 0 < r["kv_cells_peak"] <= BUDGET + INTERVAL
        assert r["vs_full"] == pytest.approx(r["tok_per_s"] / rows[("full", tg)]["tok_per_s"])
    assert result["model"] == DEFAULT_MODEL.name and result["n_threads"] >= 1 and result["notes"]


def test_format_table(result):
    table = format_table(result)
    lines = [l for l in table.splitlines() if l.startswith("|")]
    assert lines[0] == (
        "| model | budget | method | test | t/s | ± | vs full | events | ms/event | t/s between events | controller % |"
    )
    assert len(lines) == 2 + len(result["rows"])  # header, separator, one per row
    assert any(STOCK in l for l in lines) and any("| full |" in l for l in lines)
    assert format_table(result, notes=False).splitlines() == lines


def test_every_row_uses_the_flash_attention_and_cache_types_asked_for(monkeypatch):
    """-fa / -ctk / -ctv reach every row's context (llama-bench's flags), and the table says so."""
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"default model missing at {DEFAULT_MODEL}; run: python models/fetch.py")
    import amslocal.backend.handles as handles

    made = []
    real_init = handles.Context.__init__

    def record(self, model, params=handles.ContextParams()):
        made.append((params.flash_attn, params.type_k, params.type_v))
        real_init(self, model, params)

    monkeypatch.setattr(handles.Context, "__init__", record)
    res = run_speed(
        DEFAULT_MODEL,
        depths=(DEPTH,),
        budget=BUDGET,
        interval=INTERVAL,
        n_gen=4,
        rounds=1,
        methods=["ams-tova"],
        include_stock=False,
        flash_attn="off",
        type_k="q8_0",
    )
    assert len(made) >= 2 and set(made) == {("off", "q8_0", "f16")}  # the full row and the budgeted one
    assert (res["flash_attn"], res["type_k"], res["type_v"]) == ("off", "q8_0", "f16")
    assert format_table(res).splitlines()[-1].endswith("flash attention: off, K: q8_0, V: f16")
    with pytest.raises(OptionError, match="K/V types"):
        run_speed(DEFAULT_MODEL, depths=(DEPTH,), type_v="q3_k")
