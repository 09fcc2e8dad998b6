"""TOVA: keep what the last query attends to (Oren et al., 2024; kvpress ``TOVAPress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import require
from .base import NEEDS_ATTN, ScoreInput


@dataclass
class TOVA:
    """Score = attention probability of the last query, averaged over each KV group's heads.

    The original averages over *all* query heads into one score per token; here each
    (layer, KV head) row keeps its own mean and the engine's aggregation reduces the rows.
    """

    name: ClassVar[str] = "tova"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_ATTN})

    @property
    def window(self) -> int:
        return 1

    def score(self, inp: ScoreInput) -> np.ndarray:
        attn = require(inp, "attn_last", self.name, "attention of the last observed query")
        return np.asarray(attn, dtype=np.float64) / max(int(inp.group), 1)
