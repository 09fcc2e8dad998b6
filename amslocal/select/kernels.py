"""Numba kernels of selection, each with a plain-numpy reference (``*_ref``) right below it.

The selectors call the Numba versions; tests check each against its reference on random sweeps.
Inputs are contiguous float64 / int64 / bool arrays so that every kernel compiles exactly once
(and ``cache=True`` reuses that compilation across processes, from ``__pycache__`` here).

- :func:`moving_average_rows`: centred moving average of each row (SnapKV-style smoothing).
- :func:`window_evidence`: smoothed evidence outside the observation window, row max inside,
  averaged over rows (method step 1 without the final normalisation); per row:
  :func:`window_evidence_rows`.
- :func:`segment_bounds`: segments from cumulative mass (cut, split long, merge short).
- :func:`allocate_quotas`: per-segment keep quotas (minimum, proportional share, round-robin fix).
- :func:`select_in_segments`: protected + per-segment top-k + global fill -> kept mask.
- :func:`row_votes`: AMS steps 3-5 on every row of [R, T] scores and masses, each row on its own
  segments and quotas; returns how many rows keep each token (the voting selector's tally).
- :func:`row_keep`: the same, returning each row's kept mask (per-row token sets).
- :func:`fill_holes`: which cell's row moves into each destination cell (per-row token sets).
- :func:`rows_in_order`: each row's own position order, and :func:`take_rows` to gather by it
  (per-row token sets).
- :func:`sorted_match`: where each of one sorted array's keys sits in another (the row credit).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import compute_threads

# --- smoothing -----------------------------------------------------------------------------


@numba.njit(cache=True)
def _smooth_into(src: np.ndarray, width: int, dst: np.ndarray) -> None:
    """dst[i] = mean of src[i - (width-1)//2 .. i + width//2], clipped to the array."""
    T = src.shape[0]
    lo_off = (width - 1) // 2
    hi_off = width // 2
    for i in range(T):
        lo = max(0, i - lo_off)
        hi = min(T, i + hi_off + 1)
        acc = 0.0
        for j in range(lo, hi):
            acc += src[j]
        dst[i] = acc / (hi - lo)


@numba.njit(cache=True)
def moving_average_rows(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of each row of ``x`` [R, T] over ``width`` neighbours.

    Token i averages [i - (width-1)//2, i + width//2] clipped to the row: at the edges the mean
    is over the neighbours that exist (no zero padding, unlike torch's avg_pool1d default).
    """
    R, T = x.shape
    out = np.empty((R, T), dtype=np.float64)
    for r in range(R):
        _smooth_into(x[r], width, out[r])
    return out


def moving_average_rows_ref(x: np.ndarray, width: int) -> np.ndarray:
    """Reference of :func:`moving_average_rows` by convolution with a box and a count."""
    R, T = x.shape
    if T == 0:
        return np.empty((R, 0))
    hi_off = width // 2
    box = np.ones(width)
    # convolve "full" then slice: out[i] = sum x[i - (width - 1) // 2 .. i + hi_off]
    count = np.convolve(np.ones(T), box)[hi_off : hi_off + T]
    sums = np.stack([np.convolve(row, box)[hi_off : hi_off + T] for row in x]) if R else np.empty((0, T))
    return sums / count


@numba.njit(cache=True)
def _outside(window: np.ndarray) -> np.ndarray:
    """The indices of the tokens outside the observation window, ascending."""
    n = 0
    for t in range(window.shape[0]):
        if not window[t]:
            n += 1
    idx = np.empty(n, dtype=np.int64)
    n = 0
    for t in range(window.shape[0]):
        if not window[t]:
            idx[n] = t
            n += 1
    return idx


@numba.njit(cache=True)
def _add_row_evidence(
    row: np.ndarray, idx: np.ndarray, window: np.ndarray, width: int, buf: np.ndarray, sm: np.ndarray, dst: np.ndarray
) -> None:
    """dst += one row's evidence: smoothed over the tokens ``idx`` outside the window, the max
    of that inside (non-finite entries count as 0; ``buf``, ``sm``: scratch of len(idx))."""
    n = idx.shape[0]
    for j in range(n):
        v = row[idx[j]]
        buf[j] = v if np.isfinite(v) else 0.0
    _smooth_into(buf, width, sm)
    mx = -np.inf
    for j in range(n):
        dst[idx[j]] += sm[j]
        mx = max(mx, sm[j])
    if n > 0:
        for t in range(window.shape[0]):
            if window[t]:
                dst[t] += mx


@numba.njit(cache=True)
def window_evidence(rows: np.ndarray, window: np.ndarray, width: int) -> np.ndarray:
    """Mean over rows [R, T] of: outside ``window``, the row smoothed (:func:`moving_average_rows`
    over the outside tokens only, as if the window were cut off); inside, the max of that.

    Non-finite entries count as 0. One pass per row, no [R, T] temporaries (T can be 32k+).
    """
    R, T = rows.shape
    idx = _outside(window)
    acc = np.zeros(T, dtype=np.float64)
    buf = np.empty(idx.shape[0], dtype=np.float64)
    sm = np.empty(idx.shape[0], dtype=np.float64)
    for r in range(R):
        _add_row_evidence(rows[r], idx, window, width, buf, sm, acc)
    if R > 0:
        for t in range(T):
            acc[t] /= R
    return acc


@numba.njit(cache=True)
def window_evidence_rows(rows: np.ndarray, window: np.ndarray, width: int) -> np.ndarray:
    """:func:`window_evidence` of every row on its own: [R, T] (per-row selectors)."""
    R, T = rows.shape
    idx = _outside(window)
    out = np.zeros((R, T), dtype=np.float64)
    buf = np.empty(idx.shape[0], dtype=np.float64)
    sm = np.empty(idx.shape[0], dtype=np.float64)
    for r in range(R):
        _add_row_evidence(rows[r], idx, window, width, buf, sm, out[r])
    return out


def window_evidence_ref(rows: np.ndarray, window: np.ndarray, width: int) -> np.ndarray:
    """Reference of :func:`window_evidence` with whole-array numpy steps."""
    R, T = rows.shape
    rows = np.where(np.isfinite(rows), rows, 0.0)
    ev = np.zeros((R, T))
    if (~window).any():
        sm = moving_average_rows_ref(rows[:, ~window], width)
        ev[:, ~window] = sm
        ev[:, window] = sm.max(axis=1, keepdims=True)
    return ev.mean(axis=0) if R else np.zeros(T)


# --- segmentation --------------------------------------------------------------------------


@numba.njit(cache=True)
def segment_bounds(mass: np.ndarray, seg_mass: float, min_len: int, max_len: int) -> np.ndarray:
    """Segment boundaries [0, b1, ..., T] (int64, ascending) of ``mass`` [T] (>= 0).

    1. cut: normalise the cumulative sum to end at 1; for every multiple k*seg_mass < 1 the cut is
       the first index whose cumulative sum reaches it (that token starts the next segment), kept
       inside [1, T-1], duplicates dropped. Zero total mass counts as uniform.
    2. split: a segment longer than ``max_len`` is cut into max_len chunks from its start.
    3. merge: a segment shorter than ``min_len`` merges into the next one; a short last segment
       merges into the previous one. Merging can exceed max_len (by < 2 * min_len).
    """
    T = mass.shape[0]
    if T == 0:
        return np.zeros(1, dtype=np.int64)
    cum = np.empty(T, dtype=np.float64)
    acc = 0.0
    for i in range(T):
        acc += mass[i]
        cum[i] = acc
    if acc > 0.0:
        for i in range(T):
            cum[i] = cum[i] / acc
    else:
        for i in range(T):
            cum[i] = (i + 1.0) / T
    n_targets = int(np.ceil(1.0 / seg_mass)) - 1
    cuts = np.empty(min(n_targets, T) + 2, dtype=np.int64)  # distinct cuts <= both
    n = 0
    cuts[n] = 0
    n += 1
    i = 0
    for k in range(1, n_targets + 1):
        target = k * seg_mass
        while i < T and cum[i] < target:
            i += 1
        c = min(max(i, 1), T - 1)
        if c > cuts[n - 1]:
            cuts[n] = c
            n += 1
    if T > cuts[n - 1]:
        cuts[n] = T
        n += 1
    # split long segments, then merge short ones in one pass over the split boundaries
    out = np.empty(T + 1, dtype=np.int64)
    m = 1
    out[0] = 0
    for s in range(n - 1):
        a = cuts[s]
        b = cuts[s + 1]
        while b - a > max_len:
            a += max_len
            if a - out[m - 1] >= min_len:
                out[m] = a
                m += 1
        if b - out[m - 1] >= min_len:
            out[m] = b
            m += 1
    if out[m - 1] != T:  # the last piece is short: merge it into the previous segment
        if m > 1:
            out[m - 1] = T
        else:
            out[m] = T
            m += 1
    return out[:m].copy()


def segment_bounds_ref(mass: np.ndarray, seg_mass: float, min_len: int, max_len: int) -> np.ndarray:
    """Reference of :func:`segment_bounds` with searchsorted and Python lists."""
    T = mass.shape[0]
    if T == 0:
        return np.zeros(1, dtype=np.int64)
    cum = np.cumsum(mass)
    cum = cum / cum[-1] if cum[-1] > 0 else (np.arange(T) + 1.0) / T
    n_targets = int(np.ceil(1.0 / seg_mass)) - 1
    targets = np.arange(1, n_targets + 1) * seg_mass
    cuts = np.clip(np.searchsorted(cum, targets, side="left"), 1, max(T - 1, 1))
    cuts = sorted(set(int(c) for c in cuts if 0 < c < T))
    segs = list(zip([0] + cuts, cuts + [T]))
    split = []
    for a, b in segs:
        while b - a > max_len:
            split.append((a, a + max_len))
            a += max_len
        split.append((a, b))
    merged: list[list[int]] = []
    pending = None  # start of a short run waiting to merge forward
    for a, b in split:
        a = pending if pending is not None else a
        if b - a >= min_len:
            merged.append([a, b])
            pending = None
        else:
            pending = a
    if pending is not None:
        if merged:
            merged[-1][1] = T
        else:
            merged.append([0, T])
    return np.array([0] + [b for _, b in merged], dtype=np.int64)


# --- quotas --------------------------------------------------------------------------------


@numba.njit(cache=True)
def allocate_quotas(seg_mass: np.ndarray, caps: np.ndarray, budget: int, min_keep: int) -> np.ndarray:
    """Keep quota per segment, summing to exactly ``min(budget, caps.sum())``, each <= its cap.

    Each segment first gets min(min_keep, cap). What is left of the budget is shared in proportion
    to ``seg_mass`` (rounded half up; by cap when all mass is 0), capped at cap. The total is then
    fixed one token at a time, round-robin from segment 0: add where below cap; remove where above
    the minimum, and only if that is not enough, where above 1, then above 0 (so a budget smaller
    than the sum of minimums still spreads over as many segments as it can).
    """
    n = caps.shape[0]
    q = np.empty(n, dtype=np.int64)
    total = 0
    cap_sum = 0
    for s in range(n):
        q[s] = min(min_keep, caps[s])
        total += q[s]
        cap_sum += caps[s]
    budget = min(budget, cap_sum)
    if total < budget:
        rest = budget - total
        w_sum = 0.0
        for s in range(n):
            w_sum += seg_mass[s]
        use_caps = not (w_sum > 0.0)
        if use_caps:
            w_sum = float(cap_sum)
        for s in range(n):
            w = float(caps[s]) if use_caps else seg_mass[s]
            add = int(np.floor(rest * (w / w_sum) + 0.5))
            nq = min(caps[s], q[s] + add)
            total += nq - q[s]
            q[s] = nq
    while total < budget:
        for s in range(n):
            if total == budget:
                break
            if q[s] < caps[s]:
                q[s] += 1
                total += 1
    for level in range(3):  # 0: keep minimums, 1: keep one per segment, 2: anything goes
        while total > budget:
            changed = False
            for s in range(n):
                if total == budget:
                    break
                floor = min(min_keep, caps[s]) if level == 0 else (min(1, caps[s]) if level == 1 else 0)
                if q[s] > floor:
                    q[s] -= 1
                    total -= 1
                    changed = True
            if not changed:
                break
    return q


def allocate_quotas_ref(seg_mass: np.ndarray, caps: np.ndarray, budget: int, min_keep: int) -> np.ndarray:
    """Reference of :func:`allocate_quotas`, vectorised where it can be."""
    caps = caps.astype(np.int64)
    q = np.minimum(min_keep, caps)
    budget = min(budget, int(caps.sum()))
    if q.sum() < budget:
        rest = budget - int(q.sum())
        w = seg_mass.astype(np.float64) if seg_mass.sum() > 0 else caps.astype(np.float64)
        w_sum = np.cumsum(w)[-1]  # sequential, like the kernel, so the rounding agrees bit for bit
        add = np.floor(rest * (w / w_sum) + 0.5).astype(np.int64)
        q = np.minimum(caps, q + add)
    order = list(range(len(caps)))
    while q.sum() < budget:
        for s in order:
            if q.sum() < budget and q[s] < caps[s]:
                q[s] += 1
    floors = [np.minimum(min_keep, caps), np.minimum(1, caps), np.zeros_like(caps)]
    for floor in floors:
        while q.sum() > budget and (q > floor).any():
            for s in order:
                if q.sum() > budget and q[s] > floor[s]:
                    q[s] -= 1
    return q


# --- selection -----------------------------------------------------------------------------


@numba.njit(cache=True)
def select_in_segments(
    bounds: np.ndarray, quotas: np.ndarray, scores: np.ndarray, protected: np.ndarray, budget: int
) -> np.ndarray:
    """Kept mask [T]: protected tokens, then each segment's quota of its best unprotected tokens,
    then (if fewer than ``budget``) the best of the rest over the whole cache.

    "Best" = higher score, ties to the earlier position (stable sort). Scores must not be NaN.
    """
    T = scores.shape[0]
    kept = protected.copy()
    n_kept = 0
    for i in range(T):
        if kept[i]:
            n_kept += 1
    for s in range(bounds.shape[0] - 1):
        a = bounds[s]
        b = bounds[s + 1]
        if quotas[s] <= 0:
            continue
        idx = np.empty(b - a, dtype=np.int64)
        m = 0
        for i in range(a, b):
            if not protected[i]:
                idx[m] = i
                m += 1
        idx = idx[:m]
        order = np.argsort(-scores[idx], kind="mergesort")
        for r in range(min(quotas[s], m)):
            kept[idx[order[r]]] = True
            n_kept += 1
    if n_kept < budget:
        idx = np.empty(T, dtype=np.int64)
        m = 0
        for i in range(T):
            if not kept[i]:
                idx[m] = i
                m += 1
        idx = idx[:m]
        order = np.argsort(-scores[idx], kind="mergesort")
        for r in range(min(budget - n_kept, m)):
            kept[idx[order[r]]] = True
    return kept


def select_in_segments_ref(
    bounds: np.ndarray, quotas: np.ndarray, scores: np.ndarray, protected: np.ndarray, budget: int
) -> np.ndarray:
    """Reference of :func:`select_in_segments` with lexsort (score desc, position asc)."""
    T = scores.shape[0]
    kept = protected.copy()
    pos = np.arange(T)
    for s in range(len(bounds) - 1):
        a, b = int(bounds[s]), int(bounds[s + 1])
        cand = pos[a:b][~protected[a:b]]
        best = cand[np.lexsort((cand, -scores[cand]))][: max(int(quotas[s]), 0)]
        kept[best] = True
    need = budget - int(kept.sum())
    if need > 0:
        cand = pos[~kept]
        kept[cand[np.lexsort((cand, -scores[cand]))][:need]] = True
    return kept


# --- per-row AMS with voting -----------------------------------------------------------------


@compute_threads.parallel_kernel
@numba.njit(cache=True, parallel=True)
def row_votes(
    scores: np.ndarray,
    mass: np.ndarray,
    protected: np.ndarray,
    keep: int,
    seg_mass: float,
    min_len: int,
    max_len: int,
    min_keep: int,
) -> np.ndarray:
    """Votes [T] (int64, 0..R): for each row r of ``scores`` / ``mass`` [R, T], the tokens that AMS
    steps 3-5 keep on that row alone, counted over rows.

    A row runs exactly what ``AMSSelector.select`` runs on one token set, minus the credit (the
    caller mixes it into ``mass``): :func:`segment_bounds` on ``mass[r]``; per segment, its cap is
    its number of unprotected tokens and its share the mass of those (summed in position order);
    :func:`allocate_quotas` of ``keep - n_protected``; :func:`select_in_segments` on ``scores[r]``
    with budget ``keep``. Every row keeps ``keep`` tokens, so protected tokens get R votes.
    Scores must not be NaN (map NaN to -inf first, as ``prepare_inputs`` does for one row).
    """
    R, T = scores.shape
    n_prot = 0
    for i in range(T):
        if protected[i]:
            n_prot += 1
    kept = np.zeros((R, T), dtype=np.bool_)
    for r in numba.prange(R):  # rows are independent: SmolLM2's 90 took ~0.75 ms on one thread
        bounds = segment_bounds(mass[r], seg_mass, min_len, max_len)
        n_seg = bounds.shape[0] - 1
        caps = np.zeros(n_seg, dtype=np.int64)
        free_mass = np.zeros(n_seg, dtype=np.float64)
        for s in range(n_seg):
            for i in range(bounds[s], bounds[s + 1]):
                if not protected[i]:
                    caps[s] += 1
                    free_mass[s] += mass[r, i]
        quotas = allocate_quotas(free_mass, caps, keep - n_prot, min_keep)
        kept[r] = select_in_segments(bounds, quotas, scores[r], protected, keep)
    votes = np.zeros(T, dtype=np.int64)
    for r in range(R):
        for i in range(T):
            if kept[r, i]:
                votes[i] += 1
    return votes


def row_votes_ref(
    scores: np.ndarray,
    mass: np.ndarray,
    protected: np.ndarray,
    keep: int,
    seg_mass: float,
    min_len: int,
    max_len: int,
    min_keep: int,
) -> np.ndarray:
    """Reference of :func:`row_votes` from the ``*_ref`` kernels, one row at a time."""
    R, T = scores.shape
    votes = np.zeros(T, dtype=np.int64)
    n_prot = int(protected.sum())
    for r in range(R):
        b = segment_bounds_ref(mass[r], seg_mass, min_len, max_len)
        free = ~protected
        caps = np.array([free[a:z].sum() for a, z in zip(b[:-1], b[1:])], dtype=np.int64)
        # sequential sums (cumsum), like the kernel, so allocate_quotas rounds bit for bit alike
        seg = np.array([np.cumsum(np.where(free[a:z], mass[r, a:z], 0.0))[-1] for a, z in zip(b[:-1], b[1:])])
        q = allocate_quotas_ref(seg, caps, keep - n_prot, min_keep)
        votes += select_in_segments_ref(b, q, scores[r], protected, keep)
    return votes


# --- per-row AMS on per-row token sets ---------------------------------------------------------


@compute_threads.parallel_kernel
@numba.njit(cache=True, parallel=True)
def row_keep(
    scores: np.ndarray,
    mass: np.ndarray,
    protected: np.ndarray,
    keep: int,
    seg_mass: float,
    min_len: int,
    max_len: int,
    min_keep: int,
) -> np.ndarray:
    """Kept mask [R, T]: row r of ``scores`` / ``mass`` / ``protected`` [R, T] (each row in its own
    position order) runs AMS steps 3-5 alone and keeps exactly ``keep`` tokens, as
    :func:`row_votes` does for one row, but with its own protected tokens."""
    R, T = scores.shape
    out = np.zeros((R, T), dtype=np.bool_)
    for r in numba.prange(R):  # rows are independent
        bounds = segment_bounds(mass[r], seg_mass, min_len, max_len)
        n_seg = bounds.shape[0] - 1
        caps = np.zeros(n_seg, dtype=np.int64)
        free_mass = np.zeros(n_seg, dtype=np.float64)
        n_prot = 0
        for s in range(n_seg):
            for i in range(bounds[s], bounds[s + 1]):
                if protected[r, i]:
                    n_prot += 1
                else:
                    caps[s] += 1
                    free_mass[s] += mass[r, i]
        quotas = allocate_quotas(free_mass, caps, keep - n_prot, min_keep)
        out[r] = select_in_segments(bounds, quotas, scores[r], protected[r], keep)
    return out


def row_keep_ref(
    scores: np.ndarray,
    mass: np.ndarray,
    protected: np.ndarray,
    keep: int,
    seg_mass: float,
    min_len: int,
    max_len: int,
    min_keep: int,
) -> np.ndarray:
    """Reference of :func:`row_keep` from the ``*_ref`` kernels, one row at a time."""
    R, T = scores.shape
    out = np.zeros((R, T), dtype=bool)
    for r in range(R):
        prot = protected[r]
        b = segment_bounds_ref(mass[r], seg_mass, min_len, max_len)
        caps = np.array([(~prot[a:z]).sum() for a, z in zip(b[:-1], b[1:])], dtype=np.int64)
        seg = np.array([np.cumsum(np.where(~prot[a:z], mass[r, a:z], 0.0))[-1] for a, z in zip(b[:-1], b[1:])])
        q = allocate_quotas_ref(seg, caps, keep - int(prot.sum()), min_keep)
        out[r] = select_in_segments_ref(b, q, scores[r], prot, keep).astype(bool)
    return out


@numba.njit(cache=True)
def fill_holes(kept: np.ndarray, in_dst: np.ndarray, row_positions: np.ndarray, slot_of: np.ndarray) -> np.ndarray:
    """Where each row's kept tokens outside the destination cells go: src [R, B], -1 = stays.

    Row r's movers (kept, not in ``in_dst``), in the order of ``row_positions[r]`` (stable),
    fill its holes (destination cells holding a token it does not keep) in cell order;
    ``slot_of[cell]`` is the destination slot of a destination cell. (:func:`.rows.place_rows`)
    """
    R, T = kept.shape
    B = 0
    for t in range(T):
        if in_dst[t]:
            B += 1
    src = np.full((R, B), -1, dtype=np.int64)
    movers = np.empty(T, dtype=np.int64)
    holes = np.empty(T, dtype=np.int64)
    keys = np.empty(T, dtype=np.int64)
    for r in range(R):
        n_move = 0
        n_hole = 0
        for t in range(T):
            if kept[r, t] and not in_dst[t]:
                movers[n_move] = t
                keys[n_move] = row_positions[r, t]
                n_move += 1
            elif in_dst[t] and not kept[r, t]:
                holes[n_hole] = t
                n_hole += 1
        if n_move == 0:
            continue
        order = np.argsort(keys[:n_move], kind="mergesort")
        for i in range(min(n_move, n_hole)):
            src[r, slot_of[holes[i]]] = movers[order[i]]
    return src


def fill_holes_ref(kept: np.ndarray, in_dst: np.ndarray, row_positions: np.ndarray, slot_of: np.ndarray) -> np.ndarray:
    """Reference of :func:`fill_holes`, one row at a time with whole-array steps."""
    R = kept.shape[0]
    src = np.full((R, int(in_dst.sum())), -1, dtype=np.int64)
    for r in range(R):
        movers = np.flatnonzero(kept[r] & ~in_dst)
        if movers.size == 0:
            continue
        movers = movers[np.argsort(row_positions[r, movers], kind="stable")]
        holes = np.flatnonzero(in_dst & ~kept[r])  # ascending cell order
        src[r, slot_of[holes]] = movers
    return src


# --- per-row bookkeeping ---------------------------------------------------------------------


@compute_threads.parallel_kernel
@numba.njit(cache=True, parallel=True)
def rows_in_order(positions: np.ndarray) -> np.ndarray:
    """order [R, T]: ``positions[r, order[r]]`` ascends (stable), every row sorted alone, the rows
    on the kernel's threads (90 shuffled rows of 288: 0.23 ms on 2 threads, numpy's stable
    argsort over [R, T] 0.59 ms)."""
    R, T = positions.shape
    order = np.empty((R, T), dtype=np.int64)
    for r in numba.prange(R):
        order[r] = np.argsort(positions[r], kind="mergesort")
    return order


def rows_in_order_ref(positions: np.ndarray) -> np.ndarray:
    """Reference of :func:`rows_in_order`."""
    return np.argsort(positions, axis=1, kind="stable")


@numba.njit(cache=True)
def take_rows(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """out[r, i] = x[r, order[r, i]] (x [R, T]; ``np.take_along_axis`` builds two index arrays
    first: 63 us for SmolLM2's 90 x 288, where this takes 7)."""
    R, T = order.shape
    out = np.empty((R, T), dtype=x.dtype)
    for r in range(R):
        for i in range(T):
            out[r, i] = x[r, order[r, i]]
    return out


def take_rows_ref(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Reference of :func:`take_rows`."""
    return np.take_along_axis(x, order, axis=1)


@numba.njit(cache=True)
def sorted_match(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """For ``keys`` and ``table`` both ascending (int64, no repeats in ``table``): at[i] = the
    index j with table[j] == keys[i], or -1. One merge, O(len(keys) + len(table)), where two
    binary searches over 26,000 keys took ~0.6 ms of a SmolLM2 event (the per-row credit)."""
    at = np.full(keys.shape[0], -1, dtype=np.int64)
    j = 0
    n = table.shape[0]
    for i in range(keys.shape[0]):
        k = keys[i]
        while j < n and table[j] < k:
            j += 1
        if j < n and table[j] == k:
            at[i] = j
    return at


def sorted_match_ref(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Reference of :func:`sorted_match` with a binary search per key."""
    if table.size == 0:
        return np.full(keys.shape[0], -1, dtype=np.int64)
    i = np.minimum(np.searchsorted(table, keys), table.size - 1)
    return np.where(table[i] == keys, i, -1).astype(np.int64)


def warmup() -> None:
    """Compile (or load from cache) every kernel on tiny inputs, so no event pays for it."""
    m = np.full(8, 1.0 / 8)
    moving_average_rows(np.ones((1, 8)), 5)
    window_evidence(np.ones((1, 8)), m > 1.0, 5)
    window_evidence_rows(np.ones((1, 8)), m > 1.0, 5)
    b = segment_bounds(m, 0.25, 2, 4)
    q = allocate_quotas(np.ones(b.shape[0] - 1), np.diff(b), 4, 1)
    select_in_segments(b, q, m, np.zeros(8, dtype=np.bool_), 4)
    row_votes(np.ones((1, 8)), np.ones((1, 8)), np.zeros(8, dtype=np.bool_), 4, 0.25, 2, 4, 1)
    row_keep(np.ones((1, 8)), np.ones((1, 8)), np.zeros((1, 8), dtype=np.bool_), 4, 0.25, 2, 4, 1)
    fill_holes(
        np.ones((1, 2), dtype=np.bool_), np.ones(2, dtype=np.bool_), np.zeros((1, 2), dtype=np.int64), np.arange(2)
    )
    order = rows_in_order(np.zeros((1, 2), dtype=np.int64))
    for dtype in (np.float64, np.int64, np.bool_):
        take_rows(np.zeros((1, 2), dtype=dtype), order)
    sorted_match(np.arange(2), np.arange(3))
