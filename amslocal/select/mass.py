"""Attention mass per token (method step 1) and the EMA credit that steadies it (step 2).

Step 1 on llama.cpp: the cache view gives attention probability **summed** over the last
``n_queries`` queries and the ``group`` query heads of each KV head, [L, H_kv, T]. The reference
works per layer and head; here every (layer, KV head) row is turned into evidence the same way and
the rows are averaged, because llama.cpp evicts a token from all layers and heads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .kernels import window_evidence

EPS = 1e-12


def to_mass(x: np.ndarray) -> np.ndarray:
    """relu(x) + 1e-12, normalised to sum 1 (the reference's ``_to_mass``)."""
    m = np.maximum(np.asarray(x, dtype=np.float64), 0.0) + EPS
    return m / m.sum()


def evidence_mass(attn: np.ndarray, n_queries: int, group: int,
                  window_mask: Optional[np.ndarray], smooth: int = 5) -> np.ndarray:
    """Attention mass [T] (>= 1e-12-ish, sums to 1) from summed window attention [L, H, T].

    Per (layer, KV head) row: mean probability = attn / (n_queries * group); the tokens outside the
    observation window (``window_mask`` False) are smoothed with a centred moving average of width
    ``smooth`` taken over those tokens only (at the edges the average is over the neighbours that
    exist, where the reference's avg_pool1d pads with zeros); the window's own tokens get the row's
    maximum (the reference pads with the max over all heads of the layer; per row here, so one
    peaked head does not inflate the window for all rows). Rows are averaged, then
    relu + 1e-12 and normalised. No observed query (or no token outside the window) gives uniform.
    """
    a = np.asarray(attn, dtype=np.float64)
    T = a.shape[-1]
    if T == 0:
        return np.zeros(0)
    rows = np.ascontiguousarray(a.reshape(-1, T))
    win = (np.zeros(T, dtype=np.bool_) if window_mask is None
           else np.ascontiguousarray(window_mask, dtype=np.bool_))
    if win.shape != (T,):
        raise ValueError(f"window_mask must be [{T}], got shape {win.shape}")
    if n_queries * group <= 0 or rows.shape[0] == 0 or win.all():
        return np.full(T, 1.0 / T)
    # smoothing, the max and the row mean all commute with the positive 1 / (n_queries * group)
    ev = window_evidence(rows, win, max(int(smooth), 1))
    return to_mass(ev / float(n_queries * group))


@dataclass
class CreditState:
    """Running attention credit per token, keyed by cache position (method step 2).

    ``mix`` folds an event's mass into the credit and returns the mass to segment by;
    ``keep`` follows an eviction; ``remap``/``shift`` follow a compaction (same tokens, new
    positions). Tokens never seen before enter with credit 0.
    """

    decay: float = 0.8      # credit = decay * credit + (1 - decay) * mass
    mix_beta: float = 0.7   # used = normalise(mix_beta * mass + (1 - mix_beta) * normalise(credit))
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    credit: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def reset(self) -> None:
        """Forget every token (a new sequence)."""
        self.positions = np.zeros(0, dtype=np.int64)
        self.credit = np.zeros(0)

    def credit_at(self, positions: np.ndarray) -> np.ndarray:
        """Credit of ``positions`` (ascending), 0 for tokens not held."""
        pos = np.asarray(positions, dtype=np.int64)
        out = np.zeros(pos.shape[0])
        if self.positions.size and pos.size:
            i = np.minimum(np.searchsorted(self.positions, pos), self.positions.size - 1)
            hit = self.positions[i] == pos
            out[hit] = self.credit[i[hit]]
        return out

    def mix(self, positions: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Update the credit of the tokens at ``positions`` with ``mass`` [T]; return the used mass.

        ``mass`` is normalised first (relu + 1e-12). Held tokens not in ``positions`` are dropped:
        the cache no longer has them.
        """
        pos = np.asarray(positions, dtype=np.int64)
        m = to_mass(mass)
        credit = self.decay * self.credit_at(pos) + (1.0 - self.decay) * m
        self.positions, self.credit = pos.copy(), credit
        return to_mass(self.mix_beta * m + (1.0 - self.mix_beta) * to_mass(credit))

    def keep(self, positions_kept: np.ndarray) -> None:
        """Keep the credit of ``positions_kept`` only (after an eviction)."""
        sel = np.isin(self.positions, np.asarray(positions_kept, dtype=np.int64))
        self.positions, self.credit = self.positions[sel], self.credit[sel]

    def remap(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """Move the credit of token ``old_positions[i]`` to ``new_positions[i]``; others stay put."""
        old = np.asarray(old_positions, dtype=np.int64)
        new = np.asarray(new_positions, dtype=np.int64)
        if old.shape != new.shape:
            raise ValueError("old_positions and new_positions differ in length")
        pos = self.positions.copy()
        if old.size and pos.size:
            order = np.argsort(old, kind="stable")
            o, n = old[order], new[order]
            i = np.minimum(np.searchsorted(o, pos), o.size - 1)
            hit = o[i] == pos
            pos[hit] = n[i[hit]]
        self._set_sorted(pos, self.credit)

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Positions in [p0, p1) move by ``delta`` (llama_memory_seq_add semantics)."""
        pos = self.positions.copy()
        sel = (pos >= p0) & (pos < p1)
        pos[sel] += delta
        self._set_sorted(pos, self.credit)

    def _set_sorted(self, pos: np.ndarray, credit: np.ndarray) -> None:
        order = np.argsort(pos, kind="stable")
        pos, credit = pos[order], credit[order]
        if pos.size > 1 and (np.diff(pos) == 0).any():
            raise ValueError("two tokens mapped onto one position")
        self.positions, self.credit = pos, credit
