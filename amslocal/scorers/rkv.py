"""R-KV: attention minus redundancy, for reasoning traces (Cai et al., 2025; github Zefan-Cai/R-KV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import mean_attention, require, softmax_rows
from .base import NEEDS_ATTN, NEEDS_KEYS, ScoreInput
from .kernels import f64, max_pool_rows, mean_cos_redundancy


@dataclass
class RKV:
    """Score = ``mix_lambda * A_j - (1 - mix_lambda) * R_j`` per (layer, KV head).

    - ``A``: mean attention probability of the last ``window`` queries (over queries and the KV
      group's heads), max-pooled along tokens with ``kernel_size``. The reference takes the max
      of the group's *logits* before one softmax; the engine observes probabilities, so this uses
      their group mean.
    - ``R``: softmax over tokens of each key's cosine similarity to the other keys, summed and
      divided by T (the reference's column mean with a zeroed diagonal). ``retain_last=True``
      adds the reference's "keep the newest near-duplicate" rule (see
      :func:`kernels.mean_cos_redundancy`); off by default, as the method note's formula.

    ``mix_lambda`` is 0.1 as in the paper; the reference code's default is 0.07. The last
    ``window`` tokens are protected by the engine.
    """

    window: int = 8
    kernel_size: int = 7
    mix_lambda: float = 0.1
    retain_last: bool = False
    threshold: float = 0.5

    name: ClassVar[str] = "rkv"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_ATTN, NEEDS_KEYS})

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"rkv window must be >= 1, got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"rkv kernel_size must be odd and >= 1, got {self.kernel_size}")

    def score(self, inp: ScoreInput) -> np.ndarray:
        attn = mean_attention(inp, require(inp, "attn", self.name, f"attention of the last {self.window} queries"))
        keys = require(inp, "keys", self.name, "post-RoPE keys per layer")
        L, H, T = attn.shape
        a = max_pool_rows(f64(attn.reshape(L * H, T)), self.kernel_size).reshape(L, H, T)
        r = np.stack(
            [softmax_rows(mean_cos_redundancy(f64(keys(l)), self.retain_last, self.threshold)) for l in range(L)]
        )
        return self.mix_lambda * a - (1.0 - self.mix_lambda) * r
