"""Reduce per-(layer, KV head) scores [L, H, T] to one score per token [T].

A llama.cpp cell holds a token for every layer and head, so eviction needs one ranking per token.
Scores of different rows live on different scales (a head with peaked attention dwarfs a flat
one), so every mode first makes rows comparable:

- ``"mean"``: per row z-score ``(s - mean) / std`` (a constant row gives zeros), then the mean over
  rows. A token is kept when it is above average in many heads.
- ``"max"``: the same per-row z-scores, then the max over rows. A token is kept when *some* head
  wants it strongly (closer to per-head eviction, which keeps a head's favourites).
- ``"rank"``: per row ranks scaled to [0, 1] (ties share their average rank; a one-token row gives
  0), then the mean over rows. Scale-free and robust to outliers.

Non-finite entries are made finite per row first: -inf and NaN become the row's finite minimum,
+inf its finite maximum (a row with no finite entry becomes zeros). A [1, 1, T] input (scorers
that ignore layers) passes through unchanged as float64.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("mean", "max", "rank")


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """[R, T] with -inf/NaN -> row finite min, +inf -> row finite max, all-non-finite -> 0."""
    fin = np.isfinite(x)
    if fin.all():
        return x
    lo = np.where(fin, x, np.inf).min(axis=1, keepdims=True)
    hi = np.where(fin, x, -np.inf).max(axis=1, keepdims=True)
    none = ~fin.any(axis=1, keepdims=True)
    lo = np.where(none, 0.0, lo)
    hi = np.where(none, 0.0, hi)
    return np.where(fin, x, np.where(x == np.inf, hi, lo))


def zscore_rows(x: np.ndarray) -> np.ndarray:
    """Per-row (x - mean) / std of [R, T]; rows with std == 0 give zeros."""
    mu = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    return np.divide(x - mu, sd, out=np.zeros_like(x), where=sd > 0)


def rank_rows(x: np.ndarray) -> np.ndarray:
    """Per-row ranks in [0, 1] of [R, T] (0 = lowest), ties get their average rank."""
    R, T = x.shape
    out = np.zeros_like(x)
    if T < 2:
        return out
    for r in range(R):
        order = np.argsort(x[r], kind="stable")
        v = x[r, order]
        # average rank over each run of equal values
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
        ends = np.r_[starts[1:], T]
        avg = (starts + ends - 1) / 2.0
        out[r, order] = np.repeat(avg, ends - starts)
    return out / (T - 1)


def aggregate(scores: np.ndarray, how: str = "mean") -> np.ndarray:
    """[L, H, T] scores -> [T] float64 by ``how`` in {"mean", "max", "rank"} (see module doc)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3:
        raise ValueError(f"scores must be [L, H, T], got shape {s.shape}")
    if s.shape[0] == 1 and s.shape[1] == 1:
        return s[0, 0].copy()
    if s.size == 0:
        return np.zeros(s.shape[2])
    rows = _finite_rows(s.reshape(-1, s.shape[2]))
    if how == "rank":
        return rank_rows(rows).mean(axis=0)
    z = zscore_rows(rows)
    return z.mean(axis=0) if how == "mean" else z.max(axis=0)
