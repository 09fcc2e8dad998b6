"""Attention mass per token (method step 1) and the EMA credit that steadies it (step 2).

Step 1 on llama.cpp: the cache view gives attention probability **summed** over the last
``n_queries`` queries and the ``group`` query heads of each KV head, [L, H_kv, T]. The reference
works per layer and head; here every (layer, KV head) row is turned into evidence the same way and
the rows are averaged, because llama.cpp evicts a token from all layers and heads at once.
:func:`row_evidence_mass` keeps the rows apart instead (one mass curve per row, for the voting
selector), and :class:`RowCreditState` holds one credit row per (layer, KV head) row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .kernels import sorted_match, window_evidence, window_evidence_rows

EPS = 1e-12


def to_mass(x: np.ndarray) -> np.ndarray:
    """relu(x) + 1e-12, normalised to sum 1 (the reference's ``_to_mass``)."""
    m = np.maximum(np.asarray(x, dtype=np.float64), 0.0) + EPS
    return m / m.sum()


def to_mass_rows(x: np.ndarray) -> np.ndarray:
    """:func:`to_mass` of every row of [R, T]: relu + 1e-12, each row normalised to sum 1."""
    m = np.maximum(np.asarray(x, dtype=np.float64), 0.0) + EPS
    return m / m.sum(axis=-1, keepdims=True)


def evidence_mass(
    attn: np.ndarray, n_queries: int, group: int, window_mask: Optional[np.ndarray], smooth: int = 5
) -> np.ndarray:
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
    win = np.zeros(T, dtype=np.bool_) if window_mask is None else np.ascontiguousarray(window_mask, dtype=np.bool_)
    if win.shape != (T,):
        raise ValueError(f"window_mask must be [{T}], got shape {win.shape}")
    if n_queries * group <= 0 or rows.shape[0] == 0 or win.all():
        return np.full(T, 1.0 / T)
    # smoothing, the max and the row mean all commute with the positive 1 / (n_queries * group)
    ev = window_evidence(rows, win, max(int(smooth), 1))
    return to_mass(ev / float(n_queries * group))


def row_evidence_mass(
    attn: np.ndarray, n_queries: int, group: int, window_mask: Optional[np.ndarray], smooth: int = 5
) -> np.ndarray:
    """Attention mass per (layer, KV head) row, [L*H, T], each row summing to 1.

    Row r is what :func:`evidence_mass` gives for that row alone (same smoothing, window max,
    relu + 1e-12 and normalisation), for selectors that segment every row on its own mass
    instead of on the row average. A row without evidence (all zero) comes out uniform through the
    1e-12; no observed query (or no token outside the window) gives uniform rows.
    """
    a = np.asarray(attn, dtype=np.float64)
    T = a.shape[-1]
    R = int(np.prod(a.shape[:-1]))  # not reshape(-1, T): that is ambiguous when T == 0
    rows = np.ascontiguousarray(a.reshape(R, T))
    if T == 0:
        return np.zeros((R, 0))
    win = np.zeros(T, dtype=np.bool_) if window_mask is None else np.ascontiguousarray(window_mask, dtype=np.bool_)
    if win.shape != (T,):
        raise ValueError(f"window_mask must be [{T}], got shape {win.shape}")
    if n_queries * group <= 0 or win.all():
        return np.full((R, T), 1.0 / T)
    return to_mass_rows(window_evidence_rows(rows, win, max(int(smooth), 1)) / float(n_queries * group))


def peaked_mass(row_mass: np.ndarray) -> np.ndarray:
    """One mass curve [T] from per-row masses [R, T] (rows sum to 1), weighting each row by how
    peaked it is: ``w_r = 1 - H(m_r) / log T`` (H the entropy). A row that spreads its attention
    evenly (w ~ 0) says little about where the context's regions are, and averaging it in only
    flattens the curve the segments are cut on. All rows flat (or T < 2): the plain mean.
    """
    m = np.asarray(row_mass, dtype=np.float64)
    R, T = m.shape
    if T < 2 or R == 0:
        return to_mass(m.mean(axis=0)) if R else np.full(T, 1.0 / max(T, 1))
    ent = -(m * np.log(np.maximum(m, EPS))).sum(axis=1) / np.log(T)
    w = np.clip(1.0 - ent, 0.0, None)
    if w.sum() <= 0:
        return to_mass(m.mean(axis=0))
    return to_mass(w @ m / w.sum())


@dataclass
class CreditState:
    """Running attention credit per token, keyed by cache position (method step 2).

    ``mix`` folds an event's mass into the credit and returns the mass to segment by;
    ``keep`` follows an eviction; ``remap``/``shift`` follow a compaction (same tokens, new
    positions). Tokens never seen before enter with credit 0.
    """

    decay: float = 0.8  # credit = decay * credit + (1 - decay) * mass
    mix_beta: float = 0.7  # used = normalise(mix_beta * mass + (1 - mix_beta) * normalise(credit))
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    credit: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def reset(self) -> None:
        """Forget every token (a new sequence)."""
        self.positions = np.zeros(0, dtype=np.int64)
        self.credit = np.zeros(0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The credit keyed by position, for save files (``credit_val`` is [n] or [R, n])."""
        return {
            "credit_pos": np.asarray(self.positions, dtype=np.int64),
            "credit_val": np.asarray(self.credit, dtype=np.float64),
        }

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (nothing saved: nothing held)."""
        if "credit_pos" in arrays:
            self.positions = arrays["credit_pos"].astype(np.int64).copy()
            self.credit = arrays["credit_val"].astype(np.float64).copy()

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
        self.positions, self.credit = self.positions[sel], self.credit[..., sel]

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
        pos, credit = pos[order], credit[..., order]  # [..., n]: RowCreditState has [R, n]
        if pos.size > 1 and (np.diff(pos) == 0).any():
            raise ValueError("two tokens mapped onto one position")
        self.positions, self.credit = pos, credit


@dataclass
class RowCreditState(CreditState):
    """:class:`CreditState` with one credit row per (layer, KV head) row: ``credit`` is [R, n],
    keyed by the same ``positions`` [n], so eviction and compaction move every row together.

    Each row follows step 2 on its own mass (as :class:`CreditState` with R = 1 would). The row
    count is fixed while tokens are held; :meth:`reset` (or holding nothing) lets it change.
    """

    credit: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    def reset(self) -> None:
        """Forget every token (a new sequence)."""
        self.positions = np.zeros(0, dtype=np.int64)
        self.credit = np.zeros((0, 0))

    def credit_at(self, positions: np.ndarray, rows: Optional[int] = None) -> np.ndarray:
        """Credit [rows, T] of ``positions`` (ascending), 0 for tokens not held.

        ``rows`` defaults to the rows held; a different count is an error unless nothing is held.
        """
        pos = np.asarray(positions, dtype=np.int64)
        held = self.credit.shape[0]
        R = held if rows is None else int(rows)
        if self.positions.size and R != held:
            raise ValueError(f"credit holds {held} rows, asked for {R}")
        out = np.zeros((R, pos.shape[0]))
        if self.positions.size and pos.size:
            i = np.minimum(np.searchsorted(self.positions, pos), self.positions.size - 1)
            hit = self.positions[i] == pos
            out[:, hit] = self.credit[:, i[hit]]
        return out

    def mix(self, positions: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Update the credit of ``positions`` with ``mass`` [R, T]; return the used mass [R, T].

        Per row exactly :meth:`CreditState.mix`: the row is normalised first (relu + 1e-12), held
        tokens not in ``positions`` are dropped.
        """
        pos = np.asarray(positions, dtype=np.int64)
        m = np.asarray(mass, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != pos.shape[0]:
            raise ValueError(f"mass must be [R, {pos.shape[0]}], got shape {m.shape}")
        m = to_mass_rows(m)
        credit = self.decay * self.credit_at(pos, m.shape[0]) + (1.0 - self.decay) * m
        self.positions, self.credit = pos.copy(), credit
        return to_mass_rows(self.mix_beta * m + (1.0 - self.mix_beta) * to_mass_rows(credit))


_ROW_KEY = 1 << 40  # row r's position p is keyed r * _ROW_KEY + p: one sorted array for every row


@dataclass
class RowsCreditState:
    """One :class:`CreditState` per row, each keyed by the positions *that row* holds (per-row token
    sets), kept as one flat array sorted by (row, position), so every row is updated at once.

    ``mix`` takes [R, T] positions (ascending within each row) and masses; ``keep`` takes the kept
    positions of every row. Row r behaves exactly as a :class:`CreditState` of its own.
    """

    decay: float = 0.8
    mix_beta: float = 0.7
    rows: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    credit: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def reset(self) -> None:
        self.rows = 0
        self.keys = np.zeros(0, dtype=np.int64)
        self.credit = np.zeros(0)

    @staticmethod
    def _keys(positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        return (np.arange(pos.shape[0], dtype=np.int64)[:, None] * _ROW_KEY + pos).ravel()

    def credit_at(self, positions: np.ndarray) -> np.ndarray:
        """[R, T] credit of each row's ``positions`` (0 for tokens that row does not hold)."""
        pos = np.asarray(positions, dtype=np.int64)
        q = self._keys(pos)
        out = np.zeros(q.shape[0])
        if self.keys.size and q.size and self.rows == pos.shape[0]:
            if (np.diff(q) <= 0).any():  # each row ascending: keys then ascend overall
                raise ValueError("each row's positions must ascend")
            at = sorted_match(q, self.keys)
            hit = at >= 0
            out[hit] = self.credit[at[hit]]
        return out.reshape(pos.shape)

    def mix(self, positions: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Step 2 on every row: [R, T] positions and masses in, the [R, T] mass to segment by out."""
        pos = np.asarray(positions, dtype=np.int64)
        m = to_mass_rows(mass)
        credit = self.decay * self.credit_at(pos) + (1.0 - self.decay) * m
        self.rows, self.keys, self.credit = pos.shape[0], self._keys(pos), credit.ravel()
        return to_mass_rows(self.mix_beta * m + (1.0 - self.mix_beta) * to_mass_rows(credit))

    def keep(self, kept_positions: np.ndarray) -> None:
        """Keep only each row's ``kept_positions`` [R, B] (after the event)."""
        kept = np.asarray(kept_positions, dtype=np.int64)
        if self.rows and kept.shape[0] != self.rows:
            raise ValueError(f"{kept.shape[0]} rows kept, {self.rows} held")
        # membership by one merge with the sorted kept keys (np.isin hashes both arrays: ~10x slower)
        sel = sorted_match(self.keys, np.sort(self._keys(kept))) >= 0
        self.keys, self.credit = self.keys[sel], self.credit[sel]
        self.rows = kept.shape[0]

    def remap(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """Row r's token ``old_positions[r, i]`` now sits at ``new_positions[r, i]`` (compaction)."""
        old, new = self._keys(old_positions), self._keys(new_positions)
        if old.shape != new.shape:
            raise ValueError("old_positions and new_positions differ in shape")
        keys = self.keys.copy()
        if old.size and keys.size:
            order = np.argsort(old, kind="stable")
            o, n = old[order], new[order]
            i = np.minimum(np.searchsorted(o, keys), o.size - 1)
            hit = o[i] == keys
            keys[hit] = n[i[hit]]
        order = np.argsort(keys, kind="stable")
        keys, credit = keys[order], self.credit[order]
        if keys.size > 1 and (np.diff(keys) == 0).any():
            raise ValueError("two tokens mapped onto one position")
        self.keys, self.credit = keys, credit

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, credit) that row ``r`` holds (save files, tests)."""
        lo, hi = np.searchsorted(self.keys, [r * _ROW_KEY, (r + 1) * _ROW_KEY])
        return self.keys[lo:hi] - r * _ROW_KEY, self.credit[lo:hi]
