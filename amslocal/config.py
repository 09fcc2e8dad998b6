"""Configuration, defined once and validated once: no backend import, so every floor can use it.

- :class:`CompressionConfig`: how a session keeps its cache bounded; :meth:`CompressionConfig.validate`
  is the one check every front-end calls (as kvpress presses check themselves in ``__post_init__``,
  but here explicitly, because a front-end first learns the model's trained context).
- :func:`check_budget`: the budget's own rules (a whole positive number of tokens, above the
  always-kept tokens, within the trained context).
- :class:`AMSParams`: the AMS selector's parameters (checked when made).
- :class:`ContextParams` and :class:`SamplerParams`: what a llama.cpp context and its sampler are
  made with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from .errors import BudgetError, UnknownScorerError

AMS_VARIANTS = ("mean", "peaked", "vote")
POSITIONS = ("keep", "compact")
# which tokens a KV cell holds: one for every row (llama.cpp's own), one set per layer, or one set
# per (layer, KV head) row (patch 0002 moves K/V rows between cells); "auto": per head where the
# model and scorer allow it, else per token
GRANULARITIES = ("auto", "token", "layer", "head")
# scorers that read each token's position to undo its RoPE, which per-row sets do not give them yet
NO_ROW_SETS = {"triattention": "it un-rotates keys by one position per cell"}

DEFAULT_N_SINK = 4
DEFAULT_KEEP_LAST = 32
AMS_MIN_ROOM = 128  # cells left to choose below which the default (auto) selects with top-k


@dataclass
class AMSParams:
    """Reference defaults (its README example). ``n_sink`` = 4 and ``always_keep_last`` = 32 are
    not here: the engine applies them as ``protected``."""

    segment_mass: float = 0.02  # cut the cumulative mass at every multiple of this
    min_seg_len: int = 32  # shorter segments merge into the next
    max_seg_len: int = 1024  # longer segments are split
    min_keep_per_segment: int = 8  # every segment's guaranteed share (budget permitting)
    credit_decay: float = 0.8  # EMA decay of the credit
    credit_mix: float = 0.7  # weight of the current mass against the credit
    smooth: int = 5  # moving-average width of the evidence (evidence_mass)

    def __post_init__(self) -> None:
        if not 1e-6 <= self.segment_mass <= 1.0:  # the cut loop runs 1 / segment_mass times
            raise ValueError(f"segment_mass must be in [1e-6, 1], got {self.segment_mass}")
        if not 1 <= self.min_seg_len <= self.max_seg_len:
            raise ValueError(f"need 1 <= min_seg_len <= max_seg_len, got {self.min_seg_len}, {self.max_seg_len}")
        if self.min_keep_per_segment < 0:
            raise ValueError(f"min_keep_per_segment must be >= 0, got {self.min_keep_per_segment}")
        if not 0.0 <= self.credit_decay < 1.0 or not 0.0 <= self.credit_mix <= 1.0:
            raise ValueError("need 0 <= credit_decay < 1 and 0 <= credit_mix <= 1")
        if self.smooth < 1:
            raise ValueError(f"smooth must be >= 1, got {self.smooth}")


def check_budget(
    budget: Any, n_ctx_train: Optional[int] = None, *, n_sink: int = DEFAULT_N_SINK, keep_last: int = DEFAULT_KEEP_LAST
) -> int:
    """``budget`` as an int if it can work, else :class:`BudgetError` with the reason in one line.

    A budget must be a whole positive number of tokens, at least ``n_sink + keep_last + 1`` (the
    always-kept tokens plus one to choose), and, when ``n_ctx_train`` is given, not above the
    model's trained context.
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        try:
            if isinstance(budget, bool) or float(budget) != int(budget):
                raise ValueError
            budget = int(budget)
        except (TypeError, ValueError, OverflowError):
            raise BudgetError(f"the budget must be a whole number of tokens (got {budget!r})") from None
    if budget <= 0:
        raise BudgetError(f"the budget must be a positive number of tokens (got {budget})")
    floor = n_sink + keep_last + 1
    if budget < floor:
        raise BudgetError(
            f"budget {budget} is too small: the smallest that works is {floor} (the first {n_sink} and the last "
            f"{keep_last} tokens always stay, and one more must be chosen)"
        )
    if n_ctx_train and budget > n_ctx_train:
        raise BudgetError(f"the budget {budget} is above the model's trained context ({n_ctx_train})")
    return budget


def check_scorer(name: str) -> str:
    """``name`` if it is a registered scorer, else :class:`OptionError` listing the choices."""
    from .scorers import SCORERS  # pure Python (no backend)

    if name not in SCORERS:
        raise UnknownScorerError(f"unknown scorer {name!r}; choose one of: {', '.join(sorted(SCORERS))}")
    return name


@dataclass
class CompressionConfig:
    """How a session keeps its cache bounded. ``budget=None`` means the full cache."""

    budget: Optional[int] = None
    interval: int = 128
    # defaults by measurement: the best on long documents (BENCHMARKS.md, long context)
    scorer: str = "rkv"
    # True: AMS; False: global top-k; None (auto): AMS when the budget leaves at least
    # AMS_MIN_ROOM cells to choose (budget - n_sink - keep_last), else top-k, resolved once when
    # the session is made. With less room AMS fits too few segments and its per-segment quotas
    # take cells from what the scorer ranks highest (BENCHMARKS §7.7: GSM8K at 128 cells in all,
    # the default under AMS 2/60 against 10/60 with top-k; at 192: 16 against 19)
    ams: Optional[bool] = None
    # how AMS reads the rows of one token set: "mean" (one mass curve, the row average),
    # "peaked" (rows weighted by how peaked their attention is), "vote" (every (layer, KV head)
    # row runs its own AMS; tokens kept by the most rows win)
    ams_variant: str = "vote"
    aggregation: str = "mean"
    positions: str = "keep"  # keep | compact
    granularity: str = "auto"  # auto | token | layer | head (see GRANULARITIES)
    # a prompt compressed before its end is read is scored by the attention of its last tokens
    # (decoded ahead as observers, then removed): the question a long message ends with decides
    question_aware: bool = True
    n_sink: int = DEFAULT_N_SINK
    keep_last: int = DEFAULT_KEEP_LAST
    window: Optional[int] = None  # the scorer's observed queries before an event; default: its own
    ams_params: AMSParams = field(default_factory=AMSParams)
    scorer_params: dict = field(default_factory=dict)
    calibration: Optional[dict] = None  # TriAttention statistics

    @property
    def capacity(self) -> Optional[int]:
        return None if self.budget is None else self.budget + self.interval

    def resolved_ams(self) -> bool:
        """Whether AMS selects: ``ams`` when it is set, else the auto rule (see the field)."""
        if self.ams is not None:
            return bool(self.ams)
        return self.budget is not None and self.budget - self.n_sink - self.keep_last >= AMS_MIN_ROOM

    def validate(self, n_ctx_train: Optional[int] = None) -> "CompressionConfig":
        """Raise :class:`BudgetError` (or :class:`OptionError` for an unknown scorer) with the reason
        in one line if this config cannot work; ``n_ctx_train`` also bounds the budget. Returns self.
        A full-cache config (no budget) only needs a known scorer."""
        check_scorer(self.scorer)
        if self.budget is None:
            return self
        self.budget = check_budget(self.budget, n_ctx_train, n_sink=self.n_sink, keep_last=self.keep_last)
        if self.interval < 1:
            raise BudgetError(f"interval must be at least 1 (got {self.interval})")
        if n_ctx_train and self.budget + self.interval > n_ctx_train:
            raise BudgetError(
                f"budget {self.budget} + interval {self.interval} = {self.budget + self.interval} cells is above the "
                f"model's trained context ({n_ctx_train}); lower --interval"
            )
        if self.positions not in POSITIONS:
            raise BudgetError(f"positions must be keep or compact (got {self.positions})")
        if self.ams_variant not in AMS_VARIANTS:
            raise BudgetError(f"ams_variant must be one of {', '.join(AMS_VARIANTS)} (got {self.ams_variant})")
        if self.granularity not in GRANULARITIES:
            raise BudgetError(f"granularity must be one of {', '.join(GRANULARITIES)} (got {self.granularity})")
        if self.granularity in ("layer", "head") and self.scorer in NO_ROW_SETS:
            raise BudgetError(
                f"scorer {self.scorer} does not work with granularity {self.granularity}: {NO_ROW_SETS[self.scorer]}"
            )
        return self

    def to_dict(self) -> dict:
        """JSON-able fields (the calibration, a per-model file, is left out)."""
        d = asdict(replace(self, calibration=None))
        d.pop("calibration")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)} - {"ams_params", "calibration"}
        d = {"granularity": "token", **d}  # saved before per-row token sets existed: token mode
        return cls(**{k: v for k, v in d.items() if k in known}, ams_params=AMSParams(**d.get("ams_params", {})))


@dataclass(frozen=True)
class ContextParams:
    """What a context is made with. ``n_ctx`` is rounded up by llama.cpp to a multiple of 256."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0  # 0 = every core but one (backend.handles.default_threads)
    flash_attn: str = "auto"  # auto | on | off
    type_k: str = "f16"
    type_v: str = "f16"


@dataclass(frozen=True)
class SamplerParams:
    """Sampling settings; ``temp <= 0`` means greedy."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
    repeat_penalty: float = 1.0  # 1.0 = off (llama.cpp's default)
    repeat_last_n: int = 64  # tokens the penalty looks back over
    grammar: Optional[str] = None  # GBNF text with a 'root' rule: only what it allows is sampled
