"""Bounded-memory generation: the cache never holds more than budget + interval tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEFAULT_MODEL, ROOT

from amslocal.backend import ContextParams, SamplerParams
from amslocal.scorers import SCORERS
from amslocal.session import BudgetError, CompressionConfig, Session

TEXT = (
    "In the beginning the archive held every letter ever written in the valley, and the keeper "
    "read them aloud each evening so that nobody would forget what had been said. "
)


def test_smollm2_budget_128_interval_64_for_2000_tokens(smollm2_model):
    cfg = CompressionConfig(budget=128, interval=64, scorer="tova", ams=True)
    s = Session(smollm2_model, cfg, ContextParams(), SamplerParams(temp=0.7, seed=7))
    prompt = smollm2_model.tokenize("Tell me a long story about a lighthouse keeper.")
    peak = 0
    pieces = []
    for tok in s.generate(prompt, 2000, ignore_eos=True):
        occupied = s.view.n_occupied(0)  # from llama.cpp's cell map, every step
        peak = max(peak, occupied)
        assert occupied <= 192
        pieces.append(smollm2_model.token_bytes(tok))
    assert s.stats.generated_tokens == 2000
    assert peak == 192 and s.stats.kv_cells_peak == 192
    assert s.stats.compressions >= (len(prompt) + 2000 - 192) // 64
    text = b"".join(pieces).decode("utf-8", "replace")
    printable = sum(ch.isprintable() or ch.isspace() for ch in text) / len(text)
    assert printable > 0.95, text[-300:]
    assert len(set(text.split())) > 50  # words, not one token repeated
    # the engine's token map agrees with the cell map after all those events
    cells, pos = s.view.occupied(0)
    assert sorted(s.gen.tokens_at) == list(pos)


def test_long_prompt_prefill_is_bounded(smollm2_model):
    prompt = smollm2_model.tokenize(TEXT * 120)[:3000]
    assert len(prompt) == 3000
    cfg = CompressionConfig(budget=256, interval=128, scorer="snapkv", ams=True)
    s = Session(smollm2_model, cfg, ContextParams(), SamplerParams(temp=0))
    out = list(s.generate(prompt, 8, ignore_eos=True))
    assert len(out) == 8
    assert s.stats.kv_cells_peak <= 384
    assert s.stats.compressions >= (3000 - 384) // 128
    assert s.gen.ctx.n_ctx == 512  # budget + interval, rounded up to 256 by llama.cpp


@pytest.mark.parametrize("ams", [True, False])
@pytest.mark.parametrize("scorer", sorted(n for n in SCORERS if n != "triattention"))
def test_every_scorer_runs_bounded_on_tiny(tiny_model, scorer, ams):
    cfg = CompressionConfig(budget=48, interval=16, scorer=scorer, ams=ams, n_sink=4, keep_last=8)
    s = Session(tiny_model, cfg, ContextParams(), SamplerParams(temp=0))
    prompt = tiny_model.tokenize("abcdefghij" * 10)
    peak = 0
    for _ in s.generate(prompt, 60, ignore_eos=True):
        peak = max(peak, s.view.n_occupied(0))
    assert peak <= 64 and s.stats.compressions > 0
    # sinks are never evicted
    assert sorted(s.gen.tokens_at)[:4] == [0, 1, 2, 3]


def test_compact_positions_stay_dense(tiny_model):
    cfg = CompressionConfig(budget=48, interval=16, scorer="tova", positions="compact", n_sink=4, keep_last=8)
    s = Session(tiny_model, cfg, ContextParams(), SamplerParams(temp=0))
    for _ in s.generate(tiny_model.tokenize("x" * 100), 40, ignore_eos=True):
        pass
    _, pos = s.view.occupied(0)
    assert s.stats.compactions == s.stats.compressions > 0
    assert pos.max() < 64  # dense: positions never exceed the capacity


def test_keep_positions_compact_before_trained_context(tmp_path):
    from tiny_gguf import write_tiny_llama_gguf

    from amslocal.backend import Model

    model = Model(write_tiny_llama_gguf(tmp_path / "short.gguf", n_ctx_train=256))
    cfg = CompressionConfig(budget=48, interval=16, scorer="tova", positions="keep", n_sink=4, keep_last=8)
    s = Session(model, cfg, ContextParams(), SamplerParams(temp=0))
    for _ in s.generate(model.tokenize("y" * 50), 400, ignore_eos=True):
        assert s.gen.next_pos <= 256
    assert 0 < s.stats.compactions < s.stats.compressions


def test_protected_positions_survive(tiny_model):
    cfg = CompressionConfig(budget=48, interval=16, scorer="streaming", ams=False, n_sink=4, keep_last=8)
    s = Session(tiny_model, cfg, ContextParams(), SamplerParams(temp=0))
    s.protect(range(10, 20))
    for _ in s.generate(tiny_model.tokenize("z" * 40), 80, ignore_eos=True):
        pass
    assert set(range(10, 20)) <= set(s.gen.tokens_at)


def test_impossible_budget_is_refused(tiny_model):
    with pytest.raises(BudgetError, match="too small"):
        Session(tiny_model, CompressionConfig(budget=20, n_sink=4, keep_last=32))


def test_cli_stats_json(tmp_path):
    if not DEFAULT_MODEL.exists():
        pytest.skip("default model missing")
    stats = tmp_path / "stats.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "amslocal",
            "generate",
            "-p",
            TEXT * 8,
            "--budget",
            "128",
            "--interval",
            "64",
            "--max-tokens",
            "100",
            "--ignore-eos",
            "--temp",
            "0",
            "--scorer",
            "keydiff",
            "--stats-json",
            str(stats),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    st = json.loads(stats.read_text())
    for key in (
        "prompt_tokens",
        "generated_tokens",
        "kv_budget",
        "kv_cells_peak",
        "compressions",
        "prefill_tok_per_s",
        "decode_tok_per_s",
        "compress_ms_total",
        "scorer",
        "ams",
    ):
        assert key in st
    assert st["kv_budget"] == 128 and st["kv_cells_peak"] <= 192 and st["generated_tokens"] == 100
    # 128 cells leave 92 to choose beyond the sinks and the recent window: the default is top-k there
    assert st["compressions"] > 0 and st["scorer"] == "keydiff" and st["ams"] is False
    assert np.isfinite(st["decode_tok_per_s"]) and st["decode_tok_per_s"] > 0


def test_triattention_needs_and_finds_its_calibration(tmp_path, tiny_gguf):
    env = {**__import__("os").environ, "AMSLOCAL_CACHE_DIR": str(tmp_path / "cache")}
    gen = [
        sys.executable,
        "-m",
        "amslocal",
        "generate",
        str(tiny_gguf),
        "-p",
        "a" * 90,
        "--budget",
        "48",
        "--interval",
        "16",
        "--max-tokens",
        "40",
        "--ignore-eos",
        "--temp",
        "0",
        "--scorer",
        "triattention",
    ]
    missing = subprocess.run(gen, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert missing.returncode != 0 and "amslocal calibrate" in missing.stderr and "Traceback" not in missing.stderr
    text = tmp_path / "calib.txt"
    text.write_text("The calibration text walks through several ordinary sentences. " * 20)
    cal = subprocess.run(
        [sys.executable, "-m", "amslocal", "calibrate", str(tiny_gguf), "--text", str(text)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert cal.returncode == 0, cal.stderr
    assert list((tmp_path / "cache" / "calibration").glob("*.npz"))
    ok = subprocess.run(
        gen + ["--stats-json", str(tmp_path / "s.json")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert ok.returncode == 0, ok.stderr
    st = json.loads((tmp_path / "s.json").read_text())
    assert st["compressions"] > 0 and st["kv_cells_peak"] <= 64


def test_default_selects_with_ams_only_where_the_budget_leaves_room(tiny_model):
    """ams=None (the default): AMS from 128 cells to choose (budget - n_sink - keep_last) up, top-k
    below; resolved once when the session is made; an explicit choice is kept as it is."""
    assert CompressionConfig(budget=164).resolved_ams() and not CompressionConfig(budget=163).resolved_ams()
    assert not CompressionConfig(budget=None).resolved_ams()
    small = Session(tiny_model, CompressionConfig(budget=96, interval=32))
    assert small.config.ams is False and not small.stats.ams and small.mass_window == 0
    large = Session(tiny_model, CompressionConfig(budget=256, interval=32))
    assert large.config.ams is True and large.stats.ams
    forced = Session(tiny_model, CompressionConfig(budget=96, interval=32, ams=True))
    assert forced.config.ams is True and forced.mass_window > 0
    large.set_budget(96)  # resolved once: the session keeps its selector
    assert large.config.ams is True
