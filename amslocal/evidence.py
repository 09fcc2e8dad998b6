"""Attention evidence computed at the event from captured queries (issue 11).

Between two compression events no cell leaves the cache: new tokens only arrive, at larger
positions. So the attention a decode step's query paid to each cell can be recomputed later, from
that query (captured post-RoPE by the patch, one small copy per layer) and the keys still in the
cache, with the causal mask rebuilt from the positions. Doing it once per event, for all the
window's queries in one matrix product per layer, replaces the per-step side branch in the graph.

- :func:`group_softmax_sum`: masked softmax of one layer's logits, summed over each KV group's
  query heads (Numba); :func:`group_softmax_sum_ref` is its plain-numpy reference.
- :func:`attention_per_query`: logits by one batched matrix product, then the kernel.
"""

from __future__ import annotations

import numba
import numpy as np


# fast math without the no-NaN/no-Inf assumptions (the kernel never makes either)
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, fastmath=_FASTMATH)
def group_softmax_sum(logits: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, scale: float, n_swa: int,
                      out: np.ndarray) -> None:
    """out[t, h, j] = sum over the G query heads g of KV head h of softmax_j(scale * logits[h, g, t, :]).

    logits: [H_kv, G, W, n] float32 (raw q.k), q_pos [W] and k_pos [n] int64 (k_pos < 0: no token);
    key j is visible to query t when k_pos[j] <= q_pos[t] and, with a sliding window n_swa > 0,
    q_pos[t] - k_pos[j] < n_swa (llama.cpp's standard window). out: [W, H_kv, n] float32,
    overwritten; masked keys get exactly 0. Float32 throughout, like the softmax in the graph.
    """
    H, G, W, n = logits.shape
    sc = np.float32(scale)
    buf = np.empty(n, dtype=np.float32)
    visible = np.empty(n, dtype=np.bool_)
    out[:] = 0.0
    for t in range(W):
        p = q_pos[t]
        any_visible = False
        for j in range(n):
            kp = k_pos[j]
            visible[j] = kp >= 0 and kp <= p and (n_swa <= 0 or p - kp < n_swa)
            any_visible = any_visible or visible[j]
        if not any_visible:
            continue  # cannot happen for a real query (it sees itself); its row stays 0
        for h in range(H):
            acc = out[t, h]
            for g in range(G):
                row = logits[h, g, t]
                m = np.float32(-3.0e38)
                for j in range(n):
                    if visible[j] and sc * row[j] > m:
                        m = sc * row[j]
                s = np.float32(0.0)
                for j in range(n):
                    e = np.exp(sc * row[j] - m) if visible[j] else np.float32(0.0)
                    buf[j] = e
                    s += e
                inv = np.float32(1.0) / s
                for j in range(n):
                    acc[j] += buf[j] * inv


def group_softmax_sum_ref(logits: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, scale: float,
                          n_swa: int) -> np.ndarray:
    """Reference of :func:`group_softmax_sum` with whole-array numpy steps; returns out."""
    q_pos = np.asarray(q_pos)[:, None]
    k_pos = np.asarray(k_pos)[None, :]
    visible = (k_pos >= 0) & (k_pos <= q_pos)
    if n_swa > 0:
        visible &= q_pos - k_pos < n_swa
    x = np.where(visible[None, None], scale * logits.astype(np.float64), -np.inf)  # [H, G, W, n]
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    p = e / e.sum(axis=-1, keepdims=True)
    return p.sum(axis=1).transpose(1, 0, 2)  # [W, H, n]


def attention_per_query(q: np.ndarray, k: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
                        scale: float, n_swa: int = 0) -> np.ndarray:
    """Each query's attention probability on each key, summed over each KV group's heads.

    q: [W, n_head, d] float32 post-RoPE queries (query head h reads KV head h // G), k: [n, H_kv, d]
    float32 post-RoPE keys; returns [W, H_kv, n] float32.
    """
    W, n_head, d = q.shape
    n, H, _ = k.shape
    G = n_head // H
    qg = np.ascontiguousarray(q.reshape(W, H, G, d).transpose(1, 2, 0, 3)).reshape(H, G * W, d)
    kt = np.ascontiguousarray(k.transpose(1, 2, 0))  # [H, d, n]
    logits = np.matmul(qg, kt).reshape(H, G, W, n)  # one BLAS call per KV head
    out = np.empty((W, H, n), dtype=np.float32)
    group_softmax_sum(logits, np.ascontiguousarray(q_pos, dtype=np.int64),
                      np.ascontiguousarray(k_pos, dtype=np.int64), float(scale), int(n_swa), out)
    return out


def warmup() -> None:
    """Compile (or load from cache) the kernel on tiny inputs, so no event pays for it."""
    attention_per_query(np.ones((1, 2, 4), np.float32), np.ones((3, 1, 4), np.float32),
                        np.array([2]), np.array([0, 1, 2]), 0.5)
