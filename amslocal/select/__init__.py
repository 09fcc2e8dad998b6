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
from .topk import TopKSelector
from .voting import VotingAMSSelector

SELECTORS = ("topk", "ams", "ams-vote")


def make_selector(name: str, **params: Any) -> Selector:
    """A selector by name: ``"topk"`` (no parameters), ``"ams"`` or ``"ams-vote"`` (fields of
    :class:`AMSParams`)."""
    if name == "topk":
        if params:
            raise ValueError(f"topk takes no parameters, got {sorted(params)}")
        return TopKSelector()
    if name == "ams":
        return AMSSelector(AMSParams(**params))
    if name == "ams-vote":
        return VotingAMSSelector(AMSParams(**params))
    raise ValueError(f"unknown selector {name!r}; expected one of {SELECTORS}")


__all__ = [
    "AGGREGATIONS", "AMSParams", "AMSSelector", "CreditState", "RowCreditState", "SELECTORS",
    "Selector", "TopKSelector", "VotingAMSSelector", "aggregate", "evidence_mass", "make_selector",
    "row_evidence_mass", "to_mass",
]
