"""Bounded-memory generation: the compression schedule on top of the decode loop.

A :class:`Session` holds at most ``budget + interval`` occupied KV cells. When the cache is full it
scores the cached tokens (any scorer), selects ``budget`` of them (global top-k or AMS), evicts
the rest with ``seq_rm`` and, when asked or when positions would pass the model's trained context,
compacts positions with ``seq_add``. A prompt longer than the cache is prefilled in chunks with
compression between chunks, so memory is bounded from the first token.

Evidence is observed only over the ``window`` queries before a scheduled compression, except for
scorers that need every step (H2O); observing a step captures its queries, and their attention is
computed once, at the event (see :mod:`amslocal.cache`), so decoding between events costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import compute_threads
from .backend import LLAMA_AMS_OBS_ATTN, LLAMA_AMS_OBS_QUERIES, Model, Sampler
from .config import NO_ROW_SETS, CompressionConfig, ContextParams, SamplerParams
from .engine import Generator
from .errors import AmsError, BudgetError
from .scorers import make_scorer
from .scorers.base import (
    NEEDS_ATTN,
    NEEDS_ATTN_EVERY_STEP,
    NEEDS_CALIBRATION,
    NEEDS_KEYS,
    NEEDS_QUERIES,
    NEEDS_VALUES,
    ScoreInput,
)
from .select import make_selector
from .select.aggregate import aggregate
from .select.rows import most_kept, place_rows

_kernels_warm = False
MASS_WINDOW = 32  # AMS segments by the evidence of the reference's 32-query window
MAX_OBSERVERS = 64  # question-aware prefill: at most this many of a prompt's last tokens observe


def _read_once(read: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    """Memoise a per-layer read: a scorer may ask for a layer's keys more than once."""
    done: dict[int, np.ndarray] = {}

    def get(layer: int) -> np.ndarray:
        if layer not in done:
            done[layer] = read(layer)
        return done[layer]

    return get


def _warm_kernels() -> None:
    """Load (or compile) the Numba kernels once per process, so no compression event pays for it."""
    global _kernels_warm
    if not _kernels_warm:
        from . import evidence
        from .scorers import kernels as scorer_kernels
        from .select import kernels as select_kernels

        evidence.warmup()
        scorer_kernels.warmup()
        select_kernels.warmup()
        _kernels_warm = True


# token sets pack their cells after an event only when the occupied cells form more runs than this
# (Session._pack_cells): scattered holes cost decode time (BENCHMARKS.md §9.8), a few runs do not
_PACK_ABOVE_RUNS = 4


@dataclass
class SessionStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_budget: Optional[int] = None
    kv_capacity: Optional[int] = None
    kv_cells_peak: int = 0
    compressions: int = 0
    compactions: int = 0
    evicted_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compress_ms_total: float = 0.0
    observe_ms_total: float = 0.0
    scorer: str = ""
    ams: bool = False
    positions: str = "keep"
    granularity: str = "token"

    @property
    def prefill_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tok_per_s"] = self.prefill_tok_per_s
        d["decode_tok_per_s"] = self.decode_tok_per_s
        d["controller_ms_total"] = self.compress_ms_total + self.observe_ms_total
        return d


class Session:
    """One sequence whose KV cache never holds more than ``budget + interval`` tokens."""

    def __init__(
        self,
        model: Model,
        config: CompressionConfig = CompressionConfig(),
        ctx_params: ContextParams = ContextParams(),
        sampler_params: SamplerParams = SamplerParams(),
        *,
        observe_attention: bool = False,
        evidence_mode: Optional[str] = None,
    ):
        self.model = model
        # diagnostics (benchmarks): observe attention even when the scorer and selector do not use
        # it, so that every event can be described by its attention mass; never changes a choice
        self.observe_attention = observe_attention
        # called at every event, before eviction, as on_compress(positions, kept_mask, score_input);
        # with per-row sets kept_mask is the tokens most rows keep (select.rows.most_kept)
        self.on_compress: Optional[Callable[[np.ndarray, np.ndarray, ScoreInput], None]] = None
        self.config = config
        cfg = config
        self.scorer = make_scorer(cfg.scorer, **cfg.scorer_params)
        if cfg.budget is not None:
            cfg.validate()
            n_ctx = cfg.capacity
            if NEEDS_CALIBRATION in self.scorer.needs and cfg.calibration is None:
                raise AmsError(
                    f"scorer {cfg.scorer} needs a calibration of this model; run: amslocal calibrate {model.path}"
                )
            ctx_params = ContextParams(
                **{
                    **asdict(ctx_params),
                    "n_ctx": n_ctx,
                    "n_batch": min(ctx_params.n_batch, n_ctx),
                    "n_ubatch": min(ctx_params.n_ubatch, n_ctx),
                }
            )
        self.gen = Generator(model, ctx_params, sampler_params)
        self.view = self.gen.view
        if evidence_mode is not None:  # None: event-time evidence where exact (see CacheView)
            self.view.set_evidence_mode(evidence_mode)
        if cfg.budget is not None and self.view.n_caches == 0:
            raise AmsError(f"{model.arch}: this model's memory is not a KV cache that can be compressed")
        if cfg.budget is not None and cfg.positions == "compact" and not self.gen.ctx.can_shift():
            raise AmsError(f"{model.arch}: this model's cache cannot shift positions; use --positions keep")
        if cfg.ams is None:  # resolved once, here, as the granularity: stats and save files name what ran
            cfg = self.config = replace(cfg, ams=cfg.resolved_ams())
        if cfg.granularity == "auto":  # resolved once, here: stats and save files name what ran
            row_sets = (
                cfg.budget is not None and cfg.scorer not in NO_ROW_SETS and self._row_sets_refusal("head") is None
            )
            cfg = self.config = replace(cfg, granularity="head" if row_sets else "token")
        if cfg.budget is not None and cfg.granularity != "token":
            refusal = self._row_sets_refusal(cfg.granularity)
            if refusal:
                raise AmsError(refusal)
            self.selector = make_selector(
                "row-ams" if cfg.ams else "row-topk", **(asdict(cfg.ams_params) if cfg.ams else {})
            )
        else:
            if not cfg.ams:
                self.selector = make_selector("topk")
            elif cfg.ams_variant == "vote":
                self.selector = make_selector("ams-vote", **asdict(cfg.ams_params))
            else:
                self.selector = make_selector("ams", **asdict(cfg.ams_params), mass_variant=cfg.ams_variant)
        if cfg.budget is not None:
            _warm_kernels()
        # the layers scored: those of the full-attention cache (an SWA cache forgets by itself)
        self.layers = [il for il in self.view.kv_layers if self.view.layers[il].cache == 0]
        self.view.track(self.layers)  # no evidence for layers nobody scores
        li0 = self.view.layers[self.layers[0]]
        self.group = li0.n_head // li0.n_head_kv
        self._derive_from_scorer()
        self.protected_positions: set[int] = set()
        self.stats = SessionStats(
            kv_budget=cfg.budget,
            kv_capacity=cfg.capacity,
            scorer=cfg.scorer if cfg.budget else "none",
            ams=bool(cfg.ams and cfg.budget),
            positions=cfg.positions,
            granularity=cfg.granularity if cfg.budget is not None else "token",
        )
        self._observing, self._obs_kind = False, (False, False)
        self.events: list[dict] = []  # one small record per compression event (diagnostics)
        # token sets: pack the kept tokens into the lowest cells after each event (see _pack_cells);
        # one cache only (an SWA cache reuses its cells by itself). Benchmarks turn it off for A/B.
        self.pack_cells = self.view.n_caches == 1

    def _row_sets_refusal(self, g: str) -> Optional[str]:
        """Why this model cannot keep per-row token sets (None: it can). They need a cell's
        position to matter only to the causal mask: each K row carries its own token's RoPE, so a
        moved row attends as at home. Not where the position also enters attention or the cache
        forgets by position."""
        view, arch = self.view, self.model.arch
        if view.n_caches != 1 or any(li.n_swa for li in view.layers if li.cache >= 0):
            return (
                f"{arch}: granularity {g} needs one full-attention cache (sliding-window layers "
                f"forget cells by their position); use --granularity token"
            )
        for li in (view.layers[il] for il in view.kv_layers):
            if li.n_rot == 0:
                return (
                    f"{arch}: granularity {g} needs RoPE on every layer (without it the cell's position "
                    f"enters attention, e.g. ALiBi); use --granularity token"
                )
            if li.rope_type not in (0, 2):  # NORM, NEOX: M-RoPE and vision RoPE read more than one position
                return f"{arch}: granularity {g} does not support this model's multi-axis RoPE; use --granularity token"
        if len({view.layers[il].n_head_kv for il in view.kv_layers}) != 1:
            return f"{arch}: granularity {g} needs the same KV head count on every layer"
        return None

    def _derive_from_scorer(self) -> None:
        """What to observe, and over how many queries, for this scorer and selector.

        Each consumer gets the evidence of its own window, however the others are set: the
        scorer's attention over its last ``attn_window`` queries (R-KV 8, SnapKV 32, TOVA 1), AMS
        (and the diagnostics) the mass over the last ``mass_window`` = 32, the scorer's queries
        from a ring of the last ``query_window``. Adding AMS never changes what a scorer sees.
        """
        cfg = self.config
        needs = self.scorer.needs
        own = max(int(cfg.window or self.scorer.window), 1)
        self.every_step = NEEDS_ATTN_EVERY_STEP in needs
        self.attn_window = own if NEEDS_ATTN in needs else 0
        self.mass_window = MASS_WINDOW if (cfg.ams or self.observe_attention) else 0
        self.query_window = own if NEEDS_QUERIES in needs else 0
        self.wants_attn = self.every_step or bool(self.attn_window or self.mass_window)
        self.wants_queries = bool(self.query_window)
        if self.query_window:
            self.view.set_query_window(self.query_window)

    # --- state --------------------------------------------------------------------------------

    @property
    def _row_sets(self) -> bool:
        """True when rows of a cell may hold different tokens (granularity layer or head)."""
        return self.config.budget is not None and self.config.granularity in ("layer", "head")

    @property
    def n_occupied(self) -> int:
        return len(self.gen.tokens_at)

    def protect(self, positions: Sequence[int]) -> None:
        """Never evict these positions (a system prompt, chat-template control tokens)."""
        self.protected_positions.update(int(p) for p in positions)

    def release_oldest_protection(self, limit: int, keep_first: int = 0) -> int:
        """Unprotect the oldest protected positions after the first ``keep_first`` until at most
        ``limit`` stay (``limit >= keep_first``); returns how many were released."""
        prot = sorted(self.protected_positions)
        excess = len(prot) - max(limit, keep_first)
        if excess <= 0:
            return 0
        self.protected_positions.difference_update(prot[keep_first : keep_first + excess])
        return excess

    @property
    def n_ctx(self) -> int:
        """Cells of the context (``budget + interval`` rounded up to 256, or the full context)."""
        return self.gen.ctx.n_ctx

    @property
    def next_pos(self) -> int:
        return self.gen.next_pos

    def kept_tokens(self) -> tuple[list[int], list[int]]:
        """(positions, token ids) of the tokens in the cache, in position order."""
        return self.gen.kept_tokens()

    def logits(self) -> np.ndarray:
        """Next-token logits after the last decode (a copy)."""
        return self.gen.ctx.logits(-1)

    def refresh_logits(self, bos: int = -1) -> None:
        """Make next-token logits available without new input (a session restored from a file):
        decode the last token again at its own position, or ``bos`` into an empty cache."""
        if not self.gen.tokens_at:
            if bos < 0:
                raise AmsError("nothing to continue from: the cache is empty and the model has no BOS token")
            self.prefill([bos])
            return
        p = max(self.gen.tokens_at)
        tok = self.gen.tokens_at[p]
        self.gen.evict([p])
        self.gen.eval([tok], [p])

    def truncate(self, end: int) -> None:
        """Remove every token at position ``end`` and after (roll a full cache back)."""
        self.gen.evict(range(end, self.gen.next_pos))

    def set_sampler(self, params: SamplerParams) -> None:
        """Sample from now on with ``params``."""
        self.gen.sampler = Sampler(params, self.model.n_vocab, self.model.vocab)

    def close(self) -> None:
        """Free the llama.cpp context (the session cannot be used afterwards)."""
        self.gen.ctx.close()

    # --- observation schedule -----------------------------------------------------------------

    # A token that brings the cache to k occupied cells lies in the last W before the event when
    # k > capacity - W. Batches are cut so that none straddles such a boundary (:meth:`_chunk_len`),
    # so each one is observed whole or not at all, and the evidence of the last W queries alone is
    # the total since a mark taken where the window starts. Fed in one batch or token by token, a
    # window sees the same queries. The last token of a window is always decoded alone: TOVA
    # scores by the attention of that one query.

    def _window_bounds(self) -> list[int]:
        ws = {self.attn_window, self.mass_window, self.query_window}
        if self.wants_attn:
            ws.add(max(self.attn_window, self.mass_window))
            ws.add(1)
        return sorted(w for w in ws if w > 0)

    def _chunk_len(self, n: int) -> int:
        """The longest prefix (<= n) of the next tokens that crosses no observation boundary."""
        cap = self.config.capacity
        if cap is None or not (self.wants_attn or self.wants_queries):
            return n
        k0 = self.n_occupied + 1
        for w in self._window_bounds():
            start = cap - w + 1  # occupancy of the first token inside window w
            if k0 < start < k0 + n:
                n = start - k0
        return n

    def _set_observation(self, n_tokens: int) -> None:
        """Observe the next ``n_tokens`` (one boundary-free chunk) if they lie in a window."""
        cap = self.config.capacity
        attn = queries = False
        if cap is not None:
            k0 = self.n_occupied + 1
            attn = self.wants_attn and (self.every_step or k0 > cap - max(self.attn_window, self.mass_window))
            queries = self.wants_queries and k0 > cap - self.query_window
            for w in {self.attn_window, self.mass_window} - {0}:
                if k0 == cap - w + 1:
                    self.view.mark(w)
        on = attn or queries
        n_obs = n_tokens if on else 0
        flags = (attn, queries)
        if on != self._observing or (on and (self.view.n_obs != n_obs or self._obs_kind != flags)):
            if on:
                self.view.observe(n_obs, attn=attn, queries=queries)
            else:
                self.view.observe(0)
            self._observing, self._obs_kind = on, flags

    def _eval(self, tokens: Sequence[int], logits: bool = False) -> Optional[np.ndarray]:
        self._set_observation(len(tokens))
        out = self.gen.eval(tokens, logits_all=logits)
        self.stats.observe_ms_total = self.view.collect_s * 1e3
        if self.n_occupied > self.stats.kv_cells_peak:
            # a new peak by the generator's count: count what llama.cpp holds (reading its cell map
            # took ~75 us, 1% of a SmolLM2 step, when it ran at every step). compress() counts too,
            # when the cache is fullest.
            self.stats.kv_cells_peak = max(self.stats.kv_cells_peak, self.view.n_occupied(0))
        return out

    # --- feeding and generating ---------------------------------------------------------------

    def feed(
        self,
        tokens: Sequence[int],
        *,
        logits: bool = False,
        observers: Sequence[int] = (),
        protect: Optional[Sequence[bool]] = None,
        on_protect: Optional[Callable[[], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
        on_progress: Optional[Callable[[int, int], None]] = None,
    ) -> Union[np.ndarray, int]:
        """Add tokens to the cache, compressing whenever it is full (bounded prefill).

        With ``logits`` returns the next-token logits after every token, [len(tokens), n_vocab]
        (teacher forcing in batches: the same evidence and evictions as feeding token by token,
        and the same numbers up to llama.cpp's batched-vs-single-query rounding); else the number
        of tokens fed (fewer than given when ``cancel`` stopped it).

        ``observers`` (question-aware prefill): the last tokens of ``tokens``, or of the message
        that ``tokens`` begin. Every compression before they are reached keeps room for them,
        decodes them ahead of the text (at the next positions), scores by their attention and then
        removes them (see :meth:`compress`): the cells never pass ``budget + interval``.

        ``protect``: per token, whether it must never be evicted (chat-template structure); each
        chunk's positions are registered before anything can evict them, then ``on_protect`` runs
        (a protection policy may release older ones). ``cancel()`` is asked between chunks;
        ``on_progress(fed, total)`` is told after each.
        """
        cap = self.config.capacity
        tokens = list(tokens)
        obs = self.observer_tail(observers) if cap is not None else []
        # observers that are the tail of ``tokens`` stop observing once the feed reaches them
        tail = len(obs) if obs and tokens[-len(obs) :] == obs else 0
        rows: list[np.ndarray] = []
        i = 0
        while i < len(tokens):
            if cancel is not None and cancel():
                break
            if cap is None:
                n = min(self.gen.batch.capacity, len(tokens) - i)
            else:
                active = obs if obs and i < len(tokens) - tail else []
                room = cap - self.n_occupied - len(active)
                if room <= 0:
                    self.compress(observers=active)
                    continue
                n = self._chunk_len(min(room, self.gen.batch.capacity, len(tokens) - i))
            if protect is not None:
                p0 = self.gen.next_pos
                marked = [p0 + k for k in range(n) if protect[i + k]]
                if marked:
                    self.protect(marked)
                    if on_protect is not None:
                        on_protect()
            out = self._eval(tokens[i : i + n], logits)
            if logits:
                rows.append(out)
            i += n
            if on_progress is not None:
                on_progress(i, len(tokens))
        if not logits:
            return i
        return np.concatenate(rows) if rows else np.zeros((0, self.model.n_vocab), dtype=np.float32)

    def observer_tail(self, tokens: Sequence[int]) -> list[int]:
        """The observers of a message ending in ``tokens``: its last MAX_OBSERVERS tokens, at most
        half the interval. While observers wait, an event comes after ``interval - observers`` new
        tokens instead of ``interval`` (they take cells too), so more would multiply the events."""
        n = min(MAX_OBSERVERS, self.config.interval // 2, len(tokens))
        return list(tokens[len(tokens) - n :]) if n > 0 else []

    def prefill(self, tokens: Sequence[int], observers: Optional[Sequence[int]] = None, **feed_options: Any) -> int:
        """Feed a prompt and count it in the statistics; ``observers`` as in :meth:`feed`, by
        default the prompt's last tokens when the config is question-aware. ``feed_options``:
        ``protect``, ``on_protect``, ``cancel``, ``on_progress`` (see :meth:`feed`). Returns the
        tokens fed."""
        t0 = time.perf_counter()
        if observers is None:
            observers = self.observer_tail(tokens) if self.config.question_aware else ()
        fed = self.feed(tokens, observers=observers, **feed_options)
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prompt_tokens += fed
        return fed

    def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        ignore_eos: bool = False,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> Iterator[int]:
        """Prefill ``prompt``, then yield up to ``max_tokens`` tokens; each is in the cache when yielded.
        ``cancel()`` is asked between prefill chunks and before every token: True stops."""
        self.prefill(prompt, cancel=cancel)
        cap = self.config.capacity
        n_ctx = self.gen.ctx.n_ctx
        for _ in range(max_tokens):
            if cancel is not None and cancel():
                return
            t0 = time.perf_counter()
            tok = self.gen.sample()
            if self.model.is_eog(tok) and not ignore_eos:
                self.stats.decode_s += time.perf_counter() - t0
                return
            if cap is not None and self.n_occupied >= cap:
                self.compress()
            elif cap is None and self.n_occupied >= n_ctx:
                self.stats.decode_s += time.perf_counter() - t0
                return  # full cache and no budget: stop at the context limit
            self._eval([tok])
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.generated_tokens += 1
            yield tok

    # --- compression --------------------------------------------------------------------------

    def score_input(self, cells: np.ndarray, positions: np.ndarray) -> ScoreInput:
        view, layers = self.view, self.layers
        needs = self.scorer.needs
        inp = ScoreInput(
            positions=positions.astype(np.int64),
            cells=cells,
            layers=[view.layers[il] for il in layers],
            group=self.group,
            next_position=self.gen.next_pos,
            n_queries=view.n_queries,
            calibration=self.config.calibration,
        )
        if self.wants_attn:
            # the scorer's own window; a scorer that reads no window (H2O) gets the mass window's
            w = self.attn_window or self.mass_window
            inp.attn = view.evidence_since_layers(w, layers, cells)
            inp.n_queries = view.queries_since(w)
            if self.mass_window == w:  # SnapKV's window, or a scorer with none (H2O, KeyDiff)
                inp.mass_attn, inp.mass_queries = inp.attn, inp.n_queries
            elif self.mass_window:
                inp.mass_attn = view.evidence_since_layers(self.mass_window, layers, cells)
                inp.mass_queries = view.queries_since(self.mass_window)
            last = [view.last_attn(il) for il in layers]
            if all(a is not None for a in last):
                inp.attn_last = np.stack([a[:, cells] for a in last]).astype(np.float64)
            if self.every_step:  # H2O's alone: gathering it costs ~0.2 ms an event on SmolLM2
                inp.attn_total = np.stack([view.evidence_total[il][:, cells] for il in layers])
        if self._row_sets:
            inp.row_positions = view.row_positions(layers, cells)
        if NEEDS_QUERIES in needs:
            inp.queries = [view.queries[il] for il in layers]
            inp.query_positions = view.query_pos.astype(np.int64)
        if NEEDS_KEYS in needs:
            inp.keys = _read_once(lambda l: view.read_k(layers[l], cells))
        if NEEDS_VALUES in needs:
            inp.values = _read_once(lambda l: view.read_v(layers[l], cells))
        return inp

    def compress(self, observers: Sequence[int] = ()) -> dict:
        """Cut the cache back to the budget; returns a record of the event.

        ``observers`` (question-aware prefill): tokens decoded after the cached ones just for this
        event, when they fit the capacity, so that their queries are the evidence it scores by;
        they are no candidates, and they are removed again with the evicted tokens.
        """
        cfg = self.config
        t0 = time.perf_counter()
        compute_threads.use(self.gen.ctx.n_threads)  # as many as decoding: no oversubscribed core
        transient = np.zeros(0, dtype=np.int64)
        fit = cfg.capacity - self.n_occupied if cfg.capacity is not None else 0
        if observers and self.n_occupied > cfg.budget and fit > 0:
            # as many of the last observers as fit: they end the window at the capacity, so the
            # last decode before the event is observed (TOVA) whatever the cache held before
            observers = list(observers)[max(0, len(observers) - fit) :]
            p0 = self.gen.next_pos
            self.feed(observers)  # fits: no event inside; cut and observed by the usual windows
            transient = np.arange(p0, p0 + len(observers), dtype=np.int64)
        cells, positions = self.view.occupied(0)
        self.stats.kv_cells_peak = max(self.stats.kv_cells_peak, len(cells))
        if transient.size:
            real = ~np.isin(positions, transient)
            cells, positions = cells[real], positions[real]
        T = len(positions)
        budget = cfg.budget
        if T <= budget:
            return {}
        inp = self.score_input(cells, positions)
        row_scores = self.scorer.score(inp)
        protected = np.zeros(T, dtype=bool)
        protected[: cfg.n_sink] = True
        protected[max(0, T - cfg.keep_last) :] = True
        if self.protected_positions:
            protected |= np.isin(positions, np.fromiter(self.protected_positions, dtype=np.int64))
        if protected.sum() > budget:
            raise BudgetError(f"{int(protected.sum())} protected tokens do not fit the budget {budget}")
        if self._row_sets:
            return self._compress_rows(t0, cells, positions, transient, inp, row_scores, protected)
        token_scores = aggregate(row_scores, cfg.aggregation)

        mass = None  # what the selector segments by, computed by the selector itself (None: top-k)
        if inp.mass_attn is not None and inp.mass_queries > 0:
            mass = self.selector.evidence_mass(
                inp.mass_attn, inp.mass_queries, self.group, self._window_mask(T, transient.size)
            )
        keep = self.selector.select_event(row_scores, token_scores, budget, protected, positions.astype(np.int64), mass)

        kept_mask = np.zeros(T, dtype=bool)
        kept_mask[keep] = True
        if self.on_compress is not None:
            self.on_compress(positions.astype(np.int64), kept_mask, inp)
        evicted = positions[~kept_mask]
        self.gen.evict(evicted.tolist() + transient.tolist())
        self.protected_positions.difference_update(int(p) for p in evicted)
        t_move = time.perf_counter()
        cells_moved = self._pack_cells() if self.pack_cells else 0
        move_ms = (time.perf_counter() - t_move) * 1e3

        near_limit = self.gen.next_pos + cfg.interval + 1 >= self.model.n_ctx_train
        compact = cfg.positions == "compact" or near_limit
        if near_limit and not self.gen.ctx.can_shift():
            # going on would place tokens past the trained context: stop rather than degrade silently
            raise AmsError(
                f"positions reached the model's trained context ({self.model.n_ctx_train}) and this "
                f"model's cache cannot shift them back; start a new session"
            )
        if compact and self.gen.ctx.can_shift():
            old = positions[kept_mask].astype(np.int64)
            self.gen.compact()
            new = np.arange(len(old), dtype=np.int64)
            self.selector.remap_positions(old, new)  # AMS credit is keyed by position
            mapping = dict(zip(old.tolist(), new.tolist()))
            self.protected_positions = {mapping[p] for p in self.protected_positions if p in mapping}
            self.stats.compactions += 1

        return self._finish_event(
            t0,
            T,
            int(kept_mask.sum()),
            len(evicted),
            {"compacted": bool(compact), "cells_moved": cells_moved, "move_ms": move_ms},
        )

    def _pack_cells(self) -> int:
        """Move the tokens of the highest occupied cells into the holes below them, so that the B
        kept tokens fill cells 0..B-1 and new tokens follow from B on. Returns the cells moved.

        Why: an event leaves its evicted cells as holes scattered among the kept ones. Until new
        tokens filled them, decode steps on SmolLM2 took 1.02-1.05x StreamingLLM's, whose holes
        are one run; packed, 0.99-1.00x (BENCHMARKS.md §9.8). llama.cpp's CPU flash attention then
        reads K/V rows scattered over more memory, which explains part of it. The moves are whole
        cells (K/V bytes and position, patch 0004): the cache holds the same tokens at the same
        positions. The holes take the moved tokens in position order.

        Occupied cells in a few runs are left as they are. StreamingLLM keeps two (a ring);
        packing it once scrambled the cells' position order, and after that every eviction of the
        oldest tokens left scattered holes to pack again (128 moves an event)."""
        pos = self.view.cell_pos(0)
        occupied = pos >= 0
        cells = np.flatnonzero(occupied)
        if 1 + np.count_nonzero(np.diff(cells) > 1) <= _PACK_ABOVE_RUNS:
            return 0  # a few runs (StreamingLLM's two): nothing scattered to gather
        n_kept = cells.size
        holes = np.flatnonzero(~occupied[:n_kept])
        movers = n_kept + np.flatnonzero(occupied[n_kept:])
        movers = movers[np.argsort(pos[movers], kind="stable")]
        self.view.move_cells(0, holes, movers)
        return int(holes.size)

    def _finish_event(self, t0: float, T: int, kept: int, evicted: int, extra: dict) -> dict:
        self.view.reset_window()
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.compressions += 1
        self.stats.evicted_tokens += evicted
        self.stats.compress_ms_total += ms
        event = {"tokens": T, "kept": kept, "ms": ms, **extra}
        self.events.append(event)
        return event

    def _window_mask(self, T: int, n_transient: int) -> np.ndarray:
        """The candidates that are queries of the mass window (AMS gives them no say in the mass)."""
        window_mask = np.zeros(T, dtype=bool)
        in_window = self.mass_window - n_transient  # the window's queries that are candidates
        if in_window > 0:
            window_mask[max(0, T - in_window) :] = True
        return window_mask

    def _compress_rows(
        self,
        t0: float,
        cells: np.ndarray,
        positions: np.ndarray,
        transient: np.ndarray,
        inp: ScoreInput,
        row_scores: np.ndarray,
        protected: np.ndarray,
    ) -> dict:
        """The event with one token set per layer or per (layer, KV head) row.

        Each row (or layer) selects ``budget`` of the tokens it holds; :func:`place_rows` picks the
        ``budget`` cells (the protected ones, then the highest), the rows that keep a token from
        another cell are moved into those cells (K/V bytes, patch 0002), and every other cell is
        evicted.
        A cell keeps its label position, which only the causal mask reads: each K row still carries
        its own token's RoPE rotation.
        """
        cfg = self.config
        L, T = len(self.layers), len(positions)
        H = self.view.layers[self.layers[0]].n_head_kv
        rs = np.broadcast_to(np.asarray(row_scores, dtype=np.float64), (L, H, T))
        rpos = inp.row_positions
        row_mass = None
        if inp.mass_attn is not None and inp.mass_queries > 0:
            row_mass = self.selector.evidence_mass(
                inp.mass_attn, inp.mass_queries, self.group, self._window_mask(T, transient.size)
            )
            row_mass = None if row_mass is None else row_mass.reshape(L, H, T)
        if cfg.granularity == "layer":
            # one set per layer: its heads' scores made comparable and averaged, as the aggregation does
            layer_scores = np.stack([aggregate(rs[l][None], cfg.aggregation) for l in range(L)])
            layer_mass = None if row_mass is None else row_mass.mean(axis=1)
            kept = self.selector.select_rows(layer_scores, cfg.budget, protected, rpos[:, 0], layer_mass)
            kept = np.repeat(kept[:, None, :], H, axis=1).reshape(L * H, T)
        else:
            kept = self.selector.select_rows(
                rs.reshape(L * H, T),
                cfg.budget,
                protected,
                rpos.reshape(L * H, T),
                None if row_mass is None else row_mass.reshape(L * H, T),
            )
        dst, src = place_rows(kept, protected, rpos.reshape(L * H, T), cells)
        in_dst = np.zeros(T, dtype=bool)
        in_dst[dst] = True
        if self.on_compress is not None:
            consensus = most_kept(kept, protected, aggregate(row_scores, cfg.aggregation))
            self.on_compress(positions.astype(np.int64), consensus, inp)
        src_cells = np.where(src >= 0, cells[np.maximum(src, 0)], -1).reshape(L, H, len(dst))
        t_move = time.perf_counter()
        self.view.move_rows(self.layers, cells[dst], src_cells)
        move_ms = (time.perf_counter() - t_move) * 1e3
        evicted = positions[~in_dst]
        self.gen.evict(evicted.tolist() + transient.tolist())
        self.view.row_positions(self.layers, cells[:0])  # the map forgets the freed cells now
        near_limit = self.gen.next_pos + cfg.interval + 1 >= self.model.n_ctx_train
        compact = cfg.positions == "compact" or near_limit
        if compact:
            if not self.gen.ctx.can_shift():
                raise AmsError(
                    f"positions reached the model's trained context ({self.model.n_ctx_train}) and this "
                    f"model's cache cannot shift them back; start a new session"
                )
            self._compact_rows()
        return self._finish_event(
            t0,
            T,
            len(dst),
            T - len(dst),
            {"compacted": bool(compact), "rows_moved": int((src >= 0).sum()), "move_ms": move_ms},
        )

    def _compact_rows(self) -> None:
        """Dense positions with per-row token sets: the cells' labels become 0..B-1 (``seq_add``,
        which rotates every row of a cell by its label's delta), and each row's tokens the ranks
        0..B-1 in that row's own order (a per-row RoPE shift for the rest of the delta)."""
        view, layers = self.view, self.layers
        cells, labels = view.occupied(0)
        rows = view.row_positions(layers, cells)
        new_labels = np.arange(len(cells), dtype=np.int64)
        ranks = np.argsort(np.argsort(rows, axis=2, kind="stable"), axis=2, kind="stable").astype(np.int64)
        view.shift_rows(layers, cells, ranks - rows - (new_labels - labels)[None, None, :])
        self.gen.compact()  # labels in order onto 0..B-1, as new_labels; applied at the next decode
        view.relabel_rows(cells, new_labels)
        self.selector.remap_rows(rows.reshape(-1, len(cells)), ranks.reshape(-1, len(cells)))
        mapping = dict(zip(labels.tolist(), new_labels.tolist()))
        self.protected_positions = {mapping[p] for p in self.protected_positions if p in mapping}
        self.stats.compactions += 1

    # --- live changes -------------------------------------------------------------------------

    def set_budget(self, budget: int) -> None:
        """Compress to ``budget`` from now on (the next feed cuts the cache if it holds more).

        The context must already hold ``budget + interval`` cells; growing past it needs a new
        context (export the state, build a session with the new config, import). A session made
        without a budget cannot start compressing.
        """
        if self.config.budget is None:
            raise BudgetError("this session has no budget (full cache); start a new one with a budget")
        cfg = replace(self.config, budget=budget).validate(self.model.n_ctx_train)
        if cfg.capacity > self.gen.ctx.n_ctx:
            raise BudgetError(
                f"budget {budget} + interval {cfg.interval} needs {cfg.capacity} cells; "
                f"the context has {self.gen.ctx.n_ctx}"
            )
        self.config = cfg
        self.stats.kv_budget, self.stats.kv_capacity = cfg.budget, cfg.capacity

    def set_scorer(self, name: str, *, calibration: Optional[dict] = None, **params: Any) -> None:
        """Score with ``name`` from the next compression on.

        If the cache holds more than the budget it is first cut with the current scorer (whose
        evidence the observation window holds); the observation window then starts over with what
        the new scorer needs. H2O's accumulated attention only counts from the switch on.
        """
        scorer = make_scorer(name, **params)
        if self._row_sets and name in NO_ROW_SETS:
            raise BudgetError(
                f"scorer {name} does not work with granularity {self.config.granularity}: {NO_ROW_SETS[name]}"
            )
        calibration = calibration if calibration is not None else self.config.calibration
        if NEEDS_CALIBRATION in scorer.needs and calibration is None:
            raise AmsError(
                f"scorer {name} needs a calibration of this model; run: amslocal calibrate {self.model.path}"
            )
        if self.config.budget is not None and self.n_occupied > self.config.budget:
            self.compress()
        self.config = replace(self.config, scorer=name, scorer_params=dict(params), calibration=calibration)
        self.scorer = scorer
        self._derive_from_scorer()
        self.stats.scorer = name if self.config.budget is not None else "none"
        if self._observing:
            self.view.observe(0)
            self._observing, self._obs_kind = False, (False, False)
        self.view.reset_window()

    # --- state export / import (save files, context rebuilds) ---------------------------------
    # The cache view's accumulators are read and written here field by field (evidence_total and
    # the window snapshot per layer, the query ring): keep these two methods in step with CacheView.

    def export_state(self) -> tuple[dict, dict[str, np.ndarray], bytes]:
        """What decides this session's future: (JSON-able meta, arrays, llama.cpp sequence state).

        Arrays: the position -> token map, protected positions, the AMS credit, and the cache
        view's accumulated evidence (total and window snapshot, per layer) keyed by position, not
        by cell, because a restore puts the cells elsewhere; plus the observed queries. Evidence a
        cell still carries from a previous occupant (zeroed at the next observation) is saved as 0.
        """
        view = self.view
        kv = self.gen.ctx.seq_state_get()
        pos, toks = self.gen.kept_tokens()
        arrays: dict[str, np.ndarray] = {
            "tokens_pos": np.asarray(pos, dtype=np.int64),
            "tokens_id": np.asarray(toks, dtype=np.int64),
            "protected": np.asarray(sorted(self.protected_positions), dtype=np.int64),
        }
        arrays.update({f"sel_{k}": v for k, v in self.selector.state_dict().items()})
        if self._row_sets:
            # which token every (layer, KV head) row of each cell holds, keyed by the cell's label
            cells, labels = view.occupied(0)
            arrays["row_label"] = labels.astype(np.int64)
            arrays["row_pos"] = view.row_positions(self.layers, cells)
        view_meta, view_arrays = view.export_evidence()
        arrays.update(view_arrays)
        meta = {
            "config": self.config.to_dict(),
            "stats": asdict(self.stats),
            "events": self.events,
            "observing": self._observing,
            **view_meta,
            "selector": self.selector.name,
        }
        return meta, arrays, kv

    def import_state(self, meta: dict, arrays: dict[str, np.ndarray], kv: bytes) -> None:
        """Restore :meth:`export_state` output into this (fresh) session, made with the same config
        (or a larger budget). Raises :class:`AmsError` when the state does not fit."""
        view = self.view
        if int(meta["n_caches"]) != view.n_caches or meta["selector"] != self.selector.name:
            raise AmsError("the saved state was made with another cache layout or selector")
        self.gen.reset()
        self.gen.ctx.seq_state_set(kv)
        pos = arrays["tokens_pos"].astype(np.int64)
        self.gen.tokens_at = {int(p): int(t) for p, t in zip(pos, arrays["tokens_id"])}
        _, live = view.occupied(0)
        if not np.array_equal(np.sort(pos), live.astype(np.int64)):
            raise AmsError("the saved KV state and token map disagree")
        self.protected_positions = {int(p) for p in arrays["protected"]}
        selector_state = {k[4:]: v for k, v in arrays.items() if k.startswith("sel_")}
        if not selector_state and "credit_pos" in arrays:  # saved before selectors owned their state
            selector_state = {"credit_pos": arrays["credit_pos"], "credit_val": arrays["credit_val"]}
        self.selector.load_state_dict(selector_state)

        try:
            view.import_evidence(meta, arrays)
        except ValueError as exc:
            raise AmsError(str(exc)) from None
        if self._row_sets:
            if "row_pos" not in arrays:
                raise AmsError("the saved state has no per-row token map (saved with granularity token?)")
            cells, labels = view.occupied(0)
            if not np.array_equal(arrays["row_label"], labels.astype(np.int64)):
                raise AmsError("the saved per-row token map and KV state disagree")
            view.set_row_positions(self.layers, cells, arrays["row_pos"])
        self._observing = bool(meta["observing"])
        self._obs_kind = (bool(view.obs_flags & LLAMA_AMS_OBS_ATTN), bool(view.obs_flags & LLAMA_AMS_OBS_QUERIES))
        known = {f.name for f in fields(SessionStats)}
        self.stats = SessionStats(**{k: v for k, v in meta["stats"].items() if k in known})
        self.events = list(meta.get("events", []))
