"""``amslocal bench speed``: decode speed at several cache depths, llama-bench style.

For each depth the cache is filled by prefilling a fixed English filler text (deterministic, not
random tokens), then ``n_gen`` greedy tokens are decoded (EOS ignored) and timed: ``tg{n_gen}@d{depth}``.
Rows: ``full`` (an amslocal session without a budget), ``llama-cpp-python (full)`` (the stock
high-level loop, ``Llama.eval`` + ``Llama.sample(temp=0)``, on the same library with evidence off) and
one per method (``S``: scorer S with global top-k, ``ams-S``: under AMS; with ``evidence=("event",
"step")`` each method also gets a ``S [step]`` row gathering evidence by the per-step side branch
instead of at the event). A budgeted session
compresses during prefill, so it holds at most ``budget + interval`` cells when measured; its timed
steps include the compressions that fall in them (counted in the row).

All rows of a depth live in one process and are measured round-robin (order rotated per round),
so machine drift hits every row alike; t/s is the median over rounds, ± is (max - min) / 2, and
"vs full" is the row's median over the full row's median at the same depth.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import AmsError, OptionError
from ..scorers import SCORERS
from .methods import parse_method

STOCK = "llama-cpp-python (full)"
WARMUP_STEPS = 4  # first decodes of a fresh context can pay one-off costs; kept out of the samples

_SUBJECTS = [
    "The keeper",
    "A fisherman",
    "The old map",
    "Our teacher",
    "The river",
    "A small robot",
    "The council",
    "My neighbour",
    "The orchestra",
]
_VERBS = ["noticed", "described", "repaired", "carried", "remembered", "measured", "painted"]
_OBJECTS = [
    "a broken lantern",
    "the northern bridge",
    "three letters from the capital",
    "the winter harvest",
    "a map of the coast",
    "the copper bell",
    "an unfinished song",
    "the station clock",
    "a box of seeds",
    "the long corridor",
    "a quiet garden",
]
_ENDINGS = [
    "before the storm arrived.",
    "while the town slept.",
    "on the second Tuesday of March.",
    "because nobody else would.",
    "and wrote it all down carefully.",
]


def filler_text(n_sentences: int) -> str:
    """Varied plain sentences (list lengths are coprime: 3465 distinct sentences), in paragraphs."""
    out = []
    for i in range(n_sentences):
        out.append(f"{_SUBJECTS[i % 9]} {_VERBS[i % 7]} {_OBJECTS[i % 11]} {_ENDINGS[i % 5]}")
        out.append("\n\n" if i % 6 == 5 else " ")
    return "".join(out)


def filler_tokens(model, n: int) -> list[int]:
    """Exactly ``n`` tokens of the filler text, tokenised by ``model`` (with its BOS)."""
    n_sentences = n // 8 + 16
    while True:
        tokens = model.tokenize(filler_text(n_sentences))
        if len(tokens) >= n:
            return tokens[:n]
        n_sentences *= 2


def cpu_info() -> str:
    name = platform.processor()
    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name or 'unknown CPU'} ({platform.machine()}, {platform.system()}, {os.cpu_count()} cores)"


class _SessionRow:
    """One amslocal session prefilled to ``depth``; ``measure`` times ``n_gen`` decode steps."""

    def __init__(
        self,
        model,
        method: str,
        config,
        ctx_params,
        tokens: list[int],
        rollback: bool,
        evidence_mode: Optional[str] = None,
    ):
        from ..backend import SamplerParams
        from ..session import Session

        self.method, self.budget, self.depth, self.rollback = method, config.budget, len(tokens), rollback
        self.session = Session(model, config, ctx_params, SamplerParams(temp=0), evidence_mode=evidence_mode)
        self.event_ms: list[float] = []  # the measured steps' compression events, each in ms
        self.between: list[float] = []  # per sample: tok/s of the steps with the events' time taken out
        self.controller: list[float] = []  # per sample: share of the wall time spent by the controller
        self.session.prefill(tokens)
        self.measure(WARMUP_STEPS)
        self.event_ms.clear()  # warm-up events are not measured
        self.between.clear()
        self.controller.clear()

    def measure(self, n_gen: int) -> tuple[float, int]:
        s = self.session
        before = s.stats.compressions
        ctl0 = s.stats.compress_ms_total + s.stats.observe_ms_total
        steps = s.generate([], n_gen, ignore_eos=True)
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        seconds = time.perf_counter() - t0
        # the controller: events plus reading evidence back after observed steps (Python side)
        self.controller.append((s.stats.compress_ms_total + s.stats.observe_ms_total - ctl0) / 1e3 / seconds)
        if self.rollback:  # the full cache goes back to depth, so every sample is taken at that depth
            s.truncate(self.depth)
        n_events = s.stats.compressions - before
        event_ms = [e["ms"] for e in s.events[len(s.events) - n_events :]]
        self.event_ms += event_ms
        self.between.append(n / max(seconds - sum(event_ms) / 1e3, 1e-9))
        return n / seconds, n_events

    @property
    def kv_cells_peak(self) -> int:
        return self.session.stats.kv_cells_peak

    def close(self) -> None:
        self.session.close()


class _StockRow:
    """The loop a llama-cpp-python user runs: ``Llama.eval`` the prompt, then sample + eval per token."""

    method, budget, kv_cells_peak, event_ms, between, controller = STOCK, None, None, (), (), ()

    def __init__(
        self, model_path: Path, n_ctx: int, n_threads: int, tokens: list[int], flash_attn: str, type_k: str, type_v: str
    ):
        import llama_cpp

        from ..backend import KV_TYPES

        self.depth = len(tokens)
        # "auto" as on, as amslocal's resolves on CPU: the rows then differ only in the loop
        self.llm = llama_cpp.Llama(
            str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            flash_attn=flash_attn != "off",
            type_k=KV_TYPES[type_k],
            type_v=KV_TYPES[type_v],
            verbose=False,
        )
        self.llm.eval(tokens)
        self.measure(WARMUP_STEPS)

    def measure(self, n_gen: int) -> tuple[float, int]:
        llm = self.llm
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([llm.sample(temp=0.0)])
        seconds = time.perf_counter() - t0
        llm.n_tokens = self.depth  # the next eval removes the cells past depth (seq_rm)
        return n_gen / seconds, 0

    def close(self) -> None:
        self.llm.close()


def _method_configs(
    methods: Optional[Sequence[str]], budget: int, interval: int, model_path: Path, notes: list[str]
) -> list[tuple[str, object]]:
    """(name, CompressionConfig) per budgeted method; triattention only when a calibration is cached."""
    from ..session import CompressionConfig

    names = list(methods) if methods is not None else [m for s in SCORERS for m in (s, f"ams-{s}")]
    calibration, configs = None, []
    for name in names:
        m = parse_method(name)
        if m.kind == "full":
            continue  # always measured: it is the reference
        if m.kind != "session":
            notes.append(f"{m.name}: not a bounded session; skipped")
            continue
        if m.scorer == "triattention" and calibration is None:
            try:
                from ..calibration import load_for_model

                calibration = load_for_model(model_path)
            except AmsError as exc:
                notes.append(f"{m.name}: skipped, no calibration cached ({exc})")
                continue
        configs.append(
            (
                m.name,
                CompressionConfig(
                    budget=budget,
                    interval=interval,
                    **m.config,
                    calibration=calibration if m.scorer == "triattention" else None,
                ),
            )
        )
    return configs


def _row_record(
    method: str,
    budget,
    test: str,
    depth: int,
    samples: list[float],
    compressions: int,
    kv_cells_peak,
    full_median: Optional[float],
    event_ms: Sequence[float] = (),
    between: Sequence[float] = (),
    controller: Sequence[float] = (),
) -> dict:
    median = statistics.median(samples)
    return {
        "method": method,
        "budget": budget,
        "test": test,
        "depth": depth,
        "tok_per_s": median,
        "spread": (max(samples) - min(samples)) / 2,
        "samples": samples,
        "vs_full": 1.0 if full_median is None else median / full_median,
        "compressions": compressions,
        "kv_cells_peak": kv_cells_peak,
        "ms_per_event": statistics.median(event_ms) if event_ms else None,
        # decode speed of the same steps without the compression events' time (t/s between events)
        "tok_per_s_between_events": statistics.median(between) if between else None,
        "controller_share": statistics.median(controller) if controller else None,
    }


def run_speed(
    model_path,
    *,
    depths: Sequence[int] = (512, 2048, 4096),
    budget: int = 256,
    interval: int = 128,
    n_gen: int = 128,
    methods: Optional[Sequence[str]] = None,
    rounds: int = 2,
    n_threads: int = 0,
    flash_attn: str = "auto",
    type_k: str = "f16",
    type_v: str = "f16",
    include_stock: bool = True,
    evidence: Sequence[str] = ("event",),
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Measure decode speed per depth and method; returns a JSON-able dict (see :func:`format_table`).

    ``methods``: names like ``"tova"`` / ``"ams-tova"`` (default: every scorer with and without
    AMS); ``full`` is always measured. ``n_threads=0`` uses every core. ``flash_attn``, ``type_k``
    and ``type_v`` make every row's context (llama-bench's -fa, -ctk, -ctv). ``progress`` gets
    one-line messages. Raises :class:`~amslocal.errors.AmsError` subclasses for bad arguments or
    models.
    """
    from ..backend import FLASH_ATTN, KV_TYPES, ContextParams
    from ..models import load_model, resolve_model
    from ..session import CompressionConfig

    if rounds < 1 or n_gen < 1 or not depths or min(depths) < 1:
        raise OptionError("rounds, n_gen and every depth must be at least 1")
    if not evidence or any(e not in ("event", "step") for e in evidence):
        raise OptionError("evidence must be event, step or both")
    if flash_attn not in FLASH_ATTN or type_k not in KV_TYPES or type_v not in KV_TYPES:
        raise OptionError(
            f"flash attention must be one of {', '.join(FLASH_ATTN)} and the K/V types one of {', '.join(KV_TYPES)}"
        )
    kv = {"flash_attn": flash_attn, "type_k": type_k, "type_v": type_v}
    say = progress or (lambda message: None)
    path = resolve_model(model_path)
    threads = n_threads or os.cpu_count() or 1
    notes = [
        f"tg{n_gen}@d<depth>: decode tok/s of {n_gen} greedy tokens (EOS ignored) after prefilling <depth> tokens of "
        "a fixed filler text; prefill is not timed. pp<depth>: prompt tok/s of the full row (one sample, not "
        "interleaved).",
        f"budgeted rows hold at most budget + interval = {budget + interval} cells from the first token (prefill "
        "compresses in chunks); their timed steps include the compressions that fall in them ('compressions', "
        "summed over rounds). Full rows are rolled back to <depth> after each round; budgeted rows keep going.",
        f"rows are measured round-robin in one process over {rounds} round(s), order rotated per round; t/s is "
        "the median, ± is (max - min) / 2, vs full is relative to the full row at the same depth.",
        "ms/event: median time of one compression event in the timed steps; t/s between events: the same "
        "steps' tokens over their time without the events' (the decode speed a method leaves between events).",
        "controller %: the share of the timed wall time spent by the Python controller (the events, and reading "
        "evidence back after observed steps); the target is under 3% at interval 128.",
        "evidence: " + " vs ".join(evidence) + " ('event': observed steps capture their queries and the "
        "attention is computed once per event; 'step': the side branch computes it in the graph at every "
        "observed step; rows named '[step]' use it when both are measured).",
    ]
    configs = _method_configs(methods, budget, interval, path, notes)
    if include_stock:
        notes.append(
            f"{STOCK}: llama_cpp.Llama (flash attention {'off' if flash_attn == 'off' else 'on'}, like amslocal's "
            f"{flash_attn} on CPU; K {type_k}, V {type_v}), eval + sample(temp=0) per token, on the same library "
            "with evidence off."
        )
    model = load_model(path, validate=False, compress=bool(configs))
    rows: list[dict] = []
    for depth in depths:
        tokens = filler_tokens(model, depth)
        n_ctx = depth + n_gen + WARMUP_STEPS + 256
        say(f"d{depth}: prefilling {1 + include_stock + len(configs)} rows")
        full = _SessionRow(
            model,
            "full",
            CompressionConfig(budget=None),
            ContextParams(n_ctx=n_ctx, n_threads=threads, **kv),
            tokens,
            rollback=True,
        )
        pp = depth / full.session.stats.prefill_s
        live = [full] + ([_StockRow(path, n_ctx, threads, tokens, **kv)] if include_stock else [])
        live += [
            _SessionRow(
                model,
                name if mode == evidence[0] else f"{name} [{mode}]",
                cfg,
                ContextParams(n_threads=threads, **kv),
                tokens,
                rollback=False,
                evidence_mode=mode,
            )
            for name, cfg in configs
            for mode in evidence
        ]
        samples = {r.method: [] for r in live}
        compressions = {r.method: 0 for r in live}
        for rnd in range(rounds):
            k = rnd % len(live)
            for row in live[k:] + live[:k]:
                tps, n_comp = row.measure(n_gen)
                samples[row.method].append(tps)
                compressions[row.method] += n_comp
                say(f"d{depth} round {rnd + 1}/{rounds}: {row.method} {tps:.1f} t/s")
        full_median = statistics.median(samples["full"])
        rows.append(_row_record("full", None, f"pp{depth}", depth, [pp], 0, full.kv_cells_peak, None))
        for row in live:
            rows.append(
                _row_record(
                    row.method,
                    row.budget,
                    f"tg{n_gen}@d{depth}",
                    depth,
                    samples[row.method],
                    compressions[row.method],
                    row.kv_cells_peak,
                    None if row is full else full_median,
                    row.event_ms,
                    row.between,
                    row.controller,
                )
            )
        for row in live:  # free this depth's contexts before the next (the full cache can be large)
            row.close()
        del live, full
    return {
        "model": path.name,
        "budget": budget,
        "interval": interval,
        "n_gen": n_gen,
        "depths": list(depths),
        "rounds": rounds,
        "n_threads": threads,
        **kv,
        "cpu": cpu_info(),
        "rows": rows,
        "notes": notes,
    }


def format_table(result: dict, *, notes: bool = True) -> str:
    """A markdown table like llama-bench's, one line per row; then the notes (``notes=False``: none)."""
    lines = [
        "| model | budget | method | test | t/s | ± | vs full | events | ms/event | t/s between events "
        "| controller % |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        budget = "full" if r["budget"] is None else str(r["budget"])
        ms, between, ctl = r.get("ms_per_event"), r.get("tok_per_s_between_events"), r.get("controller_share")
        lines.append(
            f"| {result['model']} | {budget} | {r['method']} | {r['test']} | {r['tok_per_s']:.2f} | "
            f"{r['spread']:.2f} | {r['vs_full']:.2f} | {r.get('compressions', 0)} | "
            f"{'–' if ms is None else f'{ms:.1f}'} | {'–' if between is None else f'{between:.2f}'} | "
            f"{'–' if ctl is None else f'{100 * ctl:.1f}'} |"
        )
    if notes:
        lines += [""] + [f"note: {n}" for n in result.get("notes", [])]
        kv = result.get("flash_attn")  # absent from results written before the option
        kv = "" if kv is None else f", flash attention: {kv}, K: {result['type_k']}, V: {result['type_v']}"
        lines.append(f"cpu: {result['cpu']}, threads: {result['n_threads']}{kv}")
    return "\n".join(lines)
