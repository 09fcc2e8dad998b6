"""Figures for bench results: accuracy against KV budget, and where in the sequence evictions fell.

Both functions write a PNG and return its path. matplotlib is imported inside them (it is an optional
extra, ``amslocal[bench]``), and only its Agg canvas is used, so no GUI backend or pyplot state is
touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amslocal.errors import AmsError

SCORERS = ("tova", "snapkv", "h2o", "keydiff", "expected-attention", "rkv", "triattention")
SHARES = {"accuracy", "pass_at_k", "top1", "same_answer_as_full"}  # metrics drawn as percentages
METRIC_LABELS = {
    "kl": "mean KL(full || method), nats",
    "top1": "top-1 agreement with full",
    "same_answer_as_full": "same answer as the full cache",
}
BASELINE_STYLES = {  # method -> (colour, linestyle, marker)
    "context-shift": ("black", ":", "s"),
    "streaming": ("0.55", "--", "v"),
    "ams-streaming": ("0.55", "-", "v"),
}

# Eviction-map cell states. The values are ordered by severity, so that binning columns (or rows)
# with a max keeps the most telling state: evicted now > kept > evicted earlier > empty.
EMPTY, EVICTED_BEFORE, KEPT, EVICTED_NOW = 0, 1, 2, 3
STATE_COLOURS = ("white", "0.85", "#1f3f8f", "#d62728")  # indexed by state
STATE_LABELS = ("not in cache yet", "evicted earlier", "kept", "evicted at this event")
MAX_COLUMNS = 4000


def _matplotlib():
    """Import what the plots need, or say how to install it."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise AmsError("plots need matplotlib: pip install 'amslocal[bench]'") from err
    return Figure, FigureCanvasAgg


def _save(fig, canvas_class, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_class(fig)
    fig.savefig(path, format="png", dpi=150, bbox_inches="tight")
    return path


def _method_order(method: str) -> tuple:
    if method == "full":
        return (0, 0, 0)
    if method in BASELINE_STYLES:
        return (1, list(BASELINE_STYLES).index(method), 0)
    scorer = method.removeprefix("ams-")
    rank = SCORERS.index(scorer) if scorer in SCORERS else len(SCORERS)
    return (2, rank, scorer, method.startswith("ams-"))


def plot_accuracy(summary: dict, path, metric: str = "accuracy") -> Path:
    """Plot ``metric`` against budget, one line per method, for a bench summary; return the PNG path.

    ``full`` (budget None) is a dashed black horizontal line. A scorer and its ``ams-`` variant share
    a colour: solid for AMS, dashed for global top-k. Shares (accuracy, agreement) are percentages.
    """
    Figure, canvas_class = _matplotlib()
    from matplotlib.ticker import PercentFormatter

    results = [r for r in summary.get("results", []) if r.get(metric) is not None]
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    extra_colours: dict[str, str] = {}  # scorers outside SCORERS get C7, C8, ...
    by_method: dict[str, list] = {}
    for row in results:
        by_method.setdefault(row["method"], []).append(row)
    for method in sorted(by_method, key=_method_order):
        rows = by_method[method]
        if method == "full":
            ax.axhline(rows[0][metric], color="black", linestyle="--", linewidth=1.2, label="full cache")
            continue
        points = sorted((r["budget"], r[metric]) for r in rows if r.get("budget") is not None)
        if not points:
            continue
        if method in BASELINE_STYLES:
            colour, style, marker = BASELINE_STYLES[method]
        else:
            scorer = method.removeprefix("ams-")
            if scorer in SCORERS:
                colour = f"C{SCORERS.index(scorer)}"
            else:
                colour = extra_colours.setdefault(scorer, f"C{7 + len(extra_colours) % 3}")
            style, marker = ("-", "o") if method.startswith("ams-") else ("--", "x")
        xs, ys = zip(*points)
        ax.plot(xs, ys, linestyle=style, marker=marker, color=colour, label=method, linewidth=1.5)
    values = [r[metric] for r in results]
    if values and metric in SHARES:
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    else:
        ax.set_ylim(bottom=0)
    budgets = sorted({r["budget"] for r in results if r.get("budget") is not None})
    if 0 < len(budgets) <= 12:
        ax.set_xticks(budgets)
    prompt_base = summary.get("budget_base") == "prompt"
    ax.set_xlabel("budget (tokens over the prompt)" if prompt_base else "KV budget (tokens)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    counts = [r["n"] for r in results if r.get("n") is not None]
    subtitle = f"n={min(counts)}" if counts else "n=?"
    ax.set_title(f"{summary.get('task', '?')} — {summary.get('model', '?')}\n{subtitle}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, canvas_class, path)


def plot_pairs(summary: dict, path, metric: str = "accuracy") -> Path:
    """Bars of ``metric`` per scorer, global top-k (hatched) beside AMS (solid), one panel per budget;
    the baselines (context shift, StreamingLLM) as grey bars and the full cache as a line."""
    Figure, canvas_class = _matplotlib()
    from matplotlib.ticker import PercentFormatter

    results = [r for r in summary.get("results", []) if r.get(metric) is not None]
    budgets = sorted({r["budget"] for r in results if r.get("budget") is not None})
    full = next((r[metric] for r in results if r["method"] == "full"), None)
    fig = Figure(figsize=(10, 2.8 * max(1, len(budgets)) + 0.6), layout="constrained")
    axes = [fig.add_subplot(max(1, len(budgets)), 1, k + 1) for k in range(max(1, len(budgets)))]
    for ax, budget in zip(axes, budgets):
        rows = {r["method"]: r[metric] for r in results if r.get("budget") == budget}
        groups = [m for m in ("context-shift",) if m in rows]
        groups += sorted(
            {m.removeprefix("ams-") for m in rows if m != "context-shift"},
            key=lambda sc: _method_order(sc)[1:] if sc in SCORERS else (len(SCORERS), sc),
        )
        for x, group in enumerate(groups):
            if group == "context-shift":
                ax.bar(x, rows[group], width=0.5, color="0.3")
                continue
            colour = "0.55" if group == "streaming" else f"C{SCORERS.index(group)}" if group in SCORERS else "C7"
            if group in rows:
                ax.bar(
                    x - 0.2,
                    rows[group],
                    width=0.4,
                    color="white",
                    edgecolor=colour,
                    hatch="///",
                    label="global top-k" if x == 1 else None,
                )
            if f"ams-{group}" in rows:
                ax.bar(x + 0.2, rows[f"ams-{group}"], width=0.4, color=colour, label="AMS" if x == 1 else None)
        if full is not None:
            ax.axhline(full, color="black", linestyle="--", linewidth=1.0, label="full cache")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        base = "over the prompt" if summary.get("budget_base") == "prompt" else "KV cells"
        ax.set_title(f"budget {budget} ({base})", fontsize=9)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=8)
        if metric in SHARES:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    counts = [r["n"] for r in results if r.get("n") is not None]
    fig.suptitle(
        f"{summary.get('task', '?')} — {summary.get('model', '?')}, n={min(counts) if counts else '?'}: "
        "top-k (hatched) vs AMS (solid)",
        fontsize=10,
    )
    return _save(fig, canvas_class, path)


def eviction_states(record: dict) -> np.ndarray:
    """State of every position at every compression event: int8 array [events, n_positions].

    Held positions are KEPT or EVICTED_NOW; positions below the event's ``step`` that are not held
    were EVICTED_BEFORE; positions at or beyond ``step`` are EMPTY.
    """
    events = record.get("events") or []
    n_positions = int(record["n_positions"])
    states = np.full((len(events), n_positions), EMPTY, dtype=np.int8)
    for row, event in enumerate(events):
        positions = np.asarray(event["positions"], dtype=np.int64)
        kept = np.asarray(event["kept"], dtype=bool)
        step = event.get("step")
        if step is None:
            step = int(positions.max()) + 1 if positions.size else 0
        states[row, : min(int(step), n_positions)] = EVICTED_BEFORE
        inside = (positions >= 0) & (positions < n_positions)
        states[row, positions[inside]] = np.where(kept[inside], KEPT, EVICTED_NOW)
    return states


def downsample_states(states: np.ndarray, max_rows: int | None = None, max_columns: int = MAX_COLUMNS) -> np.ndarray:
    """Bin rows/columns down to at most ``max_rows``/``max_columns``, keeping each bin's most severe
    state (evicted now > kept > evicted earlier > empty), so that a single eviction stays visible."""
    for axis, limit in ((1, max_columns), (0, max_rows)):
        size = states.shape[axis]
        if limit and size > limit:
            starts = np.unique(np.linspace(0, size, limit, endpoint=False).astype(np.int64))
            states = np.maximum.reduceat(states, starts, axis=axis)
    return states


def _segment_spans(positions, bounds):
    """Bounds (indices into the event's tokens) -> (start, end) position edges of each segment."""
    edges = [positions[b] - 0.5 if b < len(positions) else positions[-1] + 0.5 for b in bounds]
    return list(zip(edges[:-1], edges[1:]))


def plot_eviction_map(record: dict, path) -> Path:
    """Draw the eviction map of one compressed generation; return the PNG path.

    Top: attention mass over the held tokens at the last event that has mass, with segment boundaries
    and wiped-out segments (no token kept) shaded. Bottom: one row per compression event, one column
    per position (binned by severity when wider than the plot, see :func:`downsample_states`).
    """
    Figure, canvas_class = _matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    events = record.get("events") or []
    n_positions = int(record["n_positions"])
    prompt_end = record.get("prompt_tokens")
    title = record.get("title", "")
    if not events:
        fig = Figure(figsize=(10, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.set_xlim(0, max(n_positions, 1))
        ax.set_yticks([])
        ax.set_xlabel("position")
        ax.text(0.5, 0.5, "no compression", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        ax.set_title(title, fontsize=10)
        return _save(fig, canvas_class, path)

    fig = Figure(figsize=(11, 6.5), layout="constrained")
    mass_ax, map_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 3.2]})
    with_mass = [e for e in events if e.get("mass") is not None]
    if with_mass:
        last = with_mass[-1]
        positions, kept = np.asarray(last["positions"]), np.asarray(last["kept"], dtype=bool)
        marker = "." if len(positions) <= 300 else None
        mass_ax.plot(positions, last["mass"], color="#1f3f8f", linewidth=0.8, marker=marker, markersize=3)
        bounds = last.get("bounds")
        if bounds and len(positions):
            wiped_label = "wiped-out segment"
            for (lo, hi), (b0, b1) in zip(_segment_spans(positions, bounds), zip(bounds[:-1], bounds[1:])):
                mass_ax.axvline(lo, color="0.4", linewidth=0.4)
                if b1 > b0 and not kept[b0:b1].any():
                    mass_ax.axvspan(lo, hi, color="#d62728", alpha=0.15, linewidth=0, label=wiped_label)
                    wiped_label = None
        mass_ax.set_title(
            f"attention mass at event {events.index(last)} (step {last.get('step')})", fontsize=8, loc="left"
        )
    else:
        mass_ax.text(0.5, 0.5, "no attention mass recorded", ha="center", va="center", transform=mass_ax.transAxes)
    mass_ax.set_ylabel("mass", fontsize=8)
    mass_ax.tick_params(labelsize=7)

    width_px = int(fig.get_figwidth() * 150 * 0.8)  # roughly the map's width in pixels when saved
    height_px = int(fig.get_figheight() * 150 * 0.7)
    states = downsample_states(eviction_states(record), max_rows=height_px, max_columns=min(MAX_COLUMNS, width_px))
    map_ax.imshow(
        states,
        cmap=ListedColormap(STATE_COLOURS),
        vmin=-0.5,
        vmax=3.5,
        aspect="auto",
        interpolation="nearest",
        extent=(-0.5, n_positions - 0.5, len(events) - 0.5, -0.5),
    )
    map_ax.set_xlabel("position")
    map_ax.set_ylabel("compression event")
    map_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if prompt_end is not None:
        for ax in (mass_ax, map_ax):
            ax.axvline(
                prompt_end - 0.5,
                color="black",
                linestyle=":",
                linewidth=1,
                label="prompt end" if ax is mass_ax else None,
            )
    map_ax.set_xlim(-0.5, n_positions - 0.5)
    if mass_ax.get_legend_handles_labels()[0]:
        mass_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    patches = [Patch(facecolor=c, edgecolor="0.5", label=l) for c, l in zip(STATE_COLOURS, STATE_LABELS)]
    map_ax.legend(handles=patches[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, canvas_class, path)
