"""Region wipe-out: did a compression event erase whole regions of the context?

At every event the cached tokens are cut into mass segments exactly as AMS cuts them (step 1
evidence mass over the event's observation window, step 3 segment bounds, reference defaults) but
from the event's own mass, without AMS's credit — the credit belongs to one selector's history,
and the yardstick must be the same for global top-k and AMS. Two numbers per event:

- ``wiped_frac``: the fraction of segments left with zero kept tokens;
- ``longest_run``: the longest run of consecutive cached tokens that were all evicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..scorers.base import ScoreInput
from ..select.ams import AMSParams, AMSSelector
from ..select.kernels import segment_bounds


def longest_false_run(mask: np.ndarray) -> int:
    """Length of the longest run of False in a boolean vector."""
    m = np.concatenate([[True], np.asarray(mask, dtype=bool), [True]])
    trues = np.flatnonzero(m)
    return int(np.max(np.diff(trues)) - 1) if trues.size > 1 else 0


def wiped_segments(bounds: np.ndarray, kept: np.ndarray) -> tuple[int, int]:
    """(segments with zero kept tokens, segments) for boundaries [0, ..., T]."""
    bounds = np.asarray(bounds, dtype=np.int64)
    if bounds.size < 2:
        return 0, 0
    kept_per_segment = np.add.reduceat(np.asarray(kept, dtype=np.int64), bounds[:-1])
    return int((kept_per_segment == 0).sum()), int(bounds.size - 1)


def event_mass(inp: ScoreInput, window: int, group: int, params: AMSParams = AMSParams()) -> Optional[np.ndarray]:
    """The event's attention mass [T] as AMS step 1 computes it (over the mass window's evidence,
    whatever the scorer's window); None without that evidence."""
    if inp.mass_attn is None or inp.mass_queries <= 0:
        return None
    T = inp.mass_attn.shape[-1]
    window_mask = np.zeros(T, dtype=bool)
    window_mask[max(0, T - window) :] = True
    # the reference AMS's own step 1 (one mass curve), whatever selector the session ran
    return AMSSelector(params).evidence_mass(inp.mass_attn, inp.mass_queries, group, window_mask)


@dataclass
class WipeoutRecorder:
    """Collects the per-event metric from a session's ``on_compress`` hook; optionally keeps the
    whole event (positions, kept mask, mass, segments) for an eviction map."""

    window: int
    group: int
    keep_events: bool = False
    params: AMSParams = field(default_factory=AMSParams)
    wiped_frac: list[float] = field(default_factory=list)
    longest_run: list[int] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    step: int = 0  # positions generated so far, set by the caller (for the map)

    def __call__(self, positions: np.ndarray, kept: np.ndarray, inp: ScoreInput) -> None:
        mass = event_mass(inp, self.window, self.group, self.params)
        bounds = None
        if mass is not None:
            p = self.params
            bounds = segment_bounds(mass, float(p.segment_mass), int(p.min_seg_len), int(p.max_seg_len))
            wiped, n_seg = wiped_segments(bounds, kept)
            self.wiped_frac.append(wiped / n_seg if n_seg else 0.0)
        self.longest_run.append(longest_false_run(kept))
        if self.keep_events:
            self.events.append(
                {
                    "positions": positions.astype(int).tolist(),
                    "kept": kept.astype(bool).tolist(),
                    "mass": None if mass is None else np.round(mass, 6).tolist(),
                    "bounds": None if bounds is None else bounds.astype(int).tolist(),
                    "step": int(positions.max()) + 1 if positions.size else 0,
                }
            )

    def summary(self) -> dict:
        """Per-item aggregate: events, mean/max wiped fraction, mean/max longest evicted run."""
        w, r = self.wiped_frac, self.longest_run
        return {
            "events": len(r),
            "wiped_frac_mean": float(np.mean(w)) if w else None,
            "wiped_frac_max": float(np.max(w)) if w else None,
            "events_with_wipeout": int(sum(x > 0 for x in w)),
            "longest_run_mean": float(np.mean(r)) if r else None,
            "longest_run_max": int(np.max(r)) if r else None,
        }
