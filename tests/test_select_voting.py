"""Per-row AMS with voting: the row_votes kernel vs its reference, per-row mass, the selector's
invariants, where voting differs from one-curve AMS, and the per-row credit."""

from __future__ import annotations

import numpy as np
import pytest
from test_select import protected_mask, random_mass

from amslocal.select import (
    AMSParams,
    AMSSelector,
    CreditState,
    RowCreditState,
    TopKSelector,
    VotingAMSSelector,
    aggregate,
    evidence_mass,
    make_selector,
    row_evidence_mass,
)
from amslocal.select import kernels as K

# --- helpers -------------------------------------------------------------------------------


def random_params(rng: np.random.Generator) -> AMSParams:
    lo = int(rng.integers(1, 40))
    return AMSParams(
        segment_mass=float(rng.choice([0.02, 0.05, 0.1, 0.3, 1.0, 0.013])),
        min_seg_len=lo,
        max_seg_len=int(rng.integers(lo, 200)),
        min_keep_per_segment=int(rng.integers(0, 12)),
    )


def random_protected(rng: np.random.Generator, T: int) -> np.ndarray:
    """Sinks and a recent window of random sizes, sometimes a few protected tokens in between."""
    prot = protected_mask(T, int(rng.integers(0, 6)), int(rng.integers(0, 40)))
    if rng.random() < 0.3:
        prot |= rng.random(T) < 0.05
    return prot


def random_rows_case(rng: np.random.Generator, max_T: int = 300):
    """(row scores [R, T] without NaN, row mass [R, T], protected [T], keep)."""
    R, T = int(rng.integers(1, 7)), int(rng.integers(0, max_T + 1))
    if rng.random() < 0.5:  # many ties
        scores = rng.integers(0, 5, size=(R, T)).astype(np.float64)
    else:
        scores = rng.normal(size=(R, T))
    scores[rng.random((R, T)) < 0.05] = -np.inf
    mass = np.stack([random_mass(rng, T) for _ in range(R)]) if T else np.zeros((R, 0))
    prot = random_protected(rng, T)
    n_prot = int(prot.sum())
    edge = rng.integers(4)
    keep = T if edge == 0 else n_prot if edge == 1 else int(rng.integers(n_prot, T + 1))
    return scores, mass, prot, keep


def vote_ranking(votes: np.ndarray, scores: np.ndarray, prot: np.ndarray, keep: int) -> np.ndarray:
    """What the final pick must be, spelled out with Python's sort on (votes, score, position)."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    free = sorted(np.flatnonzero(~prot), key=lambda i: (-votes[i], -s[i], i))
    return np.sort(np.r_[np.flatnonzero(prot), free[: keep - int(prot.sum())]]).astype(np.int64)


# --- kernel vs reference -------------------------------------------------------------------


def test_row_votes_matches_reference():
    rng = np.random.default_rng(11)
    for _ in range(300):
        scores, mass, prot, keep = random_rows_case(rng)
        p = random_params(rng)
        args = (prot, keep, p.segment_mass, p.min_seg_len, p.max_seg_len, p.min_keep_per_segment)
        votes = K.row_votes(scores, mass, *args)
        np.testing.assert_array_equal(votes, K.row_votes_ref(scores, mass, *args))
        R = scores.shape[0]
        assert votes.dtype == np.int64
        assert votes.sum() == R * keep  # every row keeps exactly `keep` tokens
        assert (votes[prot] == R).all() and (votes >= 0).all() and (votes <= R).all()


def test_row_votes_one_row_is_ams():
    """One row's votes are AMSSelector's kept mask (uniform mass at a power-of-two T, where every
    segment-mass sum is exact, so AMSSelector's pairwise sums round exactly like the kernel's)."""
    rng = np.random.default_rng(12)
    for _ in range(100):
        T = int(rng.choice([64, 256, 1024]))
        prot = random_protected(rng, T)
        keep = int(rng.integers(int(prot.sum()), T + 1))
        s = rng.normal(size=T)
        p = random_params(rng)
        votes = K.row_votes(
            s[None],
            np.full((1, T), 1.0 / T),
            prot,
            keep,
            p.segment_mass,
            p.min_seg_len,
            p.max_seg_len,
            p.min_keep_per_segment,
        )
        np.testing.assert_array_equal(np.flatnonzero(votes), AMSSelector(p).select(s, keep, prot, np.arange(T)))


# --- per-row mass --------------------------------------------------------------------------


def test_row_evidence_mass_rows_sum_to_one_and_match_evidence_mass():
    rng = np.random.default_rng(13)
    for _ in range(100):
        L, H, T = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 80))
        attn = rng.random((L, H, T)) * (rng.random((L, H, T)) < 0.3)
        attn[rng.random((L, H, T)) < 0.02] = np.nan
        win = np.arange(T) >= T - int(rng.integers(0, T + 1))
        nq, g, w = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 8))
        rm = row_evidence_mass(attn, nq, g, win, w)
        assert rm.shape == (L * H, T) and (rm > 0).all()
        np.testing.assert_allclose(rm.sum(axis=1), 1.0, rtol=1e-12)
        for r in range(L * H):  # each row is evidence_mass of that row alone, bit for bit
            one = attn.reshape(L * H, T)[r][None, None]
            np.testing.assert_array_equal(rm[r], evidence_mass(one, nq, g, win, w))
        if L == H == 1:
            np.testing.assert_array_equal(rm[0], evidence_mass(attn, nq, g, win, w))


def test_row_evidence_mass_keeps_rows_apart_and_falls_back_to_uniform():
    T = 10
    attn = np.zeros((1, 3, T))
    attn[0, 0, 1] = 4.0  # row 0 attends token 1
    attn[0, 1, 8] = 4.0  # row 1 attends token 8
    rm = row_evidence_mass(attn, 2, 2, None, 1)
    assert rm[0].argmax() == 1 and rm[1].argmax() == 8
    np.testing.assert_allclose(rm[2], np.full(T, 1 / T))  # no evidence: uniform
    np.testing.assert_allclose(row_evidence_mass(attn, 0, 2, None), np.full((3, T), 1 / T))
    all_window = np.ones(T, dtype=bool)
    np.testing.assert_allclose(row_evidence_mass(attn, 2, 2, all_window), np.full((3, T), 1 / T))
    assert row_evidence_mass(np.zeros((2, 2, 0)), 1, 1, None).shape == (4, 0)
    with pytest.raises(ValueError):
        row_evidence_mass(attn, 2, 2, np.ones(T - 1, dtype=bool))


# --- the selector --------------------------------------------------------------------------


def test_voting_invariants_random():
    rng = np.random.default_rng(14)
    for _ in range(150):
        row_scores, mass, prot, keep = random_rows_case(rng, max_T=600)
        R, T = row_scores.shape
        row_scores[rng.random((R, T)) < 0.02] = np.nan
        scores = np.where(np.isfinite(row_scores), row_scores, 0.0).mean(axis=0)
        scores[rng.random(T) < 0.05] = np.nan
        budget = keep + int(rng.integers(0, 3)) * (keep == T)  # budget above T keeps all T
        p = random_params(rng)
        pos = np.arange(T) + int(rng.integers(0, 1000))
        row_mass = mass if rng.random() < 0.8 else None
        sel = VotingAMSSelector(p)
        kept = sel.select_rows(row_scores, scores, budget, prot, pos, row_mass)
        assert kept.dtype == np.int64 and len(kept) == min(budget, T)
        assert (np.diff(kept) > 0).all()
        assert np.isin(np.flatnonzero(prot), kept).all()
        assert sel.last_votes.shape == (T,) and sel.last_mass.shape == (R, T)
        # the final pick is exactly the (votes, aggregated score, position) ranking of the tally
        np.testing.assert_array_equal(kept, vote_ranking(sel.last_votes, scores, prot, len(kept)))
        # the tally is the kernel's on the mass the rows were segmented by
        np.testing.assert_array_equal(
            sel.last_votes,
            K.row_votes_ref(
                np.where(np.isnan(row_scores), -np.inf, row_scores),
                sel.last_mass,
                prot,
                len(kept),
                p.segment_mass,
                p.min_seg_len,
                p.max_seg_len,
                p.min_keep_per_segment,
            ),
        )
        # fresh state, same input -> same answer
        again = VotingAMSSelector(p).select_rows(row_scores, scores, budget, prot, pos, row_mass)
        np.testing.assert_array_equal(kept, again)


def test_voting_one_row_uniform_equals_ams():
    """R = 1, no mass: the same tokens as AMSSelector (T a power of two: see row_votes test)."""
    rng = np.random.default_rng(15)
    for _ in range(100):
        T = int(rng.choice([1, 2, 64, 128, 512, 1024]))
        prot = random_protected(rng, T)
        budget = int(rng.integers(int(prot.sum()), T + 1))
        s = rng.normal(size=T) if rng.random() < 0.5 else rng.integers(0, 4, size=T).astype(np.float64)
        s[rng.random(T) < 0.05] = np.nan
        p = random_params(rng)
        ams = AMSSelector(p).select(s, budget, prot, np.arange(T))
        np.testing.assert_array_equal(VotingAMSSelector(p).select(s, budget, prot, np.arange(T)), ams)
        np.testing.assert_array_equal(VotingAMSSelector(p).select_rows(s[None], s, budget, prot, np.arange(T)), ams)


def test_voting_one_row_with_mass_and_credit_equals_ams_over_events():
    """R = 1 with evidence, over consecutive events with eviction and compaction: same tokens and
    the same credit as AMSSelector (generic masses, so no quota lands on an exact rounding tie)."""
    rng = np.random.default_rng(16)
    p = AMSParams(min_seg_len=8, max_seg_len=128)
    ams, vote = AMSSelector(p), VotingAMSSelector(p)
    pos = np.arange(300)
    for _ in range(8):
        T = pos.shape[0]
        prot = protected_mask(T)
        s = rng.normal(size=T)
        m = rng.exponential(size=T) * (1.0 + 20.0 * (rng.random(T) < 0.1))
        a = ams.select(s, 160, prot, pos, m)
        np.testing.assert_array_equal(vote.select(s, 160, prot, pos, m), a)
        np.testing.assert_array_equal(vote.credit.positions, ams.credit.positions)
        np.testing.assert_array_equal(vote.credit.credit[0], ams.credit.credit)
        kept = pos[a]
        if rng.random() < 0.5:  # compaction: the kept tokens move to dense positions
            dense = np.arange(kept.shape[0])
            ams.remap_positions(kept, dense)
            vote.remap_positions(kept, dense)
            kept = dense
        pos = np.r_[kept, kept[-1] + 1 + np.arange(140)]  # 140 new tokens arrive


def test_voting_keeps_each_rows_favourites_where_one_curve_ams_does_not():
    """Rows 0 and 1 attend different halves, each to its 16 favourites, which the other row
    dislikes; row 2 attends (and likes) both sets. The aggregated score ranks the favourites low
    (the dislike dominates the mean z-score), so without the votes they are lost: top-k on the
    aggregate keeps none, AMS on the averaged mass and aggregated scores few.

    Per row: row 2 keeps exactly the 32 favourites (one per segment, its mass sits on them); row 0
    (and 1 mirrored) keeps its 16 plus one more per segment of its half, tokens nobody else keeps.
    So the favourites have 2 votes, everything else unprotected at most 1: voting keeps all 32.
    """
    T, budget = 400, 36 + 32
    prot = protected_mask(T)  # 4 sinks + last 32
    fav = [8 + 10 * np.arange(16), 200 + 10 * np.arange(16)]
    both = np.r_[fav[0], fav[1]]
    rng = np.random.default_rng(17)
    row_scores = rng.normal(size=(3, T))
    row_mass = np.full((3, T), 1e-6)
    for r in range(2):
        row_scores[r, fav[r]] = 10.0  # row r's favourites ...
        row_scores[1 - r, fav[r]] = -30.0  # ... which the other row dislikes
        row_mass[r, fav[r]] = 1.0  # and row r's attention sits on them
    row_scores[2, both] = 6.0
    row_mass[2, both] = 1.0
    scores = aggregate(row_scores[None], "mean")
    free = ~prot
    assert scores[both].max() < np.sort(scores[free])[::-1][budget]  # the aggregate: low ranks

    p = AMSParams(min_keep_per_segment=0, min_seg_len=8, max_seg_len=512)
    sel = VotingAMSSelector(p)
    kept = sel.select_rows(row_scores, scores, budget, prot, np.arange(T), row_mass)
    np.testing.assert_array_equal(kept, np.sort(np.r_[np.flatnonzero(prot), both]))
    np.testing.assert_array_equal(sel.last_votes[both], 2)
    others = free & ~np.isin(np.arange(T), both)
    assert sel.last_votes[others].max() == 1 and sel.last_votes[others].sum() == 2 * 16

    topk = TopKSelector().select(scores, budget, prot, np.arange(T))
    assert not np.isin(both, topk).any()
    one_curve = AMSSelector(p).select(scores, budget, prot, np.arange(T), row_mass.mean(axis=0))
    assert np.isin(both, one_curve).sum() < len(both) // 2


def test_voting_breaks_vote_ties_by_aggregated_score_then_position():
    T = 12
    prot = np.zeros(T, dtype=bool)
    # one segment, no minimum: each row keeps its 5 best tokens (its 5.0s)
    p = AMSParams(segment_mass=1.0, min_seg_len=1, max_seg_len=T, min_keep_per_segment=0)
    row_scores = np.zeros((3, T))
    row_scores[0, [0, 1, 2, 3, 4]] = 5.0
    row_scores[1, [0, 1, 2, 5, 6]] = 5.0
    row_scores[2, [0, 7, 8, 9, 10]] = 5.0
    scores = np.zeros(T)
    scores[[3, 4, 5, 6, 7, 8, 9, 10, 11]] = [np.nan, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]
    sel = VotingAMSSelector(p)
    kept = sel.select_rows(row_scores, scores, 5, prot, np.arange(T))
    np.testing.assert_array_equal(sel.last_votes, [3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    # 0, 1, 2 on votes (token 11's score 100 does not buy a vote); two of the 1-vote tokens:
    # 5 (score 2), then the earliest 1.0 (6, not 7..10); the NaN at 3 ranks last, not first
    np.testing.assert_array_equal(kept, [0, 1, 2, 5, 6])


def test_voting_broadcasts_one_row_and_checks_shapes():
    rng = np.random.default_rng(18)
    T = 200
    prot = protected_mask(T)
    s = rng.normal(size=T)
    masses = np.stack([random_mass(rng, T) for _ in range(3)])
    a = VotingAMSSelector().select_rows(s[None], s, 100, prot, np.arange(T), masses)
    b = VotingAMSSelector().select_rows(np.tile(s, (3, 1)), s, 100, prot, np.arange(T), masses)
    np.testing.assert_array_equal(a, b)
    lh = VotingAMSSelector().select_rows(
        np.tile(s, (3, 1)).reshape(1, 3, T), s, 100, prot, np.arange(T), masses.reshape(3, 1, T)
    )
    np.testing.assert_array_equal(lh, b)
    with pytest.raises(ValueError):
        VotingAMSSelector().select_rows(np.zeros((2, T)), s, 100, prot, np.arange(T), masses)
    with pytest.raises(ValueError):
        VotingAMSSelector().select_rows(np.zeros((2, T - 1)), s, 100, prot, np.arange(T))
    with pytest.raises(ValueError):
        VotingAMSSelector().select(s, 100, prot, np.arange(T), masses)
    with pytest.raises(ValueError):  # more protected tokens than the budget
        VotingAMSSelector().select(s, 10, prot, np.arange(T))
    assert VotingAMSSelector().select(np.zeros(0), 5, np.zeros(0, bool), np.zeros(0)).shape == (0,)


def test_make_selector_ams_vote():
    s = make_selector("ams-vote", segment_mass=0.05)
    assert isinstance(s, VotingAMSSelector) and s.name == "ams-vote" and s.params.segment_mass == 0.05
    with pytest.raises(ValueError):
        make_selector("ams-vote", min_seg_len=0)


# --- per-row credit ------------------------------------------------------------------------


def test_row_credit_one_row_is_credit_state():
    rng = np.random.default_rng(19)
    c, rc = CreditState(), RowCreditState()
    pos = np.arange(50)
    for _ in range(6):
        m = rng.exponential(size=pos.shape[0])
        np.testing.assert_array_equal(rc.mix(pos, m[None])[0], c.mix(pos, m))
        np.testing.assert_array_equal(rc.credit[0], c.credit)
        kept = pos[rng.random(pos.shape[0]) < 0.6]
        c.keep(kept)
        rc.keep(kept)
        c.remap(kept, kept + 3)
        rc.remap(kept, kept + 3)
        np.testing.assert_array_equal(rc.positions, c.positions)
        pos = np.r_[c.positions, c.positions[-1] + 1 + np.arange(20)] if c.positions.size else pos


def test_voting_credit_follows_kept_remaps_and_resets():
    rng = np.random.default_rng(20)
    T, R = 200, 3
    p = AMSParams(min_seg_len=8, max_seg_len=64)
    sel = VotingAMSSelector(p)
    pos = np.arange(T) + 1000
    masses = np.stack([random_mass(rng, T) for _ in range(R)])
    kept = sel.select_rows(rng.normal(size=(R, T)), rng.normal(size=T), 80, protected_mask(T), pos, masses)
    np.testing.assert_array_equal(sel.credit.positions, pos[kept])
    assert sel.credit.credit.shape == (R, 80) and (sel.credit.credit > 0).all()
    # each row's credit is that row's own mass: 0.2 * normalised mass, at the kept tokens
    m = np.maximum(masses, 0.0) + 1e-12
    np.testing.assert_allclose(sel.credit.credit, 0.2 * (m / m.sum(axis=1, keepdims=True))[:, kept])

    before = sel.credit.credit.copy()
    new = np.arange(80)  # compaction to dense positions
    sel.remap_positions(pos[kept], new)
    np.testing.assert_array_equal(sel.credit.positions, new)
    np.testing.assert_array_equal(sel.credit.credit_at(new), before)
    assert not sel.credit.credit_at(pos[kept][-5:]).any()  # old positions are gone

    # the next event mixes the held credit in, per row: with n(x) = (x + 1e-12) / sum,
    # credit = 0.8 credit + 0.2 n(m) (new tokens from 0), used = n(0.7 n(m) + 0.3 n(credit))
    def n(x: np.ndarray) -> np.ndarray:
        return (x + 1e-12) / (x + 1e-12).sum(axis=1, keepdims=True)

    pos2 = np.r_[new, 80 + np.arange(40)]
    m2 = rng.exponential(size=(R, 120))
    sel.select_rows(rng.normal(size=(R, 120)), rng.normal(size=120), 60, protected_mask(120), pos2, m2)
    cr = 0.8 * np.c_[before, np.zeros((R, 40))] + 0.2 * n(m2)
    np.testing.assert_allclose(sel.last_mass, n(0.7 * n(m2) + 0.3 * n(cr)), rtol=1e-9)

    sel.reset()
    assert sel.credit.positions.size == 0 and sel.credit.credit.shape == (0, 0)
    # after a reset the row count may change (a different model); while held it may not
    sel.select_rows(
        rng.normal(size=(2, 50)),
        rng.normal(size=50),
        30,
        protected_mask(50, 2, 8),
        np.arange(50),
        rng.exponential(size=(2, 50)),
    )
    assert sel.credit.credit.shape == (2, 30)
    with pytest.raises(ValueError):
        sel.select_rows(
            rng.normal(size=(5, 50)),
            rng.normal(size=50),
            30,
            protected_mask(50, 2, 8),
            np.arange(50),
            rng.exponential(size=(5, 50)),
        )
