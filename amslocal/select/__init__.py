"""Selection: which tokens a compression event keeps (global top-k, or AMS over any scorer).

Also the helpers around it: :func:`aggregate` (scores [L, H, T] -> [T]), :func:`evidence_mass`
(attention -> mass [T]) and the Numba kernels in :mod:`.kernels`.
"""

from __future__ import annotations

from typing import Any

from .aggregate import AGGREGATIONS, aggregate
from .ams import AMSParams, AMSSelector
from .base import Selector
from .mass import CreditState, evidence_mass, to_mass
from .topk import TopKSelector

SELECTORS = ("topk", "ams")


def make_selector(name: str, **params: Any) -> Selector:
    """A selector by name: ``"topk"`` (no parameters) or ``"ams"`` (fields of :class:`AMSParams`)."""
    if name == "topk":
        if params:
            raise ValueError(f"topk takes no parameters, got {sorted(params)}")
        return TopKSelector()
    if name == "ams":
        return AMSSelector(AMSParams(**params))
    raise ValueError(f"unknown selector {name!r}; expected one of {SELECTORS}")


__all__ = [
    "AGGREGATIONS", "AMSParams", "AMSSelector", "CreditState", "SELECTORS", "Selector",
    "TopKSelector", "aggregate", "evidence_mass", "make_selector", "to_mass",
]
