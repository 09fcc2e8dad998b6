"""Selection: Numba kernels vs their numpy references, AMS invariants, credit, aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from amslocal.select import (
    AMSParams,
    AMSSelector,
    CreditState,
    TopKSelector,
    aggregate,
    evidence_mass,
    make_selector,
)
from amslocal.select import kernels as K

# --- helpers -------------------------------------------------------------------------------


def random_mass(rng: np.random.Generator, T: int) -> np.ndarray:
    """Masses of several shapes, including the degenerate ones."""
    kind = rng.integers(6)
    if kind == 0:
        return rng.exponential(size=T)
    if kind == 1:  # sparse: most tokens carry nothing
        return rng.exponential(size=T) * (rng.random(T) < 0.05)
    if kind == 2:  # all mass on one token
        m = np.zeros(T)
        m[rng.integers(T)] = 1.0
        return m
    if kind == 3:
        return np.zeros(T)
    if kind == 4:  # clumpy: a few hot blocks
        m = np.full(T, 1e-6)
        for _ in range(3):
            a = rng.integers(T)
            m[a : a + rng.integers(1, 40)] += rng.exponential()
        return m
    return np.full(T, 1.0 / T)


def protected_mask(T: int, n_sink: int = 4, n_last: int = 32) -> np.ndarray:
    p = np.zeros(T, dtype=bool)
    p[:n_sink] = True
    p[max(0, T - n_last) :] = True
    return p


# --- kernels vs references -----------------------------------------------------------------


def test_moving_average_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        R, T, w = int(rng.integers(0, 4)), int(rng.integers(0, 40)), int(rng.integers(1, 8))
        x = rng.normal(size=(R, T))
        np.testing.assert_allclose(K.moving_average_rows(x, w), K.moving_average_rows_ref(x, w), rtol=1e-12, atol=1e-14)


def test_moving_average_edges_average_available_neighbours():
    x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # width 5: index 0 averages x[0..2], index 1 x[0..3], index 2 x[0..4]
    np.testing.assert_allclose(K.moving_average_rows(x, 5)[0], [2.0, 2.5, 3.0, 4.0, 4.5, 5.0])


def test_window_evidence_matches_reference():
    rng = np.random.default_rng(7)
    for _ in range(200):
        R, T, w = int(rng.integers(0, 5)), int(rng.integers(0, 60)), int(rng.integers(1, 8))
        rows = rng.random((R, T))
        rows[rng.random((R, T)) < 0.03] = np.nan
        win = rng.random(T) < rng.choice([0.0, 0.2, 1.0])
        if rng.random() < 0.5:  # the usual case: the window is the tail
            win = np.arange(T) >= T - int(rng.integers(0, T + 1))
        np.testing.assert_allclose(
            K.window_evidence(rows, win, w), K.window_evidence_ref(rows, win, w), rtol=1e-12, atol=1e-14
        )
        per_row = K.window_evidence_rows(rows, win, w)
        assert per_row.shape == (R, T)
        for r in range(R):
            np.testing.assert_allclose(
                per_row[r], K.window_evidence_ref(rows[r : r + 1], win, w), rtol=1e-12, atol=1e-14
            )


def test_segment_bounds_matches_reference_and_guards_lengths():
    rng = np.random.default_rng(1)
    for _ in range(600):
        T = int(rng.integers(1, 700))
        m = random_mass(rng, T)
        seg_mass = float(rng.choice([0.02, 0.05, 0.1, 0.3, 1.0, 0.013]))
        lo = int(rng.integers(1, 40))
        hi = int(rng.integers(lo, 200))
        b = K.segment_bounds(m, seg_mass, lo, hi)
        np.testing.assert_array_equal(b, K.segment_bounds_ref(m, seg_mass, lo, hi))
        assert b[0] == 0 and b[-1] == T and (np.diff(b) > 0).all()
        lens = np.diff(b)
        assert len(lens) == 1 or lens.min() >= lo
        assert lens.max() < hi + 2 * lo  # merging can overshoot max_len, by less than 2 min_len


def test_segment_bounds_cuts_where_cumsum_reaches_each_multiple():
    m = np.zeros(10)
    m[[2, 5, 8]] = [0.25, 0.25, 0.5]  # cumsum reaches 0.25 at 2, 0.5 at 5, 0.75 and 1 at 8
    np.testing.assert_array_equal(K.segment_bounds(m, 0.25, 1, 100), [0, 2, 5, 8, 10])
    # split long segments into max_len chunks, then merge short ones (the last into the previous)
    np.testing.assert_array_equal(K.segment_bounds(np.ones(10), 1.0, 1, 4), [0, 4, 8, 10])
    np.testing.assert_array_equal(K.segment_bounds(np.ones(10), 1.0, 3, 4), [0, 4, 10])
    # cumsum of 8 equal tokens reaches 1/4 at index 1: cuts 1, 3, 5; the first piece is merged
    np.testing.assert_array_equal(K.segment_bounds(np.ones(8), 0.25, 1, 8), [0, 1, 3, 5, 8])
    np.testing.assert_array_equal(K.segment_bounds(np.ones(8), 0.25, 2, 8), [0, 3, 5, 8])


def test_allocate_quotas_matches_reference_and_invariants():
    rng = np.random.default_rng(2)
    for _ in range(800):
        n = int(rng.integers(1, 40))
        caps = rng.integers(0, 60, size=n).astype(np.int64)
        seg_mass = random_mass(rng, n)
        min_keep = int(rng.integers(0, 12))
        budget = int(rng.integers(0, int(caps.sum()) + 5))
        q = K.allocate_quotas(seg_mass, caps, budget, min_keep)
        np.testing.assert_array_equal(q, K.allocate_quotas_ref(seg_mass, caps, budget, min_keep))
        assert q.sum() == min(budget, caps.sum())
        assert (q >= 0).all() and (q <= caps).all()
        mins = np.minimum(min_keep, caps)
        if budget >= mins.sum():
            assert (q >= mins).all()
        elif budget >= (caps > 0).sum():
            assert (q[caps > 0] >= 1).all()


def test_allocate_quotas_is_proportional_to_mass():
    q = K.allocate_quotas(np.array([0.1, 0.6, 0.3]), np.array([100, 100, 100]), 48, 6)
    np.testing.assert_array_equal(q, [6 + 3, 6 + 18, 6 + 9])
    # capped segments give their excess to the others, round-robin from the first
    q = K.allocate_quotas(np.array([0.0, 1.0]), np.array([50, 10]), 30, 2)
    np.testing.assert_array_equal(q, [20, 10])


def _random_selection_case(rng: np.random.Generator):
    T = int(rng.integers(1, 500))
    scores = rng.integers(0, 5, size=T).astype(np.float64) if rng.random() < 0.5 else rng.normal(size=T)
    scores[rng.random(T) < 0.05] = -np.inf
    prot = rng.random(T) < rng.choice([0.0, 0.1, 0.5])
    n_prot = int(prot.sum())
    edge = rng.integers(4)
    budget = T if edge == 0 else n_prot if edge == 1 else int(rng.integers(n_prot, T + 1))
    b = K.segment_bounds_ref(random_mass(rng, T), 0.05, int(rng.integers(1, 20)), 64)
    free = (~prot).astype(np.int64)
    caps = np.add.reduceat(free, b[:-1])
    q = K.allocate_quotas_ref(rng.random(len(caps)), caps, budget - n_prot, int(rng.integers(0, 9)))
    if rng.random() < 0.2:  # quotas that do not fill the budget: the global fill must
        q = q // 2
    return b, q, scores, prot, budget


def test_select_in_segments_matches_reference():
    rng = np.random.default_rng(3)
    for _ in range(600):
        b, q, scores, prot, budget = _random_selection_case(rng)
        kept = K.select_in_segments(b, q, scores, prot, budget)
        np.testing.assert_array_equal(kept, K.select_in_segments_ref(b, q, scores, prot, budget))
        assert kept.sum() == budget and kept[prot].all()


# --- selectors -----------------------------------------------------------------------------


def test_topk_keeps_top_scores_protected_and_ties_to_earlier():
    scores = np.array([0.0, 5.0, 1.0, 5.0, 3.0, 5.0, 2.0, 9.0])
    prot = np.zeros(8, dtype=bool)
    prot[0] = True
    kept = TopKSelector().select(scores, 4, prot, np.arange(8))
    assert kept.dtype == np.int64
    np.testing.assert_array_equal(kept, [0, 1, 3, 7])  # 9, then the two earliest 5s
    np.testing.assert_array_equal(TopKSelector().select(scores, 20, prot, np.arange(8)), np.arange(8))
    with pytest.raises(ValueError):
        TopKSelector().select(scores, 0, prot, np.arange(8))


def test_ams_invariants_random():
    rng = np.random.default_rng(4)
    p = AMSParams(min_seg_len=16, max_seg_len=256)
    for _ in range(60):
        T = int(rng.integers(40, 1500))
        prot = protected_mask(T)
        n_prot = int(prot.sum())
        budget = int(rng.integers(n_prot, T + 1))
        scores = rng.normal(size=T)
        mass = random_mass(rng, T) if rng.random() < 0.8 else None
        sel = AMSSelector(p)
        kept = sel.select(scores, budget, prot, np.arange(T), mass)
        assert kept.dtype == np.int64 and len(kept) == budget
        assert (np.diff(kept) > 0).all()
        assert np.isin(np.flatnonzero(prot), kept).all()
        b = sel.last_segments
        assert b[0] == 0 and b[-1] == T
        free_per_seg = np.add.reduceat((~prot).astype(np.int64), b[:-1])
        kept_mask = np.zeros(T, dtype=bool)
        kept_mask[kept] = True
        kept_free = np.add.reduceat((kept_mask & ~prot).astype(np.int64), b[:-1])
        # quotas count unprotected tokens only and fill the budget exactly: no global fill needed
        np.testing.assert_array_equal(kept_free, sel.last_quotas)
        mins = np.minimum(p.min_keep_per_segment, free_per_seg)
        if budget - n_prot >= mins.sum():
            assert (kept_free >= mins).all()
        # fresh state, same input -> same answer
        again = AMSSelector(p).select(scores, budget, prot, np.arange(T), mass)
        np.testing.assert_array_equal(kept, again)


def test_ams_budget_equals_protected_and_full():
    T = 100
    prot = protected_mask(T)
    scores = np.arange(T, dtype=float)[::-1].copy()
    kept = AMSSelector().select(scores, int(prot.sum()), prot, np.arange(T), np.ones(T))
    np.testing.assert_array_equal(kept, np.flatnonzero(prot))
    np.testing.assert_array_equal(AMSSelector().select(scores, T, prot, np.arange(T)), np.arange(T))


def test_region_wipe_out_topk_evicts_block_ams_keeps_some():
    rng = np.random.default_rng(5)
    T, budget = 1024, 256
    scores = 1.0 + rng.random(T)
    block = slice(300, 600)  # a finished step of a derivation: scores low all together
    scores[block] = rng.random(300) * 0.5
    prot = protected_mask(T)
    pos = np.arange(T)
    topk = TopKSelector().select(scores, budget, prot, pos)
    ams = AMSSelector().select(scores, budget, prot, pos, np.full(T, 1.0 / T))
    in_block = lambda k: int(((k >= 300) & (k < 600)).sum())  # noqa: E731
    assert in_block(topk) == 0
    assert in_block(ams) >= 3 * AMSParams().min_keep_per_segment


def test_ams_credit_follows_kept_tokens():
    T = 200
    sel = AMSSelector(AMSParams(min_seg_len=8, max_seg_len=64))
    pos = np.arange(T) + 1000
    mass = np.linspace(1.0, 2.0, T)
    kept = sel.select(np.random.default_rng(6).normal(size=T), 80, protected_mask(T), pos, mass)
    np.testing.assert_array_equal(sel.credit.positions, pos[kept])
    assert (sel.credit.credit > 0).all()


def test_credit_state_ema_keep_and_remap():
    c = CreditState()
    m1 = np.array([0.1, 0.2, 0.3, 0.4])
    used = c.mix(np.array([0, 1, 2, 3]), m1)
    np.testing.assert_allclose(c.credit, 0.2 * m1)  # new tokens enter with 0 before the update
    np.testing.assert_allclose(used, m1, rtol=1e-9)  # credit normalises to the mass itself
    c.keep(np.array([1, 3]))
    np.testing.assert_array_equal(c.positions, [1, 3])
    m2 = np.array([0.5, 0.25, 0.25])
    used = c.mix(np.array([1, 3, 4]), m2)
    expect = np.array([0.8 * 0.2 * 0.2 + 0.2 * 0.5, 0.8 * 0.2 * 0.4 + 0.2 * 0.25, 0.2 * 0.25])
    np.testing.assert_allclose(c.credit, expect)
    np.testing.assert_allclose(used, 0.7 * m2 + 0.3 * expect / expect.sum(), rtol=1e-9)
    np.testing.assert_allclose(c.credit_at(np.array([0, 2])), [0.0, 0.0])  # evicted: gone
    c.remap(np.array([3, 4]), np.array([2, 3]))  # compaction: same tokens, new positions
    np.testing.assert_array_equal(c.positions, [1, 2, 3])
    np.testing.assert_allclose(c.credit, expect)


def test_credit_shift_like_seq_add():
    c = CreditState()
    c.mix(np.array([0, 5, 6, 9]), np.array([1.0, 2.0, 3.0, 4.0]))
    before = c.credit.copy()
    c.shift(5, 7, -4)
    np.testing.assert_array_equal(c.positions, [0, 1, 2, 9])
    np.testing.assert_allclose(c.credit, before)
    with pytest.raises(ValueError):
        c.shift(9, 10, -9)  # onto position 0


def test_make_selector():
    assert make_selector("topk").name == "topk"
    s = make_selector("ams", segment_mass=0.05)
    assert s.name == "ams" and s.params.segment_mass == 0.05
    with pytest.raises(ValueError):
        make_selector("nope")
    with pytest.raises(ValueError):
        make_selector("ams", min_seg_len=0)


# --- evidence mass -------------------------------------------------------------------------


def test_evidence_mass_smooths_outside_window_and_fills_window_with_row_max():
    T = 8
    win = np.zeros(T, dtype=bool)
    win[-2:] = True
    attn = np.zeros((1, 2, T))
    attn[0, 0, :6] = [6.0, 0, 0, 0, 0, 0]  # summed over 3 queries x 2 group heads -> p = 1 at 0
    attn[0, 1, :6] = [0, 0, 0, 0, 0, 12.0]  # p = 2 at 5
    m = evidence_mass(attn, n_queries=3, group=2, window_mask=win, smooth=5)
    row0 = np.array([1 / 3, 1 / 4, 1 / 5, 0, 0, 0, 1 / 3, 1 / 3])  # window gets the row max
    row1 = np.array([0, 0, 0, 2 / 5, 2 / 4, 2 / 3, 2 / 3, 2 / 3])  # smoothing stops at the window
    e = (row0 + row1) / 2 + 1e-12
    np.testing.assert_allclose(m, e / e.sum(), rtol=1e-9)
    np.testing.assert_allclose(evidence_mass(attn, 0, 2, win), np.full(T, 1 / T))


# --- aggregation ---------------------------------------------------------------------------

Z = np.sqrt(1.5)  # z-scores of (1, 2, 3) are (-Z, 0, Z)


def test_aggregate_passthrough():
    s = np.array([[[3.0, -np.inf, 1.0]]])
    np.testing.assert_array_equal(aggregate(s, "mean"), [3.0, -np.inf, 1.0])


def test_aggregate_mean_is_scale_free_and_constant_rows_are_zero():
    s = np.array([[[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]], [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]]])
    np.testing.assert_allclose(aggregate(s, "mean"), [-Z / 2, 0.0, Z / 2])


def test_aggregate_max():
    s = np.array([[[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]]])
    np.testing.assert_allclose(aggregate(s, "max"), [Z, 0.0, Z])


def test_aggregate_rank_with_ties():
    s = np.array([[[3.0, 1.0, 2.0], [1.0, 1.0, 2.0]]])
    np.testing.assert_allclose(aggregate(s, "rank"), [0.625, 0.125, 0.75])


def test_aggregate_non_finite():
    s = np.array([[[-np.inf, 1.0, 2.0, np.nan], [np.inf, 1.0, 3.0, 2.0]]])
    # row 0 -> (1, 1, 2, 1), row 1 -> (3, 1, 3, 2)
    rows = np.array([[1.0, 1, 2, 1], [3, 1, 3, 2]])
    z = (rows - rows.mean(1, keepdims=True)) / rows.std(1, keepdims=True)
    np.testing.assert_allclose(aggregate(s, "mean"), z.mean(0))
    assert np.isfinite(aggregate(s, "rank")).all()
    with pytest.raises(ValueError):
        aggregate(s, "median")


def test_rows_credit_equals_one_credit_state_per_row():
    """RowsCreditState (every row in one sorted array) behaves as R independent CreditStates."""
    from amslocal.select.mass import CreditState, RowsCreditState

    rng = np.random.default_rng(5)
    R, T, B = 4, 12, 7
    flat = RowsCreditState(0.8, 0.7)
    ref = [CreditState(0.8, 0.7) for _ in range(R)]
    pos = np.stack([np.sort(rng.choice(40, T, replace=False)) for _ in range(R)])
    for event in range(5):
        mass = rng.random((R, T))
        used = flat.mix(pos, mass)
        want = np.stack([c.mix(pos[r], mass[r]) for r, c in enumerate(ref)])
        np.testing.assert_allclose(used, want, rtol=1e-12)
        kept = np.stack([np.sort(rng.choice(pos[r], B, replace=False)) for r in range(R)])
        flat.keep(kept)
        for r, c in enumerate(ref):
            c.keep(kept[r])
        if event == 2:  # compaction: each row's tokens move to 0..B-1
            new = np.tile(np.arange(B), (R, 1))
            flat.remap(kept, new)
            for r, c in enumerate(ref):
                c.remap(kept[r], new[r])
            kept = new
        for r, c in enumerate(ref):
            p, v = flat.row(r)
            np.testing.assert_array_equal(p, c.positions)
            np.testing.assert_allclose(v, c.credit)
        new_range = np.arange(100 + 50 * event, 140 + 50 * event)  # unseen positions
        fresh = np.stack([np.sort(rng.choice(new_range, T - B, replace=False)) for _ in range(R)])
        pos = np.sort(np.concatenate([kept, fresh], axis=1), axis=1)
