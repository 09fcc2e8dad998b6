"""The methods a benchmark compares, by name.

``full`` is the whole cache (the reference); ``context-shift`` is llama.cpp's own answer to a full
context (keep ``n_keep`` first tokens, drop half of the rest, shift); ``S`` is scorer S with global
top-k selection; ``ams-S`` is scorer S under AMS (one mass curve, the row average), ``peak-S``
under AMS on a mass curve weighted to the peaked rows, ``vote-S`` under per-row AMS with voting.
``streaming`` is StreamingLLM (sink + recent). A suffix ``@layer`` or ``@head`` gives the method one
token set per layer or per (layer, KV head) row instead of one for every row (``tova@head``,
``ams-tova@head``; ``@token`` is the default and is left out of names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import OptionError
from ..scorers import SCORERS

BASELINES = ("full", "context-shift")
VARIANT_PREFIXES = {"ams": "mean", "peak": "peaked", "vote": "vote"}  # method name prefix -> AMS variant
GRANULARITY_SUFFIXES = ("token", "layer", "head")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full" | "context-shift" | "session"
    scorer: Optional[str] = None
    ams: bool = False
    variant: str = "mean"  # AMS variant: mean | peaked | vote
    granularity: str = "token"  # token | layer | head

    @property
    def compresses(self) -> bool:
        return self.kind != "full"

    @property
    def topk_twin(self) -> Optional[str]:
        """The same scorer with the other selector ("ams-tova" <-> "tova")."""
        if self.kind != "session":
            return None
        at = "" if self.granularity == "token" else f"@{self.granularity}"
        return f"{self.scorer}{at}" if self.ams else f"ams-{self.scorer}{at}"

    @property
    def config(self) -> dict:
        """The CompressionConfig fields this method sets."""
        return {"scorer": self.scorer, "ams": self.ams, "ams_variant": self.variant, "granularity": self.granularity}


def parse_method(name: str) -> Method:
    full_name = name = name.strip().lower()
    if name in BASELINES:
        return Method(name, name)
    name, at, granularity = name.partition("@")
    if at and granularity not in GRANULARITY_SUFFIXES:
        raise OptionError(
            f"unknown granularity '@{granularity}' in method '{full_name}' "
            f"(known: {', '.join('@' + g for g in GRANULARITY_SUFFIXES)})"
        )
    granularity = granularity or "token"
    if granularity == "token":
        full_name = name
    elif name.partition("-")[0] in ("peak", "vote"):
        raise OptionError(
            f"method '{full_name}': with one token set per row, AMS runs per row already; use ams-S@{granularity}"
        )
    prefix, _, rest = name.partition("-")
    variant = VARIANT_PREFIXES.get(prefix) if rest else None
    scorer, ams = (rest, True) if variant else (name, False)
    if scorer not in SCORERS:
        known = ", ".join(list(BASELINES) + list(SCORERS) + [f"{p}-S" for p in VARIANT_PREFIXES])
        raise OptionError(f"unknown method '{name}' (known: {known}, S a scorer)")
    return Method(full_name, "session", scorer, ams, variant or "mean", granularity)


def parse_methods(spec: str) -> list[Method]:
    """``"full,context-shift,tova,ams-tova"``; ``all`` expands to every method; order kept, no repeats."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            names += list(BASELINES) + [m for s in SCORERS for m in (s, f"ams-{s}")]
        else:
            names.append(part)
    methods: list[Method] = []
    for n in names:
        m = parse_method(n)
        if m not in methods:
            methods.append(m)
    if not methods:
        raise OptionError("no methods given")
    return methods
