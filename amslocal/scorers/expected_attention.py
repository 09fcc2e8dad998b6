"""Expected Attention: attention the *future* queries are expected to pay (kvpress ``ExpectedAttentionPress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._common import require, softmax_rows
from .base import NEEDS_KEYS, NEEDS_QUERIES, NEEDS_VALUES, ScoreInput
from .rope import rope_mean_matrix, rope_rotate


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
        # layers with the same RoPE share one averaged rotation (LayerInfo is hashable)
        rotations: dict = {}
        for li in inp.layers:
            if li not in rotations:
                rotations[li] = rope_mean_matrix(li, future)
        return np.stack(
            [
                self._layer(
                    inp,
                    l,
                    np.asarray(queries[l]),
                    np.asarray(qpos),
                    keys(l),
                    None if values is None else values(l),
                    rotations[inp.layers[l]],
                )
                for l in range(len(inp.layers))
            ]
        )

    def _layer(self, inp, l, q, qpos, k, v, R) -> np.ndarray:
        li = inp.layers[l]
        T = inp.n_tokens
        n = min(self.window, q.shape[0], len(qpos))
        if n == 0:
            raise ValueError(f"scorer {self.name!r}: no observed queries for layer {l}")
        q = rope_rotate(q[-n:], qpos[-n:], li, inverse=True)  # [n, n_head, d] pre-RoPE
        d = q.shape[-1]
        mu_pre = q.mean(axis=0)  # [n_head, d]
        mu = mu_pre @ R.T
        if self.use_covariance:
            # Sigma' = R C^T C R^T / n with C the centred queries, so k^T Sigma' k = |C R^T k|^2 / n:
            # O(T n d) per head while the window n <= d, else Sigma' (d x d) once and O(T d^2)
            c = ((q - mu_pre) @ R.T).transpose(1, 2, 0)  # [n_head, d, n]
        k = np.asarray(k, dtype=np.float64)  # [T, Hkv, d]
        Hkv = k.shape[1]
        G = q.shape[1] // Hkv
        out = np.empty((Hkv, T))
        s0 = min(self.n_sink, T)
        for kv in range(Hkv):
            K = k[:, kv, :]  # [T, d]
            heads = slice(kv * G, (kv + 1) * G)
            logits = mu[heads] @ K.T / np.sqrt(d)  # [G, T]
            if self.use_covariance:
                if n <= d:
                    proj = K[None] @ c[heads]  # [G, T, n]
                    logits += np.einsum("gtw,gtw->gt", proj, proj) / (n * 2 * d)
                else:  # a long window: Sigma' itself, O(T d^2) instead of O(T n d)
                    sigma = c[heads] @ c[heads].transpose(0, 2, 1)  # [G, d, d], times n
                    logits += np.einsum("gte,te->gt", K[None] @ sigma, K) / (n * 2 * d)
            p = np.zeros((G, T))
            p[:, s0:] = softmax_rows(logits[:, s0:])
            out[kv] = p.mean(axis=0)
        if v is not None:
            out = (out + self.epsilon) * np.linalg.norm(np.asarray(v, dtype=np.float64), axis=-1).T
        if 0 < s0 < T:
            out[:, :s0] = out[:, s0:].max(axis=1, keepdims=True)
        return out
