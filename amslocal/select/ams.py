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

from ..config import AMSParams  # defined with the other parameters; re-exported here
from .kernels import allocate_quotas, segment_bounds, select_in_segments
from .mass import CreditState, evidence_mass, peaked_mass, row_evidence_mass
from .topk import prepare_inputs, prepare_positions


@dataclass
class AMSSelector:
    """Adaptive Mass-Segmented selection; holds the EMA credit across events (one sequence).

    ``mass=None`` (no attention evidence) falls back to uniform mass, i.e. segments by length
    alone; the credit is then neither updated nor used, but still follows the kept tokens.
    After ``select`` the diagnostics ``last_segments`` (boundaries [0, ..., T] into the event's
    tokens), ``last_quotas`` and ``last_mass`` (the mass segmented by) describe that event.
    """

    params: AMSParams = field(default_factory=AMSParams)
    # the mass it segments by: "mean" (one curve, the rows' average) or "peaked" (rows weighted
    # by how peaked their attention is)
    mass_variant: str = "mean"
    name: ClassVar[str] = "ams"

    def __post_init__(self) -> None:
        if self.mass_variant not in ("mean", "peaked"):
            raise ValueError(f"mass_variant must be mean or peaked, got {self.mass_variant!r}")
        self.credit = CreditState(self.params.credit_decay, self.params.credit_mix)
        self.last_segments = np.zeros(1, dtype=np.int64)
        self.last_quotas = np.zeros(0, dtype=np.int64)
        self.last_mass = np.zeros(0)

    def evidence_mass(self, attn: np.ndarray, n_queries: int, group: int, window_mask: np.ndarray) -> np.ndarray:
        """Step 1 with this selector's smoothing width: the mass [T] this selector segments by
        (see :func:`.mass.evidence_mass` and :func:`.mass.peaked_mass`)."""
        if self.mass_variant == "peaked":
            return peaked_mass(row_evidence_mass(attn, n_queries, group, window_mask, self.params.smooth))
        return evidence_mass(attn, n_queries, group, window_mask, self.params.smooth)

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
        """The credit, keyed by position (save files)."""
        return self.credit.state_dict()

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        self.credit.load_state_dict(arrays)

    def select(
        self,
        scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        positions: np.ndarray,
        mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
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
