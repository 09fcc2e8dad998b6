"""Small helpers the scorers share: checked access to ScoreInput fields, per-row softmax and z-score."""

from __future__ import annotations

import numpy as np

from .base import ScoreInput


def require(inp: ScoreInput, field: str, scorer: str, what: str):
    """``inp.<field>``, or a ValueError saying which scorer needs it and why."""
    value = getattr(inp, field)
    if value is None:
        raise ValueError(f"scorer {scorer!r} needs ScoreInput.{field} ({what})")
    return value


def mean_attention(inp: ScoreInput, summed: np.ndarray) -> np.ndarray:
    """Attention summed over ``n_queries`` queries and ``group`` heads -> mean probability."""
    return np.asarray(summed, dtype=np.float64) / (max(int(inp.n_queries), 1) * max(int(inp.group), 1))


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Softmax along the last axis (an empty axis stays empty)."""
    if x.shape[-1] == 0:
        return np.array(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def zscore_rows(x: np.ndarray, min_std: float = 1e-6) -> np.ndarray:
    """(x - mean) / max(std, min_std) along the last axis."""
    if x.shape[-1] == 0:
        return np.array(x, dtype=np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    std = np.maximum(x.std(axis=-1, keepdims=True), min_std)
    return (x - mean) / std
