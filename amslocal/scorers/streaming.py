"""StreamingLLM: attention sinks + the most recent tokens (Xiao et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import ScoreInput


@dataclass
class StreamingLLM:
    """Score = position (newer = higher); the first ``n_sink`` candidates (the oldest tokens in
    the cache) score above every other token. Returns [1, 1, T].

    Sinks get ``max(position) + 1`` rather than +inf so the scores stay finite for any
    aggregation or normalisation downstream; the ranking is the same.
    """

    n_sink: int = 4

    name: ClassVar[str] = "streaming"
    needs: ClassVar[frozenset[str]] = frozenset()

    @property
    def window(self) -> int:
        return 0

    def score(self, inp: ScoreInput) -> np.ndarray:
        s = np.asarray(inp.token_positions(), dtype=np.float64).copy()
        if s.size:
            s[..., : self.n_sink] = s.max() + 1.0  # the first cells hold the sinks in every row
        return s.reshape((1, 1, -1) if s.ndim == 1 else s.shape)
