"""AMS selection (method steps 2-5): credit-steadied mass -> segments -> quotas -> top-k inside.

Adaptation to this runtime's protected tokens (the reference force-keeps ``n_sink`` = 4 first and
``always_keep_last`` = 32 last tokens after its segment top-k; here the engine passes those, and
any others it must keep, as ``protected``):

- protected tokens are always kept and never compete;
- the quota budget is ``B - n_protected``, shared over the unprotected tokens only: a segment's
  cap (and its minimum, min(min_keep_per_segment, cap)) is its number of unprotected tokens, and
  its proportional share follows the mass of its unprotected tokens, so the observation window
  (protected, and carrying the maximum evidence) does not draw quota it cannot use;
- each segment keeps its quota of highest scores among its unprotected tokens (ties: earlier
  position); if fewer than B are kept, the rest comes from the global ranking of what is left.

Segments are cut on the mass of *all* tokens, protected included, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np

from .kernels import allocate_quotas, segment_bounds, select_in_segments
from .mass import CreditState, evidence_mass
from .topk import prepare_inputs, prepare_positions


@dataclass
class AMSParams:
    """Reference defaults (its README example). ``n_sink`` = 4 and ``always_keep_last`` = 32 are
    not here: the engine applies them as ``protected``."""

    segment_mass: float = 0.02        # cut the cumulative mass at every multiple of this
    min_seg_len: int = 32             # shorter segments merge into the next
    max_seg_len: int = 1024           # longer segments are split
    min_keep_per_segment: int = 8     # every segment's guaranteed share (budget permitting)
    credit_decay: float = 0.8         # EMA decay of the credit
    credit_mix: float = 0.7           # weight of the current mass against the credit
    smooth: int = 5                   # moving-average width of the evidence (evidence_mass)

    def __post_init__(self) -> None:
        if not 1e-6 <= self.segment_mass <= 1.0:  # the cut loop runs 1 / segment_mass times
            raise ValueError(f"segment_mass must be in [1e-6, 1], got {self.segment_mass}")
        if not 1 <= self.min_seg_len <= self.max_seg_len:
            raise ValueError(f"need 1 <= min_seg_len <= max_seg_len, got "
                             f"{self.min_seg_len}, {self.max_seg_len}")
        if self.min_keep_per_segment < 0:
            raise ValueError(f"min_keep_per_segment must be >= 0, got {self.min_keep_per_segment}")
        if not 0.0 <= self.credit_decay < 1.0 or not 0.0 <= self.credit_mix <= 1.0:
            raise ValueError("need 0 <= credit_decay < 1 and 0 <= credit_mix <= 1")
        if self.smooth < 1:
            raise ValueError(f"smooth must be >= 1, got {self.smooth}")


@dataclass
class AMSSelector:
    """Adaptive Mass-Segmented selection; holds the EMA credit across events (one sequence).

    ``mass=None`` (no attention evidence) falls back to uniform mass, i.e. segments by length
    alone; the credit is then neither updated nor used, but still follows the kept tokens.
    After ``select`` the diagnostics ``last_segments`` (boundaries [0, ..., T] into the event's
    tokens), ``last_quotas`` and ``last_mass`` (the mass segmented by) describe that event.
    """

    params: AMSParams = field(default_factory=AMSParams)
    name: ClassVar[str] = "ams"

    def __post_init__(self) -> None:
        self.credit = CreditState(self.params.credit_decay, self.params.credit_mix)
        self.last_segments = np.zeros(1, dtype=np.int64)
        self.last_quotas = np.zeros(0, dtype=np.int64)
        self.last_mass = np.zeros(0)

    def evidence_mass(self, attn: np.ndarray, n_queries: int, group: int,
                      window_mask: np.ndarray) -> np.ndarray:
        """Step 1 with this selector's smoothing width; see :func:`.mass.evidence_mass`."""
        return evidence_mass(attn, n_queries, group, window_mask, self.params.smooth)

    def select(self, scores: np.ndarray, budget: int, protected: np.ndarray,
               positions: np.ndarray, mass: Optional[np.ndarray] = None) -> np.ndarray:
        """Sorted int64 indices of the kept tokens, exactly min(budget, T) of them."""
        p = self.params
        s, prot, keep = prepare_inputs(scores, budget, protected)
        T = s.shape[0]
        pos = prepare_positions(positions, T)
        if mass is None:
            used = np.full(T, 1.0 / max(T, 1))
        else:
            m = np.asarray(mass, dtype=np.float64)
            if m.shape != (T,):
                raise ValueError(f"mass must be [{T}], got shape {m.shape}")
            used = self.credit.mix(pos, np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0))
        if T == 0:
            self.last_segments, self.last_quotas = np.zeros(1, np.int64), np.zeros(0, np.int64)
            self.last_mass = used
            return np.zeros(0, dtype=np.int64)
        bounds = segment_bounds(used, float(p.segment_mass), int(p.min_seg_len), int(p.max_seg_len))
        free = ~prot
        caps = np.add.reduceat(free.astype(np.int64), bounds[:-1])
        seg_mass = np.add.reduceat(np.where(free, used, 0.0), bounds[:-1])
        quotas = allocate_quotas(seg_mass, caps, keep - int(prot.sum()), int(p.min_keep_per_segment))
        kept = np.flatnonzero(select_in_segments(bounds, quotas, s, prot, keep)).astype(np.int64)
        if kept.shape[0] != keep:  # the kernels guarantee it; a failure here is a bug, not input
            raise AssertionError(f"AMS kept {kept.shape[0]} tokens, budget {keep}")
        self.credit.keep(pos[kept])
        self.last_segments, self.last_quotas, self.last_mass = bounds, quotas, used
        return kept

    def reset(self) -> None:
        """Forget the credit (a new sequence)."""
        self.credit.reset()

    def remap_positions(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """The engine moved tokens ``old_positions[i]`` to ``new_positions[i]`` (compaction)."""
        self.credit.remap(old_positions, new_positions)
