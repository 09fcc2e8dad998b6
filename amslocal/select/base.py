"""Selection: from per-token scores to the set of tokens a compression event keeps.

A selector composes with any scorer: it sees one score per token (after aggregation over layers
and heads), optionally one attention mass per token (AMS segments by it), the budget, and which
tokens are protected. It returns the kept indices, sorted, exactly ``min(budget, T)`` of them,
protected ones included.

Selectors that hold state across events (AMS) evict it along with the tokens they drop; when
the engine compacts positions it must call ``remap_positions`` before the next event.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np


class Selector(Protocol):
    name: str

    def select(
        self,
        scores: np.ndarray,  # [T] float64, higher = keep
        budget: int,
        protected: np.ndarray,  # [T] bool, must be kept (count <= budget)
        positions: np.ndarray,  # [T] int64 ascending, identifies tokens across events
        mass: Optional[np.ndarray] = None,  # [T] float64 >= 0, attention mass per token
    ) -> np.ndarray:  # [min(budget, T)] int64 indices into [0, T), ascending
        ...

    # A selector may keep state keyed by position across events (AMS keeps attention credit).
    # The engine tells it when the sequence starts over, and when compaction moves tokens.

    def reset(self) -> None:
        """Forget all per-sequence state."""
        ...

    def remap_positions(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """Tokens at ``old_positions[i]`` now sit at ``new_positions[i]`` (same tokens)."""
        ...
