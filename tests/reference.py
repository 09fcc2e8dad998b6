"""Plain-numpy references the native paths are checked against."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def attention_mass(
    q: np.ndarray, k: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, scale: float, n_swa: int = 0
) -> np.ndarray:
    """Causal attention probability mass per key, summed over queries and each KV group's heads.

    q: [t, n_head, d] queries, k: [n, n_head_kv, d] keys; a query at position p sees keys at
    positions <= p (and, with a sliding window n_swa > 0, > p - n_swa). Returns [n_head_kv, n].
    """
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    n_head, n_head_kv = q.shape[1], k.shape[1]
    group = n_head // n_head_kv
    out = np.zeros((n_head_kv, k.shape[0]))
    for t in range(q.shape[0]):
        visible = (k_pos <= q_pos[t]) & ((n_swa == 0) | (q_pos[t] - k_pos < n_swa))
        for h in range(n_head):
            logits = scale * (k[:, h // group, :] @ q[t, h])
            logits = np.where(visible, logits, -np.inf)
            p = np.exp(logits - logits.max())
            out[h // group] += p / p.sum()
    return out


class TinyWeights:
    """The tensors and hyperparameters of a tiny llama GGUF, read back with ``gguf``."""

    def __init__(self, path: str | Path):
        r = gguf.GGUFReader(str(path))

        def val(key):
            f = r.fields[key]
            return f.parts[f.data[0]][0]

        self.t = {
            t.name: np.array(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors
        }
        self.n_head = int(val("llama.attention.head_count"))
        self.n_head_kv = int(val("llama.attention.head_count_kv"))
        self.head_dim = int(val("llama.attention.key_length"))
        self.eps = float(val("llama.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(val("llama.rope.freq_base"))

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """llama.cpp's NORM rope: adjacent pairs rotate by pos * base^(-2i/d). x: [n, h, d]."""
        d = x.shape[-1]
        ang = pos[:, None] * self.rope_base ** (-np.arange(0, d, 2) / d)[None, :]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def layer0_kv(self, tokens, positions) -> tuple[np.ndarray, np.ndarray]:
        """Layer-0 keys (post-RoPE) and values: they depend only on each token and its position."""
        x = self.t["token_embd.weight"][np.asarray(tokens)]
        h = x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.t["blk.0.attn_norm.weight"]
        n = len(tokens)
        k = (h @ self.t["blk.0.attn_k.weight"].T).reshape(n, self.n_head_kv, self.head_dim)
        v = (h @ self.t["blk.0.attn_v.weight"].T).reshape(n, self.n_head_kv, self.head_dim)
        return self.rope(k, np.asarray(positions, dtype=np.float64)), v
