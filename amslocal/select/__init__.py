"""Selection: which tokens a compression event keeps (global top-k, AMS over any scorer, or AMS
per (layer, KV head) row with a vote per token).

Also the helpers around it: :func:`aggregate` (scores [L, H, T] -> [T]), :func:`evidence_mass`
(attention -> mass [T]), :func:`row_evidence_mass` (attention -> mass per row [L*H, T]) and the
Numba kernels in :mod:`.kernels`.
"""

from __future__ import annotations

from typing import Any

from .aggregate import AGGREGATIONS, aggregate
from .ams import AMSParams, AMSSelector
from .base import Selector
from .mass import CreditState, RowCreditState, evidence_mass, row_evidence_mass, to_mass
from .rows import RowAMSSelector, RowTopKSelector, place_rows
from .topk import TopKSelector
from .voting import VotingAMSSelector

SELECTORS = ("topk", "ams", "ams-vote", "row-topk", "row-ams")


def make_selector(name: str, **params: Any) -> Selector:
    """A selector by name: ``"topk"`` and ``"row-topk"`` (no parameters), ``"ams"``, ``"ams-vote"``
    and ``"row-ams"`` (fields of :class:`AMSParams`)."""
    if name == "topk":
        if params:
            raise ValueError(f"topk takes no parameters, got {sorted(params)}")
        return TopKSelector()
    if name == "ams":
        variant = params.pop("mass_variant", "mean")
        return AMSSelector(AMSParams(**params), mass_variant=variant)
    if name == "ams-vote":
        return VotingAMSSelector(AMSParams(**params))
    # per-row token sets (granularity layer / head): ``select_rows`` gives a kept mask per row
    if name == "row-topk":
        if params:
            raise ValueError(f"row-topk takes no parameters, got {sorted(params)}")
        return RowTopKSelector()
    if name == "row-ams":
        return RowAMSSelector(AMSParams(**params))
    raise ValueError(f"unknown selector {name!r}; expected one of {SELECTORS}")


__all__ = [
    "AGGREGATIONS",
    "AMSParams",
    "AMSSelector",
    "CreditState",
    "RowAMSSelector",
    "RowCreditState",
    "RowTopKSelector",
    "SELECTORS",
    "place_rows",
    "Selector",
    "TopKSelector",
    "VotingAMSSelector",
    "aggregate",
    "evidence_mass",
    "make_selector",
    "row_evidence_mass",
    "to_mass",
]
