"""Per-row token sets: every (layer, KV head) row keeps its own ``budget`` tokens.

With patch 0002 a cell's K/V rows can hold different tokens per (layer, KV head), so a row need
not compromise with the others: it keeps what *it* scores highest (top-k per row), or what AMS on
its own mass, credit and segments keeps (as the reference, which selects per head). Then
:func:`place_rows` maps those per-row sets onto ``budget`` cells, and :func:`most_kept` sums
them up as one token set (for an event's hook).

Inputs are [R, T] over the T candidate cells (in cell-label order): each row's scores, the
position of the token the row holds there (``row_positions``; rows may differ), and the mass of
each row for AMS. A row is processed in its own position order, so segments are contiguous in
*its* text. Protected tokens sit in the same cells in every row (the engine keeps them in place),
so ``protected`` is [T] over cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np

from .ams import AMSParams
from .kernels import fill_holes, row_keep, rows_in_order, take_rows
from .mass import _ROW_KEY, RowsCreditState, row_evidence_mass, to_mass_rows


def _checked(
    row_scores: np.ndarray, budget: int, protected: np.ndarray, row_positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    s = np.asarray(row_scores, dtype=np.float64)
    pos = np.asarray(row_positions, dtype=np.int64)
    if s.ndim != 2 or pos.shape != s.shape:
        raise ValueError(f"row_scores and row_positions must both be [R, T], got {s.shape} and {pos.shape}")
    R, T = s.shape
    prot = np.asarray(protected, dtype=bool)
    if prot.shape != (T,):
        raise ValueError(f"protected must be [{T}], got shape {prot.shape}")
    keep = min(int(budget), T)
    if int(prot.sum()) > keep:
        raise ValueError(f"{int(prot.sum())} protected tokens exceed the budget {keep}")
    return np.where(np.isnan(s), -np.inf, s), prot, pos, keep


def _in_row_order(pos: np.ndarray) -> np.ndarray:
    """order: ``x[r, order[r]]`` is row r in its own position order."""
    return rows_in_order(np.ascontiguousarray(pos, dtype=np.int64))


def _in_cell_order(x_sorted: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_in_row_order`'s gather: ``out[r, order[r]] = x_sorted[r]``."""
    out = np.empty_like(x_sorted)
    np.put_along_axis(out, order, x_sorted, axis=1)
    return out


@dataclass
class RowTopKSelector:
    """Global top-k on every row alone: protected tokens, then the row's best scores (ties to the
    earlier position in that row). Stateless."""

    name: ClassVar[str] = "row-topk"

    def select_rows(
        self,
        row_scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        row_positions: np.ndarray,
        row_mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Kept mask [R, T], exactly min(budget, T) per row."""
        s, prot, pos, keep = _checked(row_scores, budget, protected, row_positions)
        R, T = s.shape
        order = _in_row_order(pos)
        key = np.where(prot[order], np.inf, np.take_along_axis(s, order, axis=1))
        best = np.argsort(-key, axis=1, kind="stable")[:, :keep]  # stable: ties to the earlier position
        kept_sorted = np.zeros((R, T), dtype=bool)
        np.put_along_axis(kept_sorted, best, True, axis=1)
        return _in_cell_order(kept_sorted, order)

    def reset(self) -> None:
        """Nothing to forget."""

    def remap_rows(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """Nothing is keyed by position."""

    def evidence_mass(self, attn: np.ndarray, n_queries: int, group: int, window_mask: np.ndarray) -> None:
        """Top-k segments by nothing."""
        return None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Nothing to restore."""


@dataclass
class RowAMSSelector:
    """AMS on every row alone (steps 2-5 with the row's own mass, credit, segments and quotas).

    The credit of a row is keyed by the positions *that row* holds, so each row keeps one
    :class:`.mass.CreditState`. ``row_mass=None`` (no evidence) segments every row by length.
    """

    params: AMSParams = field(default_factory=AMSParams)
    name: ClassVar[str] = "row-ams"

    def __post_init__(self) -> None:
        self.credit = RowsCreditState(self.params.credit_decay, self.params.credit_mix)

    def select_rows(
        self,
        row_scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        row_positions: np.ndarray,
        row_mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Kept mask [R, T], exactly min(budget, T) per row."""
        p = self.params
        s, prot, pos, keep = _checked(row_scores, budget, protected, row_positions)
        R, T = s.shape
        order = _in_row_order(pos)
        s_r = take_rows(np.ascontiguousarray(s), order)
        pos_r = take_rows(np.ascontiguousarray(pos), order)
        prot_r = np.ascontiguousarray(prot[order])
        if self.credit.rows not in (0, R):
            self.credit.reset()
        if row_mass is None:
            used = np.full((R, T), 1.0 / max(T, 1))
        else:
            m = np.nan_to_num(np.asarray(row_mass, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            if m.shape != (R, T):
                raise ValueError(f"row_mass must be [{R}, {T}], got shape {m.shape}")
            used = self.credit.mix(pos_r, to_mass_rows(take_rows(np.ascontiguousarray(m), order)))
        kept_r = row_keep(
            s_r,
            np.ascontiguousarray(used),
            prot_r,
            keep,
            float(p.segment_mass),
            int(p.min_seg_len),
            int(p.max_seg_len),
            int(p.min_keep_per_segment),
        )
        self.credit.keep(pos_r[kept_r].reshape(R, keep))  # each row keeps exactly ``keep``, ascending
        return _in_cell_order(kept_r, order)

    def reset(self) -> None:
        """Forget the credit (a new sequence)."""
        self.credit.reset()

    def remap_rows(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """Row r's token ``old_positions[r, i]`` now sits at ``new_positions[r, i]`` (compaction)."""
        if self.credit.rows:
            self.credit.remap(old_positions, new_positions)

    def evidence_mass(self, attn: np.ndarray, n_queries: int, group: int, window_mask: np.ndarray) -> np.ndarray:
        """The mass each row segments by: [R, T] (see :func:`.mass.row_evidence_mass`)."""
        return row_evidence_mass(attn, n_queries, group, window_mask, self.params.smooth)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The credit of every row, flattened (row lengths in ``credit_len``), for save files."""
        if not self.credit.rows:
            return {}
        rows = [self.credit.row(r) for r in range(self.credit.rows)]
        return {
            "credit_len": np.array([p.size for p, _ in rows], dtype=np.int64),
            "credit_pos": np.concatenate([p for p, _ in rows]).astype(np.int64),
            "credit_val": np.concatenate([c for _, c in rows]).astype(np.float64),
        }

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output."""
        self.credit.reset()
        if "credit_len" not in arrays:
            return
        lens = arrays["credit_len"].astype(np.int64)
        rows = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
        keys = rows * _ROW_KEY + arrays["credit_pos"].astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self.credit.rows = int(lens.size)
        self.credit.keys = keys[order]
        self.credit.credit = arrays["credit_val"].astype(np.float64)[order]


def most_kept(kept: np.ndarray, protected: np.ndarray, tie_scores: np.ndarray) -> np.ndarray:
    """[T] bool: one token set that sums up per-row sets ``kept`` [R, T] of B tokens each: the
    protected tokens, then the B - n_protected that the most rows keep (ties: higher ``tie_scores``
    [T], then the earlier token). What an event reports to its hook, as token mode does."""
    kept = np.asarray(kept, dtype=bool)
    prot = np.asarray(protected, dtype=bool)
    B = int(kept[0].sum()) if kept.shape[0] else 0
    votes = kept.sum(axis=0)
    s = np.nan_to_num(np.asarray(tie_scores, dtype=np.float64), nan=-np.inf)
    free = np.flatnonzero(~prot)
    return _protected_then(prot, free[np.lexsort((free, -s[free], -votes[free]))], B)


def _protected_then(protected: np.ndarray, ranked: np.ndarray, B: int) -> np.ndarray:
    """[T] bool: the protected tokens, then the first of ``ranked`` (unprotected indices), B in all."""
    out = protected.copy()
    out[ranked[: B - int(protected.sum())]] = True
    return out


def place_rows(
    kept: np.ndarray, protected: np.ndarray, row_positions: np.ndarray, cell_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Map per-row token sets onto cells: (dst [B] cell indices into T, src [R, B]).

    ``kept`` [R, T]: B tokens per row. The B destination cells are the protected ones, then the
    highest in the cache (``cell_index`` [T]: each candidate's KV cell; ties: the earlier
    candidate), so the freed cells are the lowest. Row r of destination ``dst[j]`` then takes the
    row of cell ``src[r, j]`` (-1: it already holds a token the row keeps). A row's kept tokens
    that sit in cells outside ``dst`` fill its free destinations in position order, so within a
    row the cell order follows the text wherever the row moved anything. Protected tokens never
    move.

    Why the highest cells: llama.cpp's CPU flash attention splits a decode's cells into one equal
    range per thread, and new tokens fill the lowest free cells. Freeing the lowest cells keeps
    those ranges as balanced as StreamingLLM's, which evicts the oldest tokens from the lowest
    cells. Keeping the cells most rows keep instead (the fewest moves) left one thread with ~20%
    more cells than the other: on SmolLM2 with 2 threads, TOVA+AMS's steps after an event took
    1.06x StreamingLLM's, and 1.00x with this placement (BENCHMARKS.md §9.4). The moves are
    byte copies: the placement changes no attention weight or value, only the order in which
    llama.cpp sums over the cells.
    """
    kept = np.asarray(kept, dtype=bool)
    R, T = kept.shape
    B = int(kept[0].sum()) if R else 0
    if (kept.sum(axis=1) != B).any():
        raise ValueError("every row must keep the same number of tokens")
    prot = np.asarray(protected, dtype=bool)
    if (~kept[:, prot]).any():
        raise ValueError("a row dropped a protected token")
    free = np.flatnonzero(~prot)
    in_dst = _protected_then(prot, free[np.argsort(-np.asarray(cell_index, dtype=np.int64)[free], kind="stable")], B)
    dst = np.flatnonzero(in_dst)
    slot_of = np.full(T, -1, dtype=np.int64)
    slot_of[dst] = np.arange(B)
    src = fill_holes(np.ascontiguousarray(kept), in_dst, np.ascontiguousarray(row_positions, dtype=np.int64), slot_of)
    return dst, src
