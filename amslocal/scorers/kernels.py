"""Numba kernels of the scorers, each with a plain-numpy reference (``*_ref``) right below it.

The scorers call the Numba versions; tests check each against its reference on random inputs.
Inputs are contiguous float64 arrays (the scorers convert with :func:`f64`) so that every kernel
compiles exactly once, and ``cache=True`` reuses that compilation across processes. The two
O(T d)-per-pair loops (:func:`mean_cos_redundancy`, :func:`tri_series`) use ``fastmath`` so
their reductions vectorise; results then differ from the references in the last bits only.

- :func:`avg_pool_rows`, :func:`max_pool_rows`: pooling along tokens, torch ``*_pool1d`` style.
- :func:`cos_to_mean_direction`: each key's cosine to the mean direction of its head's keys (KeyDiff).
- :func:`mean_cos_redundancy`: each key's mean cosine similarity to the other keys (R-KV).
- :func:`tri_series`: TriAttention's trigonometric series averaged over future distances.
- :func:`turn_center`: captured queries turned (back to pre-RoPE, then to the future's mean
  rotation) and centred per head (Expected Attention).
  It takes the float32 queries as captured (a float64 copy of 256 queries × every head would
  cost more than the kernel).
"""

from __future__ import annotations

import numba
import numpy as np

_EPS = 1e-12


def f64(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float64 array (no copy when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.float64)


# --- pooling along tokens ------------------------------------------------------------------


@numba.njit(cache=True)
def avg_pool_rows(x: np.ndarray, kernel: int) -> np.ndarray:
    """Average pooling of each row of ``x`` [R, T] over ``kernel`` (odd) centred neighbours.

    As torch ``avg_pool1d(kernel, stride=1, padding=kernel//2)`` (count_include_pad): the sum over
    the neighbours that exist, always divided by ``kernel`` (edges are zero-padded).
    """
    R, T = x.shape
    half = kernel // 2
    out = np.empty((R, T), dtype=np.float64)
    for r in range(R):
        for i in range(T):
            acc = 0.0
            for j in range(max(0, i - half), min(T, i + half + 1)):
                acc += x[r, j]
            out[r, i] = acc / kernel
    return out


def avg_pool_rows_ref(x: np.ndarray, kernel: int) -> np.ndarray:
    """Reference of :func:`avg_pool_rows`: zero-pad, sum ``kernel`` shifted copies, divide."""
    R, T = x.shape
    half = kernel // 2
    padded = np.pad(x, ((0, 0), (half, half)))
    return sum(padded[:, s : s + T] for s in range(kernel)) / kernel


@numba.njit(cache=True)
def max_pool_rows(x: np.ndarray, kernel: int) -> np.ndarray:
    """Max pooling of each row of ``x`` [R, T] over ``kernel`` (odd) centred neighbours.

    As torch ``max_pool1d(kernel, stride=1, padding=kernel//2)``: the max over the neighbours that
    exist (padding never wins).
    """
    R, T = x.shape
    half = kernel // 2
    out = np.empty((R, T), dtype=np.float64)
    for r in range(R):
        for i in range(T):
            m = -np.inf
            for j in range(max(0, i - half), min(T, i + half + 1)):
                if x[r, j] > m:
                    m = x[r, j]
            out[r, i] = m
    return out


def max_pool_rows_ref(x: np.ndarray, kernel: int) -> np.ndarray:
    """Reference of :func:`max_pool_rows`: -inf padding, max of ``kernel`` shifted copies."""
    R, T = x.shape
    half = kernel // 2
    padded = np.pad(x, ((0, 0), (half, half)), constant_values=-np.inf)
    return np.max(np.stack([padded[:, s : s + T] for s in range(kernel)]), axis=0)


# --- key geometry --------------------------------------------------------------------------


@numba.njit(cache=True)
def _unit_keys(keys: np.ndarray) -> np.ndarray:
    """[T, H, d] keys divided by their norms (max(norm, eps)), as [H, T, d]: a zero key stays zero."""
    T, H, d = keys.shape
    u = np.empty((H, T, d), dtype=np.float64)
    for t in range(T):
        for h in range(H):
            n = 0.0
            for i in range(d):
                n += keys[t, h, i] * keys[t, h, i]
            n = max(np.sqrt(n), _EPS)
            for i in range(d):
                u[h, t, i] = keys[t, h, i] / n
    return u


@numba.njit(cache=True)
def _unit_key_sums(u: np.ndarray) -> np.ndarray:
    """[H, T, d] unit keys -> [H, d]: per head, the sum of its unit keys (the mean direction)."""
    H, T, d = u.shape
    s = np.zeros((H, d), dtype=np.float64)
    for h in range(H):
        for t in range(T):
            for i in range(d):
                s[h, i] += u[h, t, i]
    return s


def _unit_keys_ref(keys: np.ndarray) -> np.ndarray:
    """[T, H, d] unit keys (not transposed)."""
    return keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), _EPS)


@numba.njit(cache=True)
def cos_to_mean_direction(keys: np.ndarray) -> np.ndarray:
    """cos(k_j, mean of the unit keys) per head: keys [T, H, d] -> [H, T] (0 for a zero key).

    The mean direction is the mean of the normalised keys of the head (KeyDiff's anchor); when it
    is the zero vector every cosine is 0.
    """
    T, H, d = keys.shape
    u = _unit_keys(keys)
    sums = _unit_key_sums(u)
    out = np.zeros((H, T), dtype=np.float64)
    for h in range(H):
        m = sums[h]
        n = 0.0
        for i in range(d):
            n += m[i] * m[i]
        n = np.sqrt(n)
        if n <= _EPS:
            continue
        for t in range(T):
            acc = 0.0
            for i in range(d):
                acc += u[h, t, i] * m[i]
            out[h, t] = acc / n
    return out


def cos_to_mean_direction_ref(keys: np.ndarray) -> np.ndarray:
    """Reference of :func:`cos_to_mean_direction`."""
    u = _unit_keys_ref(keys)  # [T, H, d]
    m = u.sum(axis=0)  # [H, d] (direction of the mean)
    n = np.linalg.norm(m, axis=-1)  # [H]
    cos = np.einsum("thd,hd->ht", u, m) / np.maximum(n, _EPS)[:, None]
    return np.where(n[:, None] > _EPS, cos, 0.0)


@numba.njit(cache=True, fastmath=True)
def mean_cos_redundancy(keys: np.ndarray, retain_last: bool, threshold: float) -> np.ndarray:
    """Redundancy of each key: its cosine similarity to the other keys, averaged. [T, H, d] -> [H, T].

    ``red[h, j] = sum_{i != j} cos(k_i, k_j) / T`` (R-KV's column mean of the cosine matrix with a
    zeroed diagonal, so the divisor is T). This needs no T x T matrix: with s = sum of unit keys,
    ``sum_{i != j} cos(i, j) = s . u_j - u_j . u_j``.

    ``retain_last`` adds R-KV's "keep the newest copy" rule: for every row i, the entry of the
    last j != i with ``cos(i, j) > threshold`` is zeroed before the column mean, so the newest of
    a group of near-duplicates looks least redundant. Finding that j scans row i from the end
    (O(T^2 d) worst case; fastmath lets the dot products vectorise). Unlike the reference code,
    a row with no such j zeroes nothing (the reference then zeroes column 0).
    """
    T, H, d = keys.shape
    u = _unit_keys(keys)
    sums = _unit_key_sums(u)
    out = np.zeros((H, T), dtype=np.float64)
    for h in range(H):
        s = sums[h]
        for j in range(T):
            a = 0.0
            b = 0.0
            for i in range(d):
                a += s[i] * u[h, j, i]
                b += u[h, j, i] * u[h, j, i]
            out[h, j] = a - b
        if retain_last:
            for r in range(T):
                for j in range(T - 1, -1, -1):
                    if j == r:
                        continue
                    c = 0.0
                    for i in range(d):
                        c += u[h, r, i] * u[h, j, i]
                    if c > threshold:
                        out[h, j] -= c
                        break
        for j in range(T):
            out[h, j] /= T
    return out


def mean_cos_redundancy_ref(keys: np.ndarray, retain_last: bool, threshold: float) -> np.ndarray:
    """Reference of :func:`mean_cos_redundancy` with the full cosine matrix."""
    T, H, _ = keys.shape
    u = _unit_keys_ref(keys)
    out = np.zeros((H, T))
    for h in range(H):
        S = u[:, h] @ u[:, h].T
        np.fill_diagonal(S, 0.0)
        if retain_last:
            for r in range(T):
                hits = np.flatnonzero((S[r] > threshold) & (np.arange(T) != r))
                if hits.size:
                    S[r, hits[-1]] = 0.0
        out[h] = S.sum(axis=0) / max(T, 1)
    return out


# --- TriAttention --------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=True)
def tri_series(
    k_re: np.ndarray,
    k_im: np.ndarray,
    q_re: np.ndarray,
    q_im: np.ndarray,
    q_abs: np.ndarray,
    omega: np.ndarray,
    delta0: np.ndarray,
    offsets: np.ndarray,
    group: int,
) -> np.ndarray:
    """TriAttention's series per query head and key, averaged over the offsets.

    k_re, k_im [T, H_kv, F]: pre-RoPE keys as complex pairs; q_re, q_im, q_abs [n_head, F]:
    E[z_f] and E|z_f| of the head's pre-RoPE queries; omega [F]; delta0 [T] = query base position
    minus key position; offsets [O]. Query head h reads KV head h // group. Returns [n_head, T]::

        mean_o sum_f |E z_f| |k_f| cos(omega_f (delta0 + o) + arg E z_f - arg k_f)
                   + (E|z_f| - |E z_f|) |k_f|

    Each cosine is ``Re(E z_f conj(k_f) exp(i omega_f (delta0 + o)))``, so the mean over offsets is
    ``Re(E z_f conj(k_f) exp(i omega_f delta0) C_f)`` with ``C_f = mean_o exp(i omega_f o)``
    computed once: O(T F) trigonometric calls instead of O(T F O).
    """
    T, Hkv, F = k_re.shape
    n_head = q_re.shape[0]
    O = offsets.shape[0]
    c_re = np.zeros(F, dtype=np.float64)
    c_im = np.zeros(F, dtype=np.float64)
    for f in range(F):
        for o in range(O):
            c_re[f] += np.cos(omega[f] * offsets[o])
            c_im[f] += np.sin(omega[f] * offsets[o])
        c_re[f] /= O
        c_im[f] /= O
    # per frequency, the query-head side as contiguous rows (lets the head loop vectorise)
    qr = np.ascontiguousarray(q_re.T)
    qi = np.ascontiguousarray(q_im.T)
    qx = np.empty((F, n_head), dtype=np.float64)  # E|z| - |E z|
    for f in range(F):
        for h in range(n_head):
            qx[f, h] = q_abs[h, f] - np.sqrt(qr[f, h] * qr[f, h] + qi[f, h] * qi[f, h])
    out = np.zeros((n_head, T), dtype=np.float64)
    acc = np.empty(n_head, dtype=np.float64)
    for t in range(T):
        acc[:] = 0.0
        for f in range(F):
            e_re = np.cos(omega[f] * delta0[t])
            e_im = np.sin(omega[f] * delta0[t])
            b_re = e_re * c_re[f] - e_im * c_im[f]  # exp(i w delta0) * C_f
            b_im = e_re * c_im[f] + e_im * c_re[f]
            for kv in range(Hkv):
                kr = k_re[t, kv, f]
                ki = k_im[t, kv, f]
                km = np.sqrt(kr * kr + ki * ki)
                # Re(E z conj(k) B) = Re(E z) Re(conj(k) B) - Im(E z) Im(conj(k) B)
                u_re = kr * b_re + ki * b_im
                u_im = kr * b_im - ki * b_re
                for h in range(kv * group, min((kv + 1) * group, n_head)):
                    acc[h] += qr[f, h] * u_re - qi[f, h] * u_im + qx[f, h] * km
        for h in range(n_head):
            out[h, t] = acc[h]
    return out


def tri_series_ref(k_re, k_im, q_re, q_im, q_abs, omega, delta0, offsets, group) -> np.ndarray:
    """Reference of :func:`tri_series`: the series written out over [n_head, T, O, F]."""
    n_head = q_re.shape[0]
    kv = np.arange(n_head) // group
    k = (k_re + 1j * k_im)[:, kv, :].transpose(1, 0, 2)  # [n_head, T, F]
    q = (q_re + 1j * q_im)[:, None, :]  # [n_head, 1, F]
    amp = np.abs(q) * np.abs(k)
    phase = np.angle(q) - np.angle(k)
    dist = delta0[:, None] + offsets[None, :]  # [T, O]
    cos = np.cos(dist[None, :, :, None] * omega + phase[:, :, None, :])  # [n_head, T, O, F]
    series = (amp[:, :, None, :] * cos).sum(axis=-1).mean(axis=-1)
    extra = ((q_abs[:, None, :] - np.abs(q)) * np.abs(k)).sum(axis=-1)
    return series + extra


# --- Expected Attention: pre-RoPE query statistics -----------------------------------------


@numba.njit(cache=True, nogil=True)  # Expected Attention runs layers on several threads
def turn_center(
    q: np.ndarray, cos: np.ndarray, sin: np.ndarray, re: np.ndarray, im: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Turn each pair of the vectors ``q`` [n, H, d] (float32) and centre them per head.

    Pair ``f`` of vector ``i`` (dims ``re[f]``, ``im[f]``, as the complex ``x_re + i x_im``) is
    multiplied by ``cos[i, f] - i sin[i, f]`` (any complex factor, not only a unit one); the
    other dims stay. Returns the centred results [H, n, d] float32 (heads first, ready for a
    batched ``C^T C``) and their mean [H, d] float64 (accumulated in float64 before rounding).
    """
    n, H, d = q.shape
    F = re.shape[0]
    out = np.empty((H, n, d), dtype=np.float32)
    mu = np.zeros((H, d), dtype=np.float64)
    row = np.empty(d, dtype=np.float64)
    for i in range(n):
        for h in range(H):
            for j in range(d):
                row[j] = q[i, h, j]
            for f in range(F):
                x0 = row[re[f]]
                x1 = row[im[f]]
                c = cos[i, f]
                s = sin[i, f]
                row[re[f]] = x0 * c + x1 * s
                row[im[f]] = x1 * c - x0 * s
            for j in range(d):
                mu[h, j] += row[j]
                out[h, i, j] = row[j]
    for h in range(H):
        for j in range(d):
            mu[h, j] /= n
    for h in range(H):
        for i in range(n):
            for j in range(d):
                out[h, i, j] = out[h, i, j] - mu[h, j]
    return out, mu


def turn_center_ref(q, cos, sin, re, im) -> tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`turn_center`: each pair times the complex ``cos - i sin``."""
    x = np.asarray(q, dtype=np.float64).copy()
    z = (x[..., re] + 1j * x[..., im]) * (cos - 1j * sin)[:, None, :]
    x[..., re], x[..., im] = z.real, z.imag
    mu = x.mean(axis=0)
    return (x.astype(np.float32) - mu).astype(np.float32).transpose(1, 0, 2), mu


def warmup() -> None:
    """Compile (or load from cache) every kernel on tiny inputs, so no event pays for it."""
    x = np.ones((1, 4))
    avg_pool_rows(x, 3)
    max_pool_rows(x, 3)
    k = np.ones((4, 1, 2))
    cos_to_mean_direction(k)
    mean_cos_redundancy(k, True, 0.5)
    z = np.ones((4, 1, 1))
    q = np.ones((1, 1))
    tri_series(z, z, q, q, q, np.ones(1), np.ones(4), np.ones(2), 1)
    pairs = np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64)
    turn_center(np.ones((2, 1, 2), dtype=np.float32), np.ones((2, 1)), np.zeros((2, 1)), *pairs)
