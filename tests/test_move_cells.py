"""Whole-cell moves (patch 0004) and the token-set packing built on them: a moved cell keeps its
token (K/V of every layer, position), refused calls change nothing, and a session that packs its
kept tokens into the lowest cells decodes and compresses as one that leaves the holes."""

from __future__ import annotations

import numpy as np
import pytest

from amslocal.backend import ContextParams, SamplerParams
from amslocal.engine import Generator
from amslocal.errors import CacheError
from amslocal.evidence import carry_columns, carry_columns_ref
from amslocal.session import _PACK_ABOVE_RUNS, CompressionConfig, Session

TEXT = "Whole cells move: the token, its keys and values, and its position go together. " * 3


def _gen(model, fa="on", tk="f16", tv="f16") -> Generator:
    return Generator(
        model, ContextParams(n_ctx=256, flash_attn=fa, type_k=tk, type_v=tv, n_threads=1), SamplerParams(temp=0)
    )


def _holes_and_movers(g: Generator, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Evict 12 random positions of the 60 cached (holes among the low cells), then pick 12
    occupied cells above them to move down: (dst holes, src cells)."""
    rng = np.random.default_rng(seed)
    g.evict(sorted(rng.choice(np.arange(2, 40), 12, replace=False).tolist()))
    pos = g.view.cell_pos(0)
    holes = np.flatnonzero(pos[:60] < 0)
    movers = rng.permutation(np.flatnonzero(pos >= 0)[-30:])[: holes.size]
    return holes, movers


@pytest.mark.parametrize("backend_io", ["0", "1"])
@pytest.mark.parametrize(
    "fa,tk,tv", [("on", "f16", "f16"), ("off", "f16", "f16"), ("on", "q8_0", "q8_0"), ("off", "q8_0", "f32")]
)
def test_move_cells_moves_whole_tokens(tiny_model, monkeypatch, fa, tk, tv, backend_io):
    """Every layer's K and V row of a destination cell equals its source's before the move, byte
    for byte (V transposed with flash attention off); the position goes with it and the source is
    empty; every other cell is untouched. LLAMA_AMS_BACKEND_READS=1: the backend API's path, a GPU's."""
    monkeypatch.setenv("LLAMA_AMS_BACKEND_READS", backend_io)
    g = _gen(tiny_model, fa, tk, tv)
    g.eval(tiny_model.tokenize(TEXT)[:60])
    v = g.view
    dst, src = _holes_and_movers(g, seed=1)
    pos_before = v.cell_pos(0)
    cells = np.flatnonzero(pos_before >= 0)
    before = {il: (v.read_k(il, cells), v.read_v(il, cells)) for il in v.kv_layers}
    v.move_cells(0, dst, src)
    pos_after = v.cell_pos(0)
    want_pos = pos_before.copy()
    want_pos[dst], want_pos[src] = pos_before[src], -1
    np.testing.assert_array_equal(pos_after, want_pos)
    new_cells = cells.copy()  # where each token of `cells` is now
    new_cells[np.searchsorted(cells, src)] = dst
    for il in v.kv_layers:
        assert np.array_equal(v.read_k(il, new_cells), before[il][0]), f"K layer {il}"
        assert np.array_equal(v.read_v(il, new_cells), before[il][1]), f"V layer {il}"


@pytest.mark.parametrize("fa", ["on", "off"])
def test_moved_cells_give_the_same_logits(tiny_model, fa):
    """The next decode over moved cells equals a twin context's over the unmoved ones (the same
    tokens and positions; only the order llama.cpp sums the cells in differs), and a wrong move,
    a cell given another token's row, would not."""
    toks = tiny_model.tokenize(TEXT)[:60]
    nxt = tiny_model.tokenize(" Z", add_special=False)[:1]
    moved, twin = _gen(tiny_model, fa, "f32", "f32"), _gen(tiny_model, fa, "f32", "f32")
    for g in (moved, twin):
        g.eval(toks)
    dst, src = _holes_and_movers(moved, seed=2)
    _holes_and_movers(twin, seed=2)
    moved.view.move_cells(0, dst, src)
    got = moved.eval(nxt, logits_all=True)[-1]
    want = twin.eval(nxt, logits_all=True)[-1]
    # flash attention sums V in f16 on the CPU (K/V cast to f16): the order of the cells shows there
    atol = 1e-4 if fa == "off" else 1e-2
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    # the check can fail: the same move, then one moved token's rows overwritten with another's
    wrong = _gen(tiny_model, fa, "f32", "f32")
    wrong.eval(toks)
    dst, src = _holes_and_movers(wrong, seed=2)
    wrong.view.move_cells(0, dst, src)
    layers = wrong.view.kv_layers
    H = wrong.view.layers[layers[0]].n_head_kv
    wrong.view.move_rows(layers, dst[:1], np.full((len(layers), H, 1), dst[1]))
    bad = wrong.eval(nxt, logits_all=True)[-1]
    assert np.abs(bad - want).max() > 10 * atol


def test_move_cells_refuses_bad_cells(tiny_model):
    """A destination that is occupied, a source that is empty, a cell named twice or out of range:
    code -1, and the cache is as it was."""
    g = _gen(tiny_model)
    g.eval(tiny_model.tokenize(TEXT)[:40])
    g.evict([5, 6])
    v = g.view
    pos = v.cell_pos(0)
    empty, full = np.flatnonzero(pos < 0), np.flatnonzero(pos >= 0)
    k0 = v.read_k(v.kv_layers[0], full).copy()
    bad = [
        ([full[0]], [full[1]]),  # destination occupied
        ([empty[0]], [empty[1]]),  # source empty
        ([empty[0], empty[0]], [full[-1], full[-2]]),  # a destination twice
        ([empty[0], empty[1]], [full[-1], full[-1]]),  # a source twice
        ([empty[0]], [10_000]),  # out of range
        ([-1], [full[-1]]),
    ]
    for dst, src in bad:
        with pytest.raises(CacheError, match="code -1"):
            v.move_cells(0, np.array(dst), np.array(src))
        np.testing.assert_array_equal(v.cell_pos(0), pos)
    np.testing.assert_array_equal(v.read_k(v.kv_layers[0], full), k0)
    with pytest.raises(ValueError, match="two"):
        v.move_cells(0, np.array([1, 2]), np.array([3]))


def _session(model, pack: bool, scorer="h2o", **kw) -> Session:
    cfg = CompressionConfig(budget=48, interval=16, scorer=scorer, ams=True, granularity="token", **kw)
    s = Session(
        model, cfg, ContextParams(n_threads=1, flash_attn="off", type_k="f32", type_v="f32"), SamplerParams(temp=0)
    )
    s.pack_cells = pack
    return s


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_token_sets_pack_into_the_lowest_cells(smollm2_model, positions):
    """After every event the kept tokens fill cells 0..B-1 and new tokens follow (or the cells
    were in a few runs, which are left alone); a session that does not pack keeps its
    scattered holes (so the check can fail)."""
    toks = smollm2_model.tokenize(TEXT * 3)
    s = _session(smollm2_model, True, positions=positions)
    layouts = []
    for i in range(0, len(toks), 16):
        n_events = s.stats.compressions
        s.feed(toks[i : i + 16])
        if s.stats.compressions > n_events:  # tokens fed after the event follow the packed ones
            layouts.append(np.flatnonzero(s.view.cell_pos(0) >= 0))
    assert len(layouts) >= 3 and any(e["cells_moved"] > 0 for e in s.events)
    for occ in layouts:
        assert np.array_equal(occ, np.arange(occ.size)) or 1 + np.count_nonzero(np.diff(occ) > 1) <= _PACK_ABOVE_RUNS
    holes = _session(smollm2_model, False, positions=positions)
    holes.feed(toks)
    occ = np.flatnonzero(holes.view.cell_pos(0) >= 0)
    assert 1 + np.count_nonzero(np.diff(occ) > 1) > 2 and all(e["cells_moved"] == 0 for e in holes.events)


@pytest.mark.parametrize("scorer", ["h2o", "tova"])
def test_packing_keeps_what_the_session_selects(tiny_model, scorer):
    """Fed the same text, a packing session and one that leaves holes keep the same positions at
    every event (H2O's totals move with their tokens; evidence at the event is rebuilt from the
    same keys in position order) and give the same logits. The tiny model has f32 weights: with
    quantized weights ggml quantizes the activations to 8 bits for the products, and the last bit
    of a sum that another cell order changes can flip a rounding there (SmolLM2's logits then move
    by up to ~0.3 between cell layouts, packing or not)."""
    toks = tiny_model.tokenize(TEXT * 2)
    kept = {True: [], False: []}
    sessions = {}
    for pack in (True, False):
        s = sessions[pack] = _session(tiny_model, pack, scorer=scorer, keep_last=4)  # scattered holes
        s.on_compress = lambda pos, mask, _inp, k=kept[pack]: k.append(pos[mask].copy())
        s.feed(toks)
    assert len(kept[True]) >= 3 and sum(e["cells_moved"] for e in sessions[True].events) > 0
    for a, b in zip(kept[True], kept[False]):
        np.testing.assert_array_equal(a, b)
    nxt = tiny_model.tokenize(" and", add_special=False)
    np.testing.assert_allclose(sessions[True].feed(nxt, logits=True), sessions[False].feed(nxt, logits=True), atol=1e-4)


@pytest.mark.parametrize("dtype,empty", [(np.float64, 0.0), (np.float32, 0.0), (np.int32, -1), (np.int64, -1)])
def test_carry_columns_equals_numpy(dtype, empty):
    """The kernel that moves the view's evidence columns with their tokens equals numpy's fancy
    indexing, for every accumulator type the view carries."""
    rng = np.random.default_rng(0)
    acc = (rng.random((90, 512)) * 100).astype(dtype)
    cells = rng.permutation(512)[:64].astype(np.int32)
    dst, src = cells[:32], cells[32:]
    want = acc.copy()
    carry_columns_ref(want, dst, src, empty)
    carry_columns(acc, dst, src, empty)
    np.testing.assert_array_equal(acc, want)
    assert (acc[:, src] == empty).all() and not (want[:, dst] == empty).all()
