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
        # the window's queries un-rotated to pre-RoPE, one rotation for all layers that share RoPE
        n = min(self.window, min(np.asarray(q).shape[0] for q in queries), len(qpos))
        if n == 0:
            raise ValueError(f"scorer {self.name!r}: no observed queries")
        qpos = np.asarray(qpos)[-n:]
        pre: dict[int, np.ndarray] = {}
        for li in rotations:
            ls = [l for l in range(len(inp.layers)) if inp.layers[l] == li]
            stacked = np.stack([np.asarray(queries[l])[-n:] for l in ls], axis=1)  # [n, L', n_head, d]
            # float32 for a long window (the same precision as the captured queries)
            stacked = rope_rotate(
                stacked, qpos, li, inverse=True, dtype=np.float32 if n > li.n_embd_head_k else np.float64
            )
            pre.update({l: stacked[:, j] for j, l in enumerate(ls)})
        return np.stack(
            [
                self._layer(inp, l, pre[l], keys(l), None if values is None else values(l), rotations[inp.layers[l]])
                for l in range(len(inp.layers))
            ]
        )

    def _layer(self, inp, l, q, k, v, R) -> np.ndarray:
        """Layer ``l``'s scores from its window's pre-RoPE queries ``q`` [n, n_head, d]."""
        T = inp.n_tokens
        n = q.shape[0]
        d = q.shape[-1]
        mu_pre = q.mean(axis=0, dtype=np.float64)  # [n_head, d]
        mu = mu_pre @ R.T
        if self.use_covariance:
            # Sigma' = R C^T C R^T / n with C the centred queries, so k^T Sigma' k = |C R^T k|^2 / n:
            # O(T n d) per head while the window n <= d, else Sigma' (d x d) once and O(T d^2)
            if n <= d:
                c = ((q - mu_pre) @ R.T).transpose(1, 2, 0)  # [n_head, d, n]
            else:  # float32 for the big products (the scores need ~1e-6, not 1e-15)
                cen = (q - mu_pre).astype(np.float32).transpose(1, 0, 2)  # [n_head, n, d]
                Rf = R.astype(np.float32)
                sigma_all = Rf @ (cen.transpose(0, 2, 1) @ cen) @ Rf.T  # [n_head, d, d], times n
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
                    Kf = K.astype(np.float32)
                    quad = ((Kf[None] @ sigma_all[heads]) * Kf[None]).sum(axis=-1)  # [G, T]
                    logits += quad.astype(np.float64) / (n * 2 * d)
            p = np.zeros((G, T))
            p[:, s0:] = softmax_rows(logits[:, s0:])
            out[kv] = p.mean(axis=0)
        if v is not None:
            out = (out + self.epsilon) * np.linalg.norm(np.asarray(v, dtype=np.float64), axis=-1).T
        if 0 < s0 < T:
            out[:, :s0] = out[:, s0:].max(axis=1, keepdims=True)
        return out
