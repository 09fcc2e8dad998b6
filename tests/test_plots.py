"""Bench plots from synthetic summaries and eviction records (no model needed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from amslocal.bench import plots  # noqa: E402
from amslocal.bench.plots import EMPTY, EVICTED_BEFORE, EVICTED_NOW, KEPT  # noqa: E402
from amslocal.errors import AmsError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def make_summary(budgets=(64, 96, 160)):
    rng = np.random.default_rng(0)
    results = [{"method": "full", "budget": None, "n": 200, "accuracy": 0.31, "correct": 62}]
    methods = ["context-shift", "streaming", "ams-streaming"]
    for scorer in plots.SCORERS:
        methods += [scorer, f"ams-{scorer}"]
    for method in methods:
        for budget in budgets:
            acc = float(rng.uniform(0.05, 0.3))
            results.append({"method": method, "budget": budget, "n": 180, "accuracy": acc, "passkey": acc})
    return {
        "task": "gsm8k",
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "budget_base": "prompt",
        "results": results,
    }


def make_record(n_positions=40, prompt_tokens=10, n_events=3, budget=16, evict=None):
    """A sliding generation: each event holds every surviving position and evicts the `evict(event)`
    ones (default: the oldest beyond the budget, except the first 2)."""
    events, held = [], list(range(prompt_tokens + 8))
    for index in range(n_events):
        step = held[-1] + 1
        gone = set(evict(index, held) if evict else held[2 : 2 + max(0, len(held) - budget)])
        kept = [p not in gone for p in held]
        mass = np.linspace(1, 2, len(held))
        bounds = [0, len(held) // 3, 2 * len(held) // 3, len(held)]
        events.append(
            {"positions": list(held), "kept": kept, "mass": list(mass / mass.sum()), "bounds": bounds, "step": step}
        )
        held = [p for p in held if p not in gone] + list(range(step, min(step + 6, n_positions)))
    return {
        "title": "ams-tova @ budget 16, synthetic",
        "n_positions": n_positions,
        "prompt_tokens": prompt_tokens,
        "events": events,
    }


def test_plot_accuracy_writes_png(tmp_path):
    out = plots.plot_accuracy(make_summary(), tmp_path / "sub" / "acc.png")
    assert out == tmp_path / "sub" / "acc.png"
    assert_png(out)


def test_plot_accuracy_single_budget_absolute_and_other_metric(tmp_path):
    summary = make_summary(budgets=(128,))
    summary["budget_base"] = "absolute"
    assert_png(plots.plot_accuracy(summary, tmp_path / "one.png"))
    assert_png(plots.plot_accuracy(summary, tmp_path / "passkey.png", metric="passkey"))


def test_eviction_states_known_eviction():
    # 6 positions, prompt 0..3; event 0 holds 0..4 and evicts position 2; event 1 holds the rest + 5.
    record = {
        "n_positions": 7,
        "prompt_tokens": 4,
        "events": [
            {
                "positions": [0, 1, 2, 3, 4],
                "kept": [True, True, False, True, True],
                "mass": None,
                "bounds": None,
                "step": 5,
            },
            {
                "positions": [0, 1, 3, 4, 5],
                "kept": [True, False, True, True, True],
                "mass": None,
                "bounds": None,
                "step": 6,
            },
        ],
    }
    states = plots.eviction_states(record)
    assert states.shape == (2, 7)
    assert states[0].tolist() == [KEPT, KEPT, EVICTED_NOW, KEPT, KEPT, EMPTY, EMPTY]
    assert states[1].tolist() == [KEPT, EVICTED_NOW, EVICTED_BEFORE, KEPT, KEPT, KEPT, EMPTY]


def test_downsampling_keeps_single_eviction_visible():
    n = 10_000
    states = np.full((1, n), KEPT, dtype=np.int8)
    states[0, 5_003] = EVICTED_NOW
    states[0, 9_000:] = EMPTY
    small = plots.downsample_states(states, max_columns=plots.MAX_COLUMNS)
    assert small.shape[1] <= plots.MAX_COLUMNS
    assert (small == EVICTED_NOW).sum() == 1
    assert small[0, 0] == KEPT and small[0, -1] == EMPTY
    assert plots.downsample_states(states, max_columns=n) is states  # small enough: untouched


def test_single_eviction_survives_rendering(tmp_path):
    """One evicted position among 10k still shows as red pixels in the saved map (not the legend)."""
    from matplotlib.image import imread

    n, evicted = 10_000, 6_789
    kept = [p != evicted for p in range(n)]
    event = {"positions": list(range(n)), "kept": kept, "mass": None, "bounds": None, "step": n}
    record = {"title": "one eviction", "n_positions": n, "prompt_tokens": 100, "events": [event] * 3}
    image = imread(plots.plot_eviction_map(record, tmp_path / "one.png"))[..., :3]
    red = np.all(np.abs(image - np.array([0xD6, 0x27, 0x28]) / 255) < 0.05, axis=-1)
    red_columns = np.unique(np.nonzero(red)[1])
    map_columns = red_columns[red_columns < 0.75 * image.shape[1]]  # the legend sits on the right
    assert map_columns.size >= 1


def test_plot_eviction_map_writes_png(tmp_path):
    record = make_record()
    assert_png(plots.plot_eviction_map(record, tmp_path / "map.png"))


def test_plot_eviction_map_large_and_without_mass(tmp_path):
    record = make_record(n_positions=9_000, prompt_tokens=300, n_events=400, budget=256)
    for event in record["events"][::2]:
        event["mass"] = event["bounds"] = None
    assert_png(plots.plot_eviction_map(record, tmp_path / "big.png"))
    for event in record["events"]:
        event["mass"] = event["bounds"] = None
        del event["step"]
    assert_png(plots.plot_eviction_map(record, tmp_path / "nomass.png"))


def test_plot_eviction_map_wiped_out_segment(tmp_path):
    # Every token of the middle segment is evicted at every event.
    def evict(_, held):
        third = len(held) // 3
        return held[third : 2 * third]

    record = make_record(evict=evict)
    assert_png(plots.plot_eviction_map(record, tmp_path / "wiped.png"))


def test_plot_eviction_map_zero_events(tmp_path):
    record = {"title": "full cache, nothing evicted", "n_positions": 50, "prompt_tokens": 20, "events": []}
    assert plots.eviction_states(record).shape == (0, 50)
    assert_png(plots.plot_eviction_map(record, tmp_path / "empty.png"))


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(AmsError, match=r"plots need matplotlib: pip install 'amslocal\[bench\]'"):
        plots.plot_accuracy(make_summary(), tmp_path / "a.png")
    with pytest.raises(AmsError, match="plots need matplotlib"):
        plots.plot_eviction_map(make_record(), tmp_path / "m.png")


def test_pairs_plot_one_panel_per_budget(tmp_path):
    from amslocal.bench.plots import plot_pairs

    summary = {
        "task": "fidelity",
        "model": "m.gguf",
        "budget_base": "absolute",
        "results": [
            {"method": "context-shift", "budget": 128, "n": 3, "kl": 0.4},
            {"method": "tova", "budget": 128, "n": 3, "kl": 0.2},
            {"method": "ams-tova", "budget": 128, "n": 3, "kl": 0.18},
            {"method": "tova", "budget": 256, "n": 3, "kl": 0.1},
            {"method": "ams-tova", "budget": 256, "n": 3, "kl": 0.09},
        ],
    }
    path = plot_pairs(summary, tmp_path / "pairs.png", metric="kl")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
