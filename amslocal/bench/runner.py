"""Run one prompt under one method: the full cache, llama.cpp's context shift, or a budgeted session.

Greedy generation is deterministic, and every method holds exactly the full cache until its memory
is first full, so all of them produce the full cache's tokens up to that point. ``replay`` uses
this: instead of decoding those tokens one by one again for every method, they are fed as one
batch after the prompt (the session's chunked prefill, with the same observation window before
the first event), then decoding goes on. Only float rounding of those cells' K/V differs from
decoding them step by step (batched vs single-token matrix products). A method whose memory never
fills gets the full cache's answer without running at all (``shared_with_full``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..backend import ContextParams, Model, SamplerParams
from ..session import MASS_WINDOW, CompressionConfig, Session
from .context_shift import ContextShiftSession
from .methods import Method
from .wipeout import WipeoutRecorder


@dataclass
class RunSettings:
    """What every method of one benchmark shares."""

    max_new: int = 512
    interval: int = 32
    n_keep: int = 0  # context shift: tokens kept at the start (-1: the prompt)
    n_threads: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    replay: bool = True
    question_aware: bool = True  # prompts: the last tokens observe compressions before them
    calibration: Optional[dict] = None  # TriAttention's statistics of this model
    aggregation: str = "mean"  # how (layer, head) scores become one ranking per token (token sets)
    positions: str = "keep"  # kept tokens keep their positions, or are compacted at every event

    def session_fields(self, method: "Method") -> dict:
        """The CompressionConfig fields of ``method`` under these settings (budget aside)."""
        return {
            "interval": self.interval,
            **method.config,
            "aggregation": self.aggregation,
            "positions": self.positions,
            "calibration": self.calibration if method.scorer == "triattention" else None,
        }

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Generation:
    tokens: list[int]
    finish: str  # "eos" | "length"
    seconds: float
    compressions: int = 0
    evicted: int = 0
    kv_peak: int = 0
    replayed: int = 0  # tokens of the full answer fed instead of decoded
    shared_with_full: bool = False
    wipeout: Optional[dict] = None
    events: list[dict] = field(default_factory=list)  # whole events, when asked (eviction map)


def _sampler(settings: RunSettings, sample: int) -> SamplerParams:
    if settings.greedy:
        return SamplerParams(temp=0)
    return SamplerParams(temp=settings.temperature, top_p=settings.top_p, seed=settings.seed + sample)


def run_full(model: Model, prompt: Sequence[int], settings: RunSettings, sample: int = 0) -> Generation:
    n_ctx = len(prompt) + settings.max_new + 8
    s = Session(
        model,
        CompressionConfig(budget=None),
        ContextParams(n_ctx=n_ctx, n_threads=settings.n_threads),
        _sampler(settings, sample),
    )
    t0 = time.perf_counter()
    out = list(s.generate(list(prompt), settings.max_new))
    finish = "length" if len(out) >= settings.max_new else "eos"
    return Generation(out, finish, time.perf_counter() - t0, kv_peak=s.stats.kv_cells_peak)


def run_method(
    model: Model,
    method: Method,
    prompt: Sequence[int],
    kv_budget: int,
    settings: RunSettings,
    *,
    full: Optional[Generation] = None,
    keep_events: bool = False,
    sample: int = 0,
) -> Generation:
    """Generate ``prompt``'s answer under ``method`` with ``kv_budget`` cells (+ ``interval``).

    ``full`` (the full cache's greedy answer to the same prompt) enables replay; see the module.
    The memory a method may use is ``kv_budget + interval`` cells: a session compresses back to
    ``kv_budget`` when it reaches that; context shift gets the same number of cells.
    """
    if method.kind == "full":
        return run_full(model, prompt, settings, sample)
    prompt = list(prompt)
    capacity = kv_budget + settings.interval
    replayed: list[int] = []
    if full is not None and settings.replay and settings.greedy:
        if full.finish == "eos" and len(prompt) + len(full.tokens) <= capacity:
            # the memory never fills: nothing is ever evicted, the answer is the full cache's
            return Generation(
                list(full.tokens),
                full.finish,
                0.0,
                kv_peak=len(prompt) + len(full.tokens),
                shared_with_full=True,
                replayed=len(full.tokens),
            )
        replayed = list(full.tokens[: max(0, capacity - len(prompt))])
    ctx = ContextParams(n_threads=settings.n_threads)
    sampler = _sampler(settings, sample)
    t0 = time.perf_counter()
    if method.kind == "context-shift":
        n_keep = len(prompt) if settings.n_keep < 0 else settings.n_keep
        cs = ContextShiftSession(model, capacity, n_keep, ctx, sampler)
        out = list(cs.generate(prompt + replayed, settings.max_new - len(replayed)))
        gen = Generation(
            replayed + out,
            "",
            0.0,
            compressions=cs.shifts,
            evicted=cs.evicted_tokens,
            kv_peak=capacity,
            replayed=len(replayed),
        )
    else:
        cfg = CompressionConfig(
            budget=kv_budget, question_aware=settings.question_aware, **settings.session_fields(method)
        )
        s = Session(model, cfg, ctx, sampler, observe_attention=True)
        rec = WipeoutRecorder(window=s.mass_window, group=s.group, keep_events=keep_events)
        s.on_compress = rec
        out = list(s.generate(prompt + replayed, settings.max_new - len(replayed)))
        gen = Generation(
            replayed + out,
            "",
            0.0,
            compressions=s.stats.compressions,
            evicted=s.stats.evicted_tokens,
            kv_peak=s.stats.kv_cells_peak,
            replayed=len(replayed),
            wipeout=rec.summary(),
            events=rec.events,
        )
    gen.seconds = time.perf_counter() - t0
    gen.finish = "length" if len(gen.tokens) >= settings.max_new else "eos"
    return gen


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax along the last axis (one row of logits, or [n, V]), float64."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _forcing_runner(model: Model, method: Method, n_prompt: int, kv_budget: int, settings: RunSettings):
    """(runner, wipe-out recorder or None) for teacher forcing under ``method``."""
    ctx = ContextParams(n_threads=settings.n_threads)
    if method.kind == "full":
        return Session(
            model,
            CompressionConfig(budget=None),
            ContextParams(n_ctx=n_prompt + settings.max_new + 8, n_threads=settings.n_threads),
        ), None
    if method.kind == "context-shift":
        n_keep = n_prompt if settings.n_keep < 0 else settings.n_keep
        return ContextShiftSession(model, kv_budget + settings.interval, n_keep, ctx), None
    cfg = CompressionConfig(budget=kv_budget, **settings.session_fields(method))
    s = Session(model, cfg, ctx, observe_attention=True)
    s.on_compress = WipeoutRecorder(window=s.mass_window, group=s.group)
    return s, s.on_compress


def fidelity(
    model: Model, methods: Sequence[Method], prompt: Sequence[int], kv_budget: int, settings: RunSettings
) -> dict[str, dict]:
    """Teacher-force the full cache's greedy answer through every method, in lockstep.

    At each step the full cache's next-token distribution is the reference: per method, the mean
    KL(full || method), the share of steps whose argmax agrees, and the first step where greedy
    decoding under the method would have left the reference (steps if never). Nothing is sampled,
    so the numbers compare caches, not luck. Runs in lockstep so that no step's full distribution
    (a vocabulary of floats) has to be kept.
    """
    prompt = list(prompt)
    reference, _ = _forcing_runner(model, Method("full", "full"), len(prompt), kv_budget, settings)
    made = {m.name: _forcing_runner(model, m, len(prompt), kv_budget, settings) for m in methods if m.compresses}
    runners = {name: r for name, (r, _) in made.items()}
    for r in [reference, *runners.values()]:
        r.feed(prompt)
    kl = {name: [] for name in runners}
    agree = {name: [] for name in runners}
    steps = 0
    for _ in range(settings.max_new):
        ref = log_softmax(reference.logits())
        tok = int(np.argmax(ref))
        if model.is_eog(tok):
            break
        p = np.exp(ref)
        for name, r in runners.items():
            lp = log_softmax(r.logits())
            kl[name].append(float((p * (ref - lp)).sum()))
            agree[name].append(bool(np.argmax(lp) == tok))
        for r in [reference, *runners.values()]:
            r.feed([tok])
        steps += 1
    out = {}
    for name, r in runners.items():
        a = agree[name]
        out[name] = {
            "kl": float(np.mean(kl[name])) if a else 0.0,
            "top1": float(np.mean(a)) if a else 1.0,
            "first_divergence": next((i for i, x in enumerate(a) if not x), len(a)),
            "steps": steps,
            "compressions": r.shifts if isinstance(r, ContextShiftSession) else r.stats.compressions,
            "wipeout": made[name][1].summary() if made[name][1] is not None else None,
        }
    return out


# llama.cpp keeps an output buffer of (tokens with logits) x n_vocab floats in every context: a
# 512-token slice through 17 sessions of a 152k-vocabulary model held 14 GB (Qwen2.5, measured)
MAX_STEP = 128


def perplexity(
    model: Model,
    methods: Sequence[Method],
    tokens: Sequence[int],
    kv_budget: int,
    settings: RunSettings,
    *,
    step: Optional[int] = None,
) -> dict[str, dict]:
    """Teacher-force a document through the full cache and every method in lockstep.

    Every method holds ``kv_budget + interval`` cells and compresses for the first time when the
    token at index ``kv_budget + interval`` arrives (context shift too: same memory). Only the
    predictions made after that are scored: at token t (t >= first eviction) the method's
    next-token distribution is compared with the full cache's, and with the text's token t + 1.

    The lockstep moves ``step`` tokens at a time (default: the interval, at most ``MAX_STEP``):
    each runner is fed that slice as one batch with logits for every token. Between two events a method's cache is
    fixed, and its session cuts batches at its own events and observation windows, so a batch
    sees the queries that token-by-token feeding (``step=1``) would; the full distribution of only
    one slice is held at a time. Slices before the first eviction are fed without logits.
    Measured: identical logits while a context holds at most 256 cells; past that llama.cpp's CPU
    attention for a batch of queries and for a single query round differently (a few tenths of
    a logit on small models), which the ``full`` row (the noise floor, below) shows.

    Returns per method: ``tokens`` scored, sums of ``nll``, ``kl`` (KL(full || method)), ``top1``
    (argmax agrees with the full cache's), the full cache's ``full_nll`` over the same tokens,
    ``compressions`` and the wipe-out summary.

    ``full`` among ``methods`` measures the floor of numerical noise: a second full cache fed in
    the batches a session cuts (at the 32 queries and the last query before each event) instead
    of whole slices. llama.cpp's kernels round batched and single-token products differently, so
    its KL to the reference is not 0; a method's KL means little below it.
    """
    tokens = list(tokens)
    n = len(tokens)
    capacity = kv_budget + settings.interval
    if n - 1 <= capacity:
        raise ValueError(f"a document of {n} tokens never passes the memory of {capacity} cells")
    step = step or min(settings.interval, MAX_STEP)
    reference = Session(model, CompressionConfig(budget=None), ContextParams(n_ctx=n + 8, n_threads=settings.n_threads))
    made = {m.name: _forcing_runner(model, m, 0, kv_budget, settings) for m in methods if m.compresses}
    if any(m.kind == "full" for m in methods):
        made["full"] = (_RebatchedFull(model, n, capacity, settings), None)
    runners = {name: r for name, (r, _) in made.items()}
    acc = {name: {"tokens": 0, "nll": 0.0, "kl": 0.0, "top1": 0, "full_nll": 0.0} for name in runners}
    for i in range(0, n, step):
        chunk = tokens[i : i + step]
        # scored rows: token t predicts t + 1, for capacity <= t <= n - 2
        lo, hi = max(capacity, i) - i, min(n - 1, i + len(chunk)) - i
        if hi <= lo:
            for r in [reference, *runners.values()]:
                r.feed(chunk)
            continue
        ref = log_softmax(reference.feed(chunk, logits=True)[lo:hi])
        target = np.asarray(tokens[i + lo + 1 : i + hi + 1])
        rows = np.arange(hi - lo)
        p = np.exp(ref)
        ref_top = ref.argmax(axis=1)
        full_nll = float(-ref[rows, target].sum())
        for name, r in runners.items():
            lp = log_softmax(r.feed(chunk, logits=True)[lo:hi])
            a = acc[name]
            a["tokens"] += hi - lo
            a["nll"] += float(-lp[rows, target].sum())
            a["kl"] += float((p * (ref - lp)).sum())
            a["top1"] += int((lp.argmax(axis=1) == ref_top).sum())
            a["full_nll"] += full_nll
    out = {}
    for name, r in runners.items():
        rec = made[name][1]
        out[name] = {
            **acc[name],
            "compressions": r.shifts if isinstance(r, ContextShiftSession) else r.stats.compressions,
            "wipeout": rec.summary() if rec is not None else None,
        }
    return out


class _RebatchedFull:
    """The full cache, fed in the batches a budgeted session cuts: the KL noise floor of
    :func:`perplexity`. Cuts fall where a session's windows start before each event (the 32 mass
    queries, the last query alone); events come at ``capacity + k * interval``."""

    compressions = 0

    def __init__(self, model: Model, n: int, capacity: int, settings: RunSettings):
        self.session = Session(
            model, CompressionConfig(budget=None), ContextParams(n_ctx=n + 8, n_threads=settings.n_threads)
        )
        self.cuts = set()
        for event in range(capacity, n + settings.interval, settings.interval):
            self.cuts.update({event - MASS_WINDOW, event - 1})
        self.fed = 0

    @property
    def stats(self):
        return self

    def feed(self, tokens: Sequence[int], *, logits: bool = False) -> Optional[np.ndarray]:
        tokens = list(tokens)
        start, rows = 0, []
        for k in range(1, len(tokens) + 1):
            if k == len(tokens) or self.fed + k in self.cuts:
                rows.append(self.session.feed(tokens[start:k], logits=logits))
                start = k
        self.fed += len(tokens)
        return np.concatenate(rows) if logits else None
