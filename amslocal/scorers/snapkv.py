"""SnapKV: attention of the last W queries, smoothed (Li et al., 2024; kvpress ``SnapKVPress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import mean_attention, require
from .base import NEEDS_ATTN, ScoreInput
from .kernels import avg_pool_rows, f64


@dataclass
class SnapKV:
    """Score = mean attention probability of the last ``window`` queries (over queries and each
    KV group's heads), average-pooled along tokens with ``kernel_size`` (zero-padded edges, as
    torch ``avg_pool1d``). The recent window itself is protected by the engine."""

    window: int = 32
    kernel_size: int = 5

    name: ClassVar[str] = "snapkv"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_ATTN})

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"snapkv window must be >= 1, got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv kernel_size must be odd and >= 1, got {self.kernel_size}")

    def score(self, inp: ScoreInput) -> np.ndarray:
        attn = mean_attention(inp, require(inp, "attn", self.name, f"attention of the last {self.window} queries"))
        L, H, T = attn.shape
        return avg_pool_rows(f64(attn.reshape(L * H, T)), self.kernel_size).reshape(L, H, T)
