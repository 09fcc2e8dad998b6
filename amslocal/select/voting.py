"""Per-row AMS with voting: every (layer, KV head) row runs AMS on its own, rows vote per token.

llama.cpp evicts a token from all layers and KV heads at once, so one token set must serve every
row. :class:`.ams.AMSSelector` gets there by averaging first (one score and one mass curve per
token) and segmenting once; a head whose attention lives in a region the average calls cold then
loses that region. Here each row keeps what the reference (which works per layer and head) would
keep on that row: its own mass curve (steadied by its own credit), its own segments and quotas,
its own top-k inside segments on its own scores. A token's votes are the number of rows keeping
it, and the one token set is

- every protected token, then
- the ``budget - n_protected`` unprotected tokens with the most votes; ties go to the higher
  aggregated score (the ``scores`` [T] a plain AMS would use; NaN ranks last), then to the earlier
  position.

With one row this is :class:`.ams.AMSSelector` (that row keeps exactly ``budget`` tokens, all with
one vote), which is how :meth:`VotingAMSSelector.select` serves the one-score ``Selector`` protocol.
One caveat: the kernel sums a segment's mass in position order, AMSSelector with numpy's pairwise
``add.reduceat``; when a quota lands exactly on a rounding half (uniform mass, T not a power of
two) the last bit can round it the other way, so the two may differ by a token there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np

from .ams import AMSParams
from .kernels import row_votes
from .mass import RowCreditState, row_evidence_mass
from .topk import prepare_inputs, prepare_positions


def _rows(x: np.ndarray, T: int, what: str) -> np.ndarray:
    """[R, T] float64 view of ``x`` given as [T], [R, T] or [L, H, T] (R = L * H >= 1)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] != T:
        raise ValueError(f"{what} must end in [{T}], got shape {a.shape}")
    a = a.reshape(int(np.prod(a.shape[:-1])), T)  # not (-1, T): that is ambiguous when T == 0
    if a.shape[0] == 0:
        raise ValueError(f"{what} has no rows")
    return a


@dataclass
class VotingAMSSelector:
    """AMS per (layer, KV head) row, then a vote; holds one EMA credit row per row (one sequence).

    ``row_mass=None`` (no attention evidence) gives every row uniform mass, i.e. segments by length
    alone; the credit is then neither updated nor used, but still follows the kept tokens. After a
    selection ``last_votes`` [T] (int64, protected tokens get R) and ``last_mass`` [R, T] (the mass
    each row segmented by) describe that event.
    """

    params: AMSParams = field(default_factory=AMSParams)
    name: ClassVar[str] = "ams-vote"

    def __post_init__(self) -> None:
        self.credit = RowCreditState(self.params.credit_decay, self.params.credit_mix)
        self.last_votes = np.zeros(0, dtype=np.int64)
        self.last_mass = np.zeros((0, 0))

    def row_evidence_mass(self, attn: np.ndarray, n_queries: int, group: int, window_mask: np.ndarray) -> np.ndarray:
        """Step 1 per row with this selector's smoothing width; see :func:`.mass.row_evidence_mass`."""
        return row_evidence_mass(attn, n_queries, group, window_mask, self.params.smooth)

    def evidence_mass(self, attn: np.ndarray, n_queries: int, group: int, window_mask: np.ndarray) -> np.ndarray:
        """The mass this selector segments by: one curve per (layer, KV head) row, [R, T]."""
        return self.row_evidence_mass(attn, n_queries, group, window_mask)

    def select_event(
        self,
        row_scores: np.ndarray,
        scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        positions: np.ndarray,
        mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """:meth:`select_rows` (the engine's one call per event)."""
        return self.select_rows(row_scores, scores, budget, protected, positions, mass)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The credit rows, keyed by position (save files)."""
        return self.credit.state_dict()

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        self.credit.load_state_dict(arrays)

    def select_rows(
        self,
        row_scores: np.ndarray,
        scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        positions: np.ndarray,
        row_mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Sorted int64 indices of the kept tokens, exactly min(budget, T) of them.

        ``row_scores`` and ``row_mass`` are [R, T] (or [L, H, T]); either may have a single row,
        which then serves every row of the other (one score curve segmented by R mass curves, or R
        score curves on one mass curve). ``scores`` [T] is the aggregated score that breaks ties.
        """
        p = self.params
        s, prot, keep = prepare_inputs(scores, budget, protected)
        T = s.shape[0]
        pos = prepare_positions(positions, T)
        rs = _rows(row_scores, T, "row_scores")
        rs = np.where(np.isnan(rs), -np.inf, rs)  # as prepare_inputs: NaN ranks last in its row
        if row_mass is None:
            used = np.full((rs.shape[0], T), 1.0 / max(T, 1))
        else:
            m = _rows(row_mass, T, "row_mass")
            if rs.shape[0] != m.shape[0] and 1 not in (rs.shape[0], m.shape[0]):
                raise ValueError(f"row_scores has {rs.shape[0]} rows, row_mass {m.shape[0]}")
            used = self.credit.mix(pos, np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0))
        R = max(rs.shape[0], used.shape[0])
        # the kernel wants contiguous [R, T] of both; broadcast the one-row side
        rs = np.ascontiguousarray(np.broadcast_to(rs, (R, T)))
        used_rows = np.ascontiguousarray(np.broadcast_to(used, (R, T)))
        votes = row_votes(
            rs,
            used_rows,
            prot,
            keep,
            float(p.segment_mass),
            int(p.min_seg_len),
            int(p.max_seg_len),
            int(p.min_keep_per_segment),
        )
        kept_mask = prot.copy()
        free = np.flatnonzero(~prot)
        # most votes first, then higher aggregated score, then earlier position: exact, no floats
        # mixed into the vote count, and the position key makes the order total (deterministic)
        order = np.lexsort((free, -s[free], -votes[free]))
        kept_mask[free[order[: keep - int(prot.sum())]]] = True
        kept = np.flatnonzero(kept_mask).astype(np.int64)
        if kept.shape[0] != keep:  # prepare_inputs guarantees n_protected <= keep: a bug if not
            raise AssertionError(f"AMS voting kept {kept.shape[0]} tokens, budget {keep}")
        self.credit.keep(pos[kept])
        self.last_votes, self.last_mass = votes, used_rows
        return kept

    def select(
        self,
        scores: np.ndarray,
        budget: int,
        protected: np.ndarray,
        positions: np.ndarray,
        mass: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The ``Selector`` protocol: one score and one mass curve per token, i.e. one row (R = 1),
        which selects as :class:`.ams.AMSSelector` does."""
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 1:
            raise ValueError(f"scores must be [T], got shape {s.shape}")
        m = None if mass is None else np.asarray(mass, dtype=np.float64)
        if m is not None and m.shape != s.shape:
            raise ValueError(f"mass must be [{s.shape[0]}], got shape {m.shape}")
        return self.select_rows(s[None], s, budget, protected, positions, None if m is None else m[None])

    def reset(self) -> None:
        """Forget the credit (a new sequence)."""
        self.credit.reset()

    def remap_positions(self, old_positions: np.ndarray, new_positions: np.ndarray) -> None:
        """The engine moved tokens ``old_positions[i]`` to ``new_positions[i]`` (compaction)."""
        self.credit.remap(old_positions, new_positions)
