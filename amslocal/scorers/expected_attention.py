"""Expected Attention: attention the *future* queries are expected to pay (kvpress ``ExpectedAttentionPress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import require, softmax_rows
from .base import NEEDS_KEYS, NEEDS_QUERIES, NEEDS_VALUES, ScoreInput
from .kernels import unrotate_center
from .rope import rope_mean_matrix, rope_omega, rope_pairs


@dataclass
class ExpectedAttention:
    """Score of key j for query head h (then averaged over the KV group's heads)::

        softmax_j( mu'_h . k_j / sqrt(d) + k_j^T Sigma'_h k_j / (2 d) ) * ||v_j||

    ``mu_h``, ``Sigma_h``: mean and covariance (divided by N) of the last ``window`` observed
    queries of head h, un-rotated to pre-RoPE at the positions they were computed at;
    ``mu' = R mu``, ``Sigma' = R Sigma R^T`` with ``R`` the RoPE matrix averaged over the
    ``n_future_positions`` positions from ``next_position`` on. ``k_j`` are the post-RoPE keys as
    stored. As kvpress: the softmax runs over every candidate but the first ``n_sink`` (their
    huge logits would flatten the rest); the sinks then get their row's maximum score (the
    engine protects them anyway); GQA averages the per-head scores (after the softmax) over each
    group; ``(score + epsilon) * ||v_j||``.
    """

    window: int = 256  # the reference evaluation buffers up to 256 queries
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 1e-2  # the reference evaluation's epsilon

    name: ClassVar[str] = "expected-attention"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_QUERIES, NEEDS_KEYS, NEEDS_VALUES})

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"expected-attention window must be >= 1, got {self.window}")

    def score(self, inp: ScoreInput) -> np.ndarray:
        queries = require(inp, "queries", self.name, "recent post-RoPE queries per layer")
        qpos = require(inp, "query_positions", self.name, "the positions of those queries")
        keys = require(inp, "keys", self.name, "post-RoPE keys per layer")
        values = require(inp, "values", self.name, "values per layer") if self.use_vnorm else None
        future = int(inp.next_position) + np.arange(self.n_future_positions)
        n = min(self.window, min(np.asarray(q).shape[0] for q in queries), len(qpos))
        if n == 0:
            raise ValueError(f"scorer {self.name!r}: no observed queries")
        qpos = np.asarray(qpos)[-n:]
        # layers with the same RoPE (LayerInfo is hashable) share the averaged future rotation
        # and the angles that un-rotate the window's queries
        rope: dict = {}
        for li in inp.layers:
            if li not in rope:
                theta = qpos.astype(np.float64)[:, None] * rope_omega(li)  # [n, F]
                rope[li] = (rope_mean_matrix(li, future), np.cos(theta), np.sin(theta), *rope_pairs(li))
        return np.stack(
            [
                self._layer(inp, q, keys(l), None if values is None else values(l), rope[inp.layers[l]])
                for l, q in enumerate(queries)
            ]
        )

    def _layer(self, inp, q, k, v, rope) -> np.ndarray:
        """One layer's scores from the post-RoPE queries ``q`` [>= n, n_head, d] of its window."""
        R, cos, sin, re, im = rope
        n = cos.shape[0]
        d = R.shape[0]
        # centred pre-RoPE queries [n_head, n, d] (float32) and their mean [n_head, d]
        cen, mu_pre = unrotate_center(np.ascontiguousarray(np.asarray(q)[-n:], dtype=np.float32), cos, sin, re, im)
        k32 = np.asarray(k, dtype=np.float32)  # [T, Hkv, d]
        T, Hkv = k32.shape[0], k32.shape[1]
        k64 = k32.astype(np.float64)
        mu = mu_pre @ R.T  # mu' = R mu
        G = mu.shape[0] // Hkv
        if self.use_covariance and n > d:
            # a long window: Sigma (d x d) once per head and k^T Sigma' k = (R^T k)^T Sigma (R^T k),
            # R applied to all keys of the layer in one product; in float32 (the scores need ~1e-6,
            # not 1e-15). A short window: k^T Sigma' k = |C R^T k|^2 / n, O(T n d), in float64
            sigma = cen.transpose(0, 2, 1) @ cen  # [n_head, d, d], times n
            kr = (k32.reshape(T * Hkv, d) @ R.astype(np.float32)).reshape(T, Hkv, d)  # rows R^T k
        elif self.use_covariance:
            kr = (k64.reshape(T * Hkv, d) @ R).reshape(T, Hkv, d)
        out = np.empty((Hkv, T))
        s0 = min(self.n_sink, T)
        for kv in range(Hkv):
            heads = slice(kv * G, (kv + 1) * G)
            logits = mu[heads] @ k64[:, kv, :].T / np.sqrt(d)  # [G, T]
            if self.use_covariance:
                K = np.ascontiguousarray(kr[:, kv, :])  # [T, d]
                if n <= d:
                    proj = cen[heads].astype(np.float64) @ K.T  # [G, n, T]
                    logits += np.einsum("gwt,gwt->gt", proj, proj) / (n * 2 * d)
                else:  # the G heads' Sigma side by side: one [T, d] x [d, G d] product
                    P = K @ sigma[heads].transpose(1, 0, 2).reshape(d, G * d)  # [T, G d]
                    quad = np.einsum("tgd,td->gt", P.reshape(T, G, d), K)
                    logits += quad.astype(np.float64) / (n * 2 * d)
            p = np.zeros((G, T))
            p[:, s0:] = softmax_rows(logits[:, s0:])
            out[kv] = p.mean(axis=0)
        if v is not None:
            vnorm = np.linalg.norm(np.asarray(v, dtype=np.float32), axis=-1).T  # [Hkv, T]
            out = (out + self.epsilon) * vnorm
        if 0 < s0 < T:
            out[:, :s0] = out[:, s0:].max(axis=1, keepdims=True)
        return out
