"""Global top-k: keep the protected tokens and the best-scored of the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from .kernels import select_in_segments


def prepare_inputs(
    scores: np.ndarray, budget: int, protected: Optional[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Checked (scores float64 with NaN -> -inf, protected bool, kept count min(budget, T))."""
    s = np.ascontiguousarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be [T], got shape {s.shape}")
    T = s.shape[0]
    s = np.where(np.isnan(s), -np.inf, s)  # a NaN score ranks last instead of breaking the sort
    prot = np.zeros(T, dtype=np.bool_) if protected is None else np.ascontiguousarray(protected, dtype=np.bool_)
    if prot.shape != (T,):
        raise ValueError(f"protected must be [{T}], got shape {prot.shape}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    keep = min(int(budget), T)
    n_prot = int(prot.sum())
    if n_prot > keep:
        raise ValueError(f"{n_prot} protected tokens exceed the budget {keep}")
    return s, prot, keep


def prepare_positions(positions: np.ndarray, T: int) -> np.ndarray:
    """Checked contiguous int64 positions [T] (a selector keyed by position)."""
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    if pos.shape != (T,):
        raise ValueError(f"positions must be [{T}], got shape {pos.shape}")
    return pos


@dataclass
class TopKSelector:
    """Keep all protected tokens, fill the budget with the highest scores among the others.

    Ties go to the earlier position, so the result is deterministic. Stateless.
    """

    name: ClassVar[str] = "topk"

    def select(
        self,
        scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        positions: np.ndarray,
        mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Sorted int64 indices of the kept tokens, exactly min(budget, T) of them."""
        s, prot, keep = prepare_inputs(scores, budget, protected)
        bounds = np.array([0, s.shape[0]], dtype=np.int64)
        quotas = np.array([keep - int(prot.sum())], dtype=np.int64)
        return np.flatnonzero(select_in_segments(bounds, quotas, s, prot, keep)).astype(np.int64)

    def reset(self) -> None:
        """Nothing to forget."""

    def evidence_mass(self, attn: np.ndarray, n_queries: int, group: int, window_mask: np.ndarray) -> None:
        """Top-k segments by nothing."""
        return None

    def select_event(
        self,
        row_scores: np.ndarray,
        scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        positions: np.ndarray,
        mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """:meth:`select` on the aggregated scores (the engine's one call per event)."""
        return self.select(scores, budget, protected, positions, mass)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Nothing to restore."""

    def remap_positions(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """Nothing is keyed by position."""
