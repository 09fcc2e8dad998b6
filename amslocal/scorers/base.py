"""The common input of every scorer, and the scorer protocol.

A scorer looks at the candidate tokens of one compression event (every occupied cell of the
full-attention cache, in position order) and returns one score per (layer, KV head, token):
higher = keep. It never selects; selection lives in :mod:`amslocal.select` and composes with any
scorer. It never calls llama.cpp; the engine fills :class:`ScoreInput` from the cache view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Protocol

import numpy as np

from ..layers import LayerInfo

# what a scorer can ask the engine to collect
NEEDS_ATTN = "attn"  # evidence of the last `window` queries before the event
NEEDS_ATTN_EVERY_STEP = "attn_every_step"  # evidence of every query since the token entered (H2O)
NEEDS_KEYS = "keys"
NEEDS_VALUES = "values"
NEEDS_QUERIES = "queries"  # the last `window` queries themselves (post-RoPE)
NEEDS_CALIBRATION = "calibration"  # per-model statistics from `amslocal calibrate`


@dataclass
class ScoreInput:
    """Everything a scorer may use, for T candidate tokens and L layers.

    Layer axes index ``layers`` (the KV layers of the full-attention cache), not model layer ids.
    Attention arrays hold probability mass **summed** over the observed queries and over the
    ``group`` query heads of each KV head; divide by ``n_queries * group`` for a mean probability.
    """

    positions: np.ndarray  # [T] int64, ascending
    cells: np.ndarray  # [T] int32, the KV cell of each token
    layers: list[LayerInfo]  # [L]
    group: int  # query heads per KV head
    next_position: int  # position the next token will take
    attn: Optional[np.ndarray] = None  # [L, H_kv, T] over the last n_queries queries
    n_queries: int = 0
    attn_last: Optional[np.ndarray] = None  # [L, H_kv, T] the last observed query alone
    # over the last mass_queries (32) queries: what AMS and the diagnostics segment by; a scorer
    # never reads it (its own window is ``attn``), so adding AMS does not change a score
    mass_attn: Optional[np.ndarray] = None  # [L, H_kv, T]
    mass_queries: int = 0
    attn_total: Optional[np.ndarray] = None  # [L, H_kv, T] every query since each token entered
    queries: Optional[list[np.ndarray]] = None  # [L] of [W, n_head, d], post-RoPE
    query_positions: Optional[np.ndarray] = None  # [W]
    keys: Optional[Callable[[int], np.ndarray]] = None  # l -> [T, H_kv, d] post-RoPE keys
    values: Optional[Callable[[int], np.ndarray]] = None  # l -> [T, H_kv, d_v]
    calibration: Optional[dict] = None
    # per-row token sets (granularity layer/head): the position of the token each (layer, KV head)
    # row holds in each cell; ``positions`` are then the cells' labels (their order). None when
    # every row holds the cell's own token. A scorer that reads positions per row uses
    # :meth:`token_positions`.
    row_positions: Optional[np.ndarray] = None  # [L, H_kv, T] int64
    extra: dict = field(default_factory=dict)

    def token_positions(self) -> np.ndarray:
        """Positions of the scored tokens: [L, H_kv, T] with per-row token sets, else [T]."""
        return self.positions if self.row_positions is None else self.row_positions

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])


class Scorer(Protocol):
    """One scoring function over :class:`ScoreInput`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    window: int  # observed queries needed before an event (0 = none)

    def score(self, inp: ScoreInput) -> np.ndarray:
        """[L, H_kv, T] scores, higher = keep ([1, 1, T] for scorers that ignore layers)."""
        ...
