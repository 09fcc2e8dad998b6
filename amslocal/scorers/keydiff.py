"""KeyDiff: keep keys least like the average key (Park et al., 2025; kvpress ``KeyDiffPress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import require
from .base import NEEDS_KEYS, ScoreInput
from .kernels import cos_to_mean_direction, f64


@dataclass
class KeyDiff:
    """Score = -cos(k_j, mean direction of the head's normalised keys), per (layer, KV head),
    on the keys as stored (post-RoPE)."""

    name: ClassVar[str] = "keydiff"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_KEYS})

    @property
    def window(self) -> int:
        return 0

    def score(self, inp: ScoreInput) -> np.ndarray:
        keys = require(inp, "keys", self.name, "post-RoPE keys per layer")
        return np.stack([-cos_to_mean_direction(f64(keys(l))) for l in range(len(inp.layers))])
