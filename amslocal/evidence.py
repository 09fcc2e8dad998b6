"""Attention evidence computed at the event from captured queries (issue 11).

Between two compression events no cell leaves the cache: new tokens only arrive, at larger
positions. So the attention a decode step's query paid to each cell can be recomputed later, from
that query (captured post-RoPE by the patch, one small copy per layer) and the keys still in the
cache, with the causal mask rebuilt from the positions. Doing it once per event, for all the
window's queries in one matrix product per layer, replaces the per-step side branch in the graph.

- :func:`layer_query_sums`: what an event computes (:meth:`amslocal.cache.CacheView.settle`): the
  masked attention of W queries over the same n keys in every layer of a cache, summed over runs
  of the queries and over each KV group's query heads, in one Numba kernel that calls BLAS from
  its threads; :func:`add_block_sums` adds the sums into evidence arrays.
- :class:`QueryAttention`: one layer's attention (BLAS products, numpy's exp and Numba kernels,
  :func:`_probabilities`), kept unnormalised; it adds the sums over any run of the queries into
  evidence arrays: an event's path where the kernels cannot call BLAS.
- :func:`attention_per_query`: each query's attention, [W, H_kv, n]; :func:`attention_rows_ref` is
  its plain-numpy reference.
"""

from __future__ import annotations

import numba
import numpy as np

from . import compute_threads
from .compute_threads import CBLAS_NO_TRANS, CBLAS_ROW_MAJOR, CBLAS_TRANS

# fast math without the no-NaN/no-Inf assumptions (the kernels never make either)
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, inline="always")
def _sees(q_pos: int, k_pos: int, n_swa: int) -> bool:
    """Whether a query at ``q_pos`` sees a key at ``k_pos`` (< 0: no token): causal, and inside
    llama.cpp's standard sliding window when ``n_swa`` > 0."""
    return k_pos >= 0 and k_pos <= q_pos and (n_swa <= 0 or q_pos - k_pos < n_swa)


@compute_threads.parallel_kernel
@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _mask_shift(logits: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, n_swa: int) -> None:
    """In place over logits [H_kv, W, G, n]: -inf where query t does not see key j, and each row
    minus its largest visible logit (a query that sees nothing: -inf everywhere)."""
    H, W, G, n = logits.shape
    for t in numba.prange(W):
        p = q_pos[t]
        visible = np.empty(n, dtype=np.bool_)
        for j in range(n):
            visible[j] = _sees(p, k_pos[j], n_swa)
        for h in range(H):
            for g in range(G):
                row = logits[h, t, g]
                m = -np.inf
                for j in range(n):
                    if not visible[j]:
                        row[j] = -np.inf
                    elif row[j] > m:
                        m = row[j]
                if m > -np.inf:
                    for j in range(n):
                        row[j] -= m


@numba.njit(cache=True, fastmath=FASTMATH)
def exp_shifted_sum(x: np.ndarray, m: float, bits: np.ndarray) -> float:
    """x[j] = exp(x[j] - m) in place, for x <= m (m: the row's maximum), and returns their sum;
    -inf, and anything more than 87 under m (exp < 1.7e-38, under float32's normal range), give
    exactly 0. ``bits``: int32 scratch, at least len(x).

    Cephes' expf (Cody-Waite reduction by ln 2 in two parts, a degree-7 polynomial; ~1 ulp,
    1.2e-7 relative against float64), with 2^k built from its exponent bits, in two loops that LLVM
    vectorizes, the shift in the first and the sum in the second: on the kernel's threads, where
    numpy's SIMD exp runs on one (SmolLM2's 2.5 million logits an event: 0.29 ms on 2 threads, 0.84
    with numpy)."""
    n = x.shape[0]
    m = np.float32(m)
    for j in range(n):
        v = x[j] - m
        xc = max(v, np.float32(-87.0))
        k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
        r = xc - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        p = np.float32(1.3981999507e-3) + r * np.float32(1.9875691500e-4)
        p = np.float32(8.3334519073e-3) + r * p
        p = np.float32(4.1665795894e-2) + r * p
        p = np.float32(1.6666665459e-1) + r * p
        p = np.float32(5.0000001201e-1) + r * p
        x[j] = np.float32(1.0) + r + r * r * p
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23) if v >= np.float32(-87.0) else np.int32(0)
    scale = bits.view(np.float32)
    total = np.float32(0.0)
    for j in range(n):
        x[j] *= scale[j]
        total += x[j]
    return total


@numba.njit(cache=True, fastmath=FASTMATH)
def exp_nonpositive(x: np.ndarray, bits: np.ndarray) -> None:
    """x[j] = exp(x[j]) in place, for x <= 0 (:func:`exp_shifted_sum` with m = 0)."""
    exp_shifted_sum(x, np.float32(0.0), bits)


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _row_max(row: np.ndarray, lo: int, hi: int) -> float:
    """max(row[lo:hi]) (-inf where empty), in eight running maxima: one maximum's compare-and-select
    chain does not vectorize (no no-NaN assumption here) and ran at ~1 cycle a logit, 3x slower."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(-np.inf)
    j = lo
    while j + 8 <= hi:
        x = row[j]
        m0 = x if x > m0 else m0
        x = row[j + 1]
        m1 = x if x > m1 else m1
        x = row[j + 2]
        m2 = x if x > m2 else m2
        x = row[j + 3]
        m3 = x if x > m3 else m3
        x = row[j + 4]
        m4 = x if x > m4 else m4
        x = row[j + 5]
        m5 = x if x > m5 else m5
        x = row[j + 6]
        m6 = x if x > m6 else m6
        x = row[j + 7]
        m7 = x if x > m7 else m7
        j += 8
    while j < hi:
        x = row[j]
        m0 = x if x > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


def exp_nonpositive_ref(x: np.ndarray) -> np.ndarray:
    """Reference of :func:`exp_nonpositive` (float64 exp; below -87: 0)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= -87.0, np.exp(np.maximum(x, -87.0)), 0.0)


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _softmax_row(row: np.ndarray, p: int, k_pos: np.ndarray, n_swa: int, ascending: bool, first: int, bits: np.ndarray):
    """In place over one row of logits (keys ``k_pos``, query at ``p``): exp of the masked,
    max-shifted logits, masked keys exactly 0. Returns (1 / the row's sum, lo, hi), the sum over
    keys lo <= j < hi, outside which the row is 0; (0, 0, 0) for a query that sees nothing.
    ``ascending``: keys in position order, the first holding a token at ``first``; the visible
    keys are then one run, found by binary search. ``bits``: int32 scratch, len(row)."""
    n = row.shape[0]
    if ascending:
        hi = np.searchsorted(k_pos, p, side="right")
        lo = first if n_swa <= 0 else max(first, np.searchsorted(k_pos, p - n_swa + 1))
        m = _row_max(row, lo, hi)
        row[:lo] = 0.0
        row[max(lo, hi) :] = 0.0
    else:
        lo, hi = 0, n
        for j in range(n):
            if not _sees(p, k_pos[j], n_swa):
                row[j] = -np.inf
        m = _row_max(row, 0, n)
    if m == -np.inf:  # sees nothing
        row[:] = 0.0
        return np.float32(0.0), 0, 0
    total = exp_shifted_sum(row[lo:hi], m, bits)
    return np.float32(1.0) / total, lo, hi


@compute_threads.parallel_kernel
@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _attention_blocks(
    sgemm,
    qg: np.ndarray,
    k: np.ndarray,
    e: np.ndarray,
    inv: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    n_swa: int,
    G: int,
    n_blocks: int,
) -> None:
    """:func:`_probabilities`'s e and inv in one kernel: e[h, r] = exp of the masked, max-shifted
    logits qg[h, r] . k[:, h] (query row r = t * G + g of KV head h, masked as :func:`_mask_shift`
    does) and inv[h, r] = 1 / their sum (0 for a query that sees nothing). qg [H, W * G, d], k [n,
    H, d], e [H, W * G, n] and inv [H, W * G] float32, C-contiguous; ``sgemm``: BLAS's
    (:func:`compute_threads.kernel_sgemm`).

    Each KV head's rows are cut into ``n_blocks`` blocks, one BLAS product each, and every block
    is masked, exponentiated and summed while it is still in cache: the products and the exp run
    on all the kernel's threads, where numpy's matmul and exp run on one (SmolLM2's 3 heads x 96
    rows x 288 keys: the products alone 53 us on 2 threads, 94 with numpy). Keys in position
    order (an event's) see their mask as one run of keys per query, found by binary search: no
    test per key, no exp of a masked one, and each block's product stops at the last key its
    latest query sees, so blocks of <= 48 rows skip most of the window's own triangle (H2O+AMS's
    event on SmolLM2 at interval 128: 21.3-21.5 -> 18.4-19.7 ms)."""
    H, M, d = qg.shape
    n = k.shape[0]
    ascending = True  # keys in position order, as an event passes them (empty cells, -1, first)
    for j in range(1, n):
        ascending &= k_pos[j - 1] <= k_pos[j]
    first = np.searchsorted(k_pos, 0)  # (where ascending) the first key that holds a token
    for it in numba.prange(H * n_blocks):
        h = it // n_blocks
        b = it - h * n_blocks
        r0 = (M * b) // n_blocks
        r1 = (M * (b + 1)) // n_blocks
        if r1 == r0:
            continue
        # keys in position order: none after the block's latest query is visible to it, so
        # the product stops there (H2O's 129 queries over 384 keys: the window's triangle)
        n_cols = n
        if ascending:
            latest = q_pos[r0 // G]
            for t in range(r0 // G, (r1 - 1) // G + 1):  # (a block may start and end inside a query's G rows)
                latest = max(latest, q_pos[t])
            n_cols = np.searchsorted(k_pos, latest, side="right")
        # row-major C[r1 - r0, n_cols] = A[r1 - r0, d] . B[n_cols, d]^T, B's rows H * d floats
        # apart, C's rows n floats apart
        sgemm(
            CBLAS_ROW_MAJOR,
            CBLAS_NO_TRANS,
            CBLAS_TRANS,
            r1 - r0,
            n_cols,
            d,
            1.0,
            qg[h, r0:].ctypes.data,
            d,
            k[0, h:].ctypes.data,
            H * d,
            0.0,
            e[h, r0:].ctypes.data,
            n,
        )
        bits = np.empty(n, dtype=np.int32)
        for r in range(r0, r1):
            inv[h, r], _, _ = _softmax_row(e[h, r], q_pos[r // G], k_pos, n_swa, ascending, first, bits)


@compute_threads.parallel_kernel
@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _layer_query_sums(
    sgemm,
    q: np.ndarray,
    k: np.ndarray,
    scales: np.ndarray,
    n_swa: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    ranges: np.ndarray,
    sums: np.ndarray,
) -> None:
    """The attention of W queries over the same n cells in L layers, summed over runs of queries,
    in one kernel: sums[l, h, b, r, j] = the sum, over the queries t of block b with ranges[r, 0]
    <= t < ranges[r, 1] and over KV head h's query heads g, of softmax_j(scales[l] * q[l, t, h * G +
    g] . k[l, j, h]), masked as :func:`_sees` says with layer l's window n_swa[l].

    q [L, W, n_head, d] float32 (any strides), k [L, n, H, d] float32 C-contiguous, q_pos [W] and
    k_pos [n] int64, ranges [R, 2] int64, sums [L, H, B, R, n] float32, zeros on entry (the
    kernel adds into it): each head's W * G query rows are cut into B blocks.
    :func:`add_block_sums` adds the blocks into evidence arrays.

    What an event computes (:meth:`amslocal.cache.CacheView.settle`), as :class:`QueryAttention`
    does layer by layer, but in one parallel loop over every (layer, KV head, block): each block
    scales its queries, takes one BLAS product, and exponentiates and sums its rows while they are
    in cache; no [W, H, G, n] array per layer, and no Python call per layer."""
    L, W, n_head, d = q.shape
    n, H = k.shape[1], k.shape[2]
    G = n_head // H
    M = W * G
    B = sums.shape[2]
    R = ranges.shape[0]
    ascending = True  # keys in position order, as an event passes them (empty cells, -1, first)
    for j in range(1, n):
        ascending &= k_pos[j - 1] <= k_pos[j]
    first = np.searchsorted(k_pos, 0)
    for it in numba.prange(L * H * B):
        li = it // (H * B)
        h = (it // B) % H
        b = it % B
        out = sums[li, h, b]
        r0 = (M * b) // B
        r1 = (M * (b + 1)) // B
        if r1 == r0:
            continue
        qs = np.empty((r1 - r0, d), dtype=np.float32)
        scale = np.float32(scales[li])
        for r in range(r0, r1):
            t = r // G
            hq = h * G + r - t * G
            for x in range(d):
                qs[r - r0, x] = q[li, t, hq, x] * scale
        n_cols = n
        if ascending:  # as in _attention_blocks: no key after the block's latest query is visible
            latest = q_pos[r0 // G]
            for t in range(r0 // G, (r1 - 1) // G + 1):
                latest = max(latest, q_pos[t])
            n_cols = np.searchsorted(k_pos, latest, side="right")
        e = np.empty((r1 - r0, n), dtype=np.float32)
        if n_cols > 0:
            sgemm(
                CBLAS_ROW_MAJOR,
                CBLAS_NO_TRANS,
                CBLAS_TRANS,
                r1 - r0,
                n_cols,
                d,
                1.0,
                qs.ctypes.data,
                d,
                k[li, 0, h:].ctypes.data,
                H * d,
                0.0,
                e.ctypes.data,
                n,
            )
        bits = np.empty(n, dtype=np.int32)
        for r in range(r0, r1):
            t = r // G
            row = e[r - r0]
            w, lo, hi = _softmax_row(row, q_pos[t], k_pos, n_swa[li], ascending, first, bits)
            if w == 0.0:
                continue
            for ri in range(R):
                if ranges[ri, 0] <= t < ranges[ri, 1]:
                    acc = out[ri]
                    for j in range(lo, hi):
                        acc[j] += row[j] * w


@numba.njit(cache=True)
def add_block_sums(sums: np.ndarray, r: int, rows: np.ndarray, cells: np.ndarray, dst: np.ndarray, sign: float) -> None:
    """dst[rows[l], h, cells[j]] += sign * the sum over blocks b of sums[l, h, b, r, j]
    (:func:`layer_query_sums`'s sums of query run r, added into, or with sign -1 taken from, an
    evidence array [layers, H, cells] of float32 or float64)."""
    L, H, B, _, n = sums.shape
    for li in range(L):
        for h in range(H):
            d = dst[rows[li], h]
            for j in range(n):
                s = np.float32(0.0)
                for b in range(B):
                    s += sums[li, h, b, r, j]
                d[cells[j]] += sign * s


def layer_query_sums(
    q: np.ndarray,
    k: np.ndarray,
    scales: np.ndarray,
    n_swa: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    ranges: np.ndarray,
) -> np.ndarray:
    """The attention of W queries over the same n keys in L layers, summed over runs of queries:
    sums [L, H, B, R, n] float32, as :func:`_layer_query_sums` says (arguments as there; any
    float/int dtypes). Blocks of <= 48 query rows, as in :func:`_probabilities`. Where the kernels
    cannot call BLAS, layer by layer through :class:`QueryAttention` (B = 1)."""
    L, W, n_head, _ = q.shape
    n, H = k.shape[1], k.shape[2]
    ranges = np.ascontiguousarray(ranges, dtype=np.int64).reshape(-1, 2)
    sgemm = compute_threads.kernel_sgemm()
    B = max(1, (W * (n_head // H)) // 48) if sgemm is not None else 1
    sums = np.zeros((L, H, B, len(ranges), n), dtype=np.float32)
    if not (L and W and n):
        return sums
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    k_pos = np.ascontiguousarray(k_pos, dtype=np.int64)
    if sgemm is not None:
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        n_swa = np.ascontiguousarray(n_swa, dtype=np.int64)
        _layer_query_sums(sgemm, q, k, scales, n_swa, q_pos, k_pos, ranges, sums)
        return sums
    keys = np.arange(n)
    for li in range(L):
        a = QueryAttention(q[li], k[li], q_pos, k_pos, float(scales[li]), int(n_swa[li]))
        for r, (t0, t1) in enumerate(ranges):
            part = np.zeros((H, n), dtype=np.float32)
            a.add_to(part, keys, int(t0), int(t1))
            sums[li, :, 0, r] = part
    return sums


@compute_threads.parallel_kernel
@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _row_inverses(e: np.ndarray, inv: np.ndarray) -> None:
    """inv[h, t, g] = 1 / sum_j e[h, t, g, j], or 0 for a row that is all 0 (e: [H_kv, W, G, n])."""
    H, W, G, n = e.shape
    for t in numba.prange(W):
        for h in range(H):
            for g in range(G):
                total = np.float32(0.0)
                for j in range(n):
                    total += e[h, t, g, j]
                inv[h, t, g] = np.float32(1.0) / total if total > 0 else np.float32(0.0)


@compute_threads.parallel_kernel
@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _group_sums(e: np.ndarray, inv: np.ndarray, out: np.ndarray) -> None:
    """out[t, h, j] = sum over g of e[h, t, g, j] * inv[h, t, g]."""
    H, W, G, n = e.shape
    for t in numba.prange(W):
        for h in range(H):
            for j in range(n):
                out[t, h, j] = 0.0
            for g in range(G):
                w = inv[h, t, g]
                for j in range(n):
                    out[t, h, j] += e[h, t, g, j] * w


@numba.njit(cache=True, fastmath=FASTMATH)
def _add_query_sums(e: np.ndarray, inv: np.ndarray, t0: int, t1: int, cells: np.ndarray, dst: np.ndarray) -> None:
    """dst[h, cells[j]] += sum over queries t0 <= t < t1 and over g of e[h, t, g, j] * inv[h, t, g].

    What the event adds to a layer's evidence: summed here, over the queries and into the cells,
    rather than as a [W, H_kv, n] array that numpy sums and scatters (three passes and a fancy
    index per layer, ~20 us of SmolLM2's ~175 us a layer)."""
    H, W, G, n = e.shape
    acc = np.empty(n, dtype=np.float32)
    for h in range(H):
        acc[:] = 0.0
        for t in range(t0, t1):
            for g in range(G):
                w = inv[h, t, g]
                for j in range(n):
                    acc[j] += e[h, t, g, j] * w
        for j in range(n):
            dst[h, cells[j]] += acc[j]


def _probabilities(
    q: np.ndarray, k: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, scale: float, n_swa: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised attention e [H_kv, W, G, n] (exp of the masked, max-shifted logits) and each
    row's normaliser inv [H_kv, W, G]: softmax_j(scale * q[t, head] . k[j, h]) = e * inv, for
    query head g of KV head h.

    q: [W, n_head, d] float32 post-RoPE queries (query head hq reads KV head hq // G, as in
    llama.cpp), k: [n, H_kv, d] float32 post-RoPE keys, q_pos [W] and k_pos [n] int64 (k_pos < 0:
    no token). Key j is visible to query t when k_pos[j] <= q_pos[t] and, with a sliding window
    n_swa > 0, q_pos[t] - k_pos[j] < n_swa (llama.cpp's standard window); masked keys get exactly
    0. Float32 like the graph's softmax.

    Everything in one Numba kernel that calls BLAS from each of its threads
    (:func:`_attention_blocks`); or, where numpy's BLAS is not OpenBLAS, one numpy product per KV
    head, a Numba kernel for the mask and the row maxima (:func:`_mask_shift`), then
    numpy's SIMD exp, and a Numba kernel for the row sums: 2.6x faster than one kernel with a dot
    product per key and a scalar exp per logit (SmolLM2's shapes, 32 queries over 288 cells, one
    thread). Both BLAS and Numba run on the session's threads (see :mod:`amslocal.compute_threads`).
    """
    W, n_head, d = q.shape
    n, H, _ = k.shape
    G = n_head // H
    # queries grouped by KV head and scaled: [H, W * G, d], so each head's logits are one product
    qg = np.empty((H, W, G, d), dtype=np.float32)
    np.multiply(q.reshape(W, H, G, d).transpose(1, 0, 2, 3), np.float32(scale), out=qg)
    logits = np.empty((H, W, G, n), dtype=np.float32)
    inv = np.empty((H, W, G), dtype=np.float32)
    sgemm = compute_threads.kernel_sgemm()
    if sgemm is not None and n > 0 and W > 0 and d > 0:
        # blocks of >= 16 rows, at least two per thread where the rows allow, and blocks of
        # <= 48 rows (finer blocks skip more of the keys a block's queries cannot see yet)
        n_blocks = max(1, min(max(-(-2 * numba.get_num_threads() // H), (W * G) // 48), (W * G) // 16))
        e, e_inv = logits.reshape(H, W * G, n), inv.reshape(H, W * G)
        _attention_blocks(sgemm, qg.reshape(H, W * G, d), k, e, e_inv, q_pos, k_pos, n_swa, G, n_blocks)
        return logits, inv
    for h in range(H):
        np.matmul(qg[h].reshape(W * G, d), k[:, h, :].T, out=logits[h].reshape(W * G, n))
    _mask_shift(logits, q_pos, k_pos, n_swa)
    np.exp(logits, out=logits)
    _row_inverses(logits, inv)
    return logits, inv


def attention_rows_ref(
    q: np.ndarray, k: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, scale: float, n_swa: int
) -> np.ndarray:
    """Reference of :func:`attention_per_query` with whole-array numpy steps (float64)."""
    W, n_head, d = q.shape
    n, H, _ = k.shape
    G = n_head // H
    q_pos = np.asarray(q_pos)[:, None]
    k_pos = np.asarray(k_pos)[None, :]
    visible = (k_pos >= 0) & (k_pos <= q_pos)  # [W, n]
    if n_swa > 0:
        visible &= q_pos - k_pos < n_swa
    kh = np.repeat(k.astype(np.float64), G, axis=1)  # [n, n_head, d]
    logits = scale * np.einsum("thd,jhd->thj", q.astype(np.float64), kh)  # [W, n_head, n]
    x = np.where(visible[:, None, :], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        p = np.nan_to_num(e / e.sum(axis=-1, keepdims=True))  # a query that sees nothing: 0
    return p.reshape(W, H, G, n).sum(axis=2)


def attention_per_query(
    q: np.ndarray, k: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, scale: float, n_swa: int = 0
) -> np.ndarray:
    """Each query's attention probability on each key, summed over each KV group's heads:
    [W, H_kv, n] float32 (see :func:`_probabilities`)."""
    return QueryAttention(q, k, q_pos, k_pos, scale, n_swa).per_query()


class QueryAttention:
    """One layer's attention of W queries over n keys, kept unnormalised (see
    :func:`_probabilities`) so that an event can add the sums over any run of its queries straight
    into evidence arrays, without a [W, H_kv, n] array in between. Arguments as in
    :func:`_probabilities` (any float/int dtypes; converted here)."""

    def __init__(self, q, k, q_pos, k_pos, scale: float, n_swa: int = 0):
        self.e, self.inv = _probabilities(
            np.ascontiguousarray(q, dtype=np.float32),
            np.ascontiguousarray(k, dtype=np.float32),
            np.ascontiguousarray(q_pos, dtype=np.int64),
            np.ascontiguousarray(k_pos, dtype=np.int64),
            float(scale),
            int(n_swa),
        )

    def per_query(self) -> np.ndarray:
        """[W, H_kv, n] float32: each query's probabilities, summed over each KV head's query heads."""
        H, W, _, n = self.e.shape
        out = np.empty((W, H, n), dtype=np.float32)
        _group_sums(self.e, self.inv, out)
        return out

    def add_to(self, dst: np.ndarray, cells: np.ndarray, t0: int = 0, t1: int | None = None) -> None:
        """dst[h, cells[j]] += the attention of queries t0 <= t < t1 on key j, summed over KV head
        h's query heads. dst: [H_kv, >= max(cells) + 1] float32 or float64, C-contiguous."""
        W = self.e.shape[1]
        t1 = W if t1 is None else t1
        if not 0 <= t0 <= t1 <= W:
            raise ValueError(f"query range [{t0}, {t1}) is outside 0..{W}")
        if cells.shape != (self.e.shape[3],) or not dst.flags.c_contiguous:
            raise ValueError("add_to needs one cell per key and a C-contiguous destination")
        _add_query_sums(self.e, self.inv, t0, t1, cells, dst)


@numba.njit(cache=True)
def carry_columns(acc: np.ndarray, dst: np.ndarray, src: np.ndarray, empty: float) -> None:
    """In place over ``acc`` [rows, cells]: column ``dst[j]`` takes column ``src[j]``, which becomes
    ``empty`` (tokens moved to other cells take their evidence along; dst and src are disjoint).
    numpy's fancy indexing took ~50 us per accumulator for 32 cells (BENCHMARKS.md §9.8)."""
    for r in range(acc.shape[0]):
        row = acc[r]
        for j in range(dst.size):
            row[dst[j]] = row[src[j]]
            row[src[j]] = empty


def carry_columns_ref(acc: np.ndarray, dst: np.ndarray, src: np.ndarray, empty: float) -> None:
    """Plain-numpy reference of :func:`carry_columns`."""
    acc[:, dst] = acc[:, src]
    acc[:, src] = empty


def warmup() -> None:
    """Compile (or load from cache) the kernels on tiny inputs, so no event pays for it."""
    compute_threads.use(numba.get_num_threads())  # BLAS on one thread, as at an event: its kernel
    # the path without kernel BLAS (numpy's products) too
    _mask_shift(np.zeros((1, 1, 1, 3), np.float32), np.array([2]), np.array([0, 1, 2]), 0)
    k = np.ones((3, 1, 4), np.float32)
    for writeable in (True, False):  # the cache view hands out its key reads read-only
        k.flags.writeable = writeable
        attention_per_query(np.ones((1, 2, 4), np.float32), k, np.array([2]), np.array([0, 1, 2]), 0.5)
    for acc_type, empty in ((np.float64, 0.0), (np.float32, 0.0), (np.int32, -1), (np.int64, -1)):
        carry_columns(np.zeros((1, 3), acc_type), np.array([0], np.int32), np.array([2], np.int32), empty)
    a = QueryAttention(np.ones((1, 2, 4), np.float32), k, np.array([2]), np.array([0, 1, 2]), 0.5)
    # an event's layers at once: queries as a view of their stacked log, or as a copy
    for q in (np.ones((1, 2, 2, 4), np.float32)[:, :1], np.ones((1, 1, 2, 4), np.float32)):
        ranges = np.array([[0, 1]])
        sums = layer_query_sums(q, k[None], np.ones(1), np.zeros(1), np.array([2]), np.array([0, 1, 2]), ranges)
    for dst_type in (np.float32, np.float64):  # the last query's rows, the totals
        add_block_sums(sums, 0, np.zeros(1, np.int64), np.arange(3, dtype=np.int32), np.zeros((1, 1, 3), dst_type), 1.0)
    for cell_type in (np.int32, np.int64):  # the event's cells, and positions as indices
        for dst_type in (np.float32, np.float64):  # the totals, and the last query's row
            a.add_to(np.zeros((1, 3), dst_type), np.arange(3, dtype=cell_type))
