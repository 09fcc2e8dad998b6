"""Scorers: one file per method, each a dataclass with one ``score(ScoreInput) -> [L, H_kv, T]``.

``SCORERS`` maps each scorer's ``name`` to its class; :func:`make_scorer` builds one by name with
hyperparameters as keyword arguments. Selection never lives here (see :mod:`amslocal.select`).
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import UnknownScorerError
from .base import (
    NEEDS_ATTN,
    NEEDS_ATTN_EVERY_STEP,
    NEEDS_CALIBRATION,
    NEEDS_KEYS,
    NEEDS_QUERIES,
    NEEDS_VALUES,
    ScoreInput,
    Scorer,
)
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .rkv import RKV
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA
from .triattention import TriAttention, calibration_stats, load_calibration, save_calibration

SCORERS: dict[str, type] = {
    cls.name: cls for cls in (TOVA, SnapKV, H2O, StreamingLLM, KeyDiff, ExpectedAttention, RKV, TriAttention)
}


def make_scorer(name: str, **params) -> Scorer:
    """The scorer registered as ``name`` with hyperparameters ``params`` (ValueError if unknown)."""
    cls = SCORERS.get(name)
    if cls is None:
        raise UnknownScorerError(f"unknown scorer {name!r}; choices: {', '.join(sorted(SCORERS))}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"scorer {name!r} has no parameter {', '.join(unknown)}; parameters: {', '.join(sorted(known)) or '(none)'}"
        )
    return cls(**params)


__all__ = [
    "SCORERS",
    "make_scorer",
    "Scorer",
    "ScoreInput",
    "NEEDS_ATTN",
    "NEEDS_ATTN_EVERY_STEP",
    "NEEDS_KEYS",
    "NEEDS_VALUES",
    "NEEDS_QUERIES",
    "NEEDS_CALIBRATION",
    "TOVA",
    "SnapKV",
    "H2O",
    "StreamingLLM",
    "KeyDiff",
    "ExpectedAttention",
    "RKV",
    "TriAttention",
    "calibration_stats",
    "save_calibration",
    "load_calibration",
]
