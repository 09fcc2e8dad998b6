"""H2O: heavy hitters, attention accumulated over every query (Zhang et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import require
from .base import NEEDS_ATTN_EVERY_STEP, ScoreInput


@dataclass
class H2O:
    """Score = attention received from every query since the token entered, averaged over each
    KV group's heads. The recent window is protected by the engine.

    ``normalize=False`` (the original) keeps the raw accumulated sum, which favours old tokens
    (they have been seen by more queries). ``normalize=True`` divides by the number of queries
    that could see the token, taken as ``next_position - position`` (exact while positions are
    dense and every step is observed; after compaction it counts tokens after it, not steps).
    """

    normalize: bool = False

    name: ClassVar[str] = "h2o"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_ATTN_EVERY_STEP})

    @property
    def window(self) -> int:
        return 1

    def score(self, inp: ScoreInput) -> np.ndarray:
        total = require(inp, "attn_total", self.name, "attention accumulated over every query")
        s = np.asarray(total, dtype=np.float64) / max(int(inp.group), 1)
        if self.normalize:
            seen = np.maximum(int(inp.next_position) - np.asarray(inp.token_positions(), dtype=np.int64), 1)
            s = s / seen
        return s
