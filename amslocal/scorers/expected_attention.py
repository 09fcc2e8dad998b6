"""Expected Attention: attention the *future* queries are expected to pay (kvpress ``ExpectedAttentionPress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import compute_threads
from ._common import require, softmax_rows
from .base import NEEDS_KEYS, NEEDS_QUERIES, NEEDS_VALUES, ScoreInput
from .kernels import expected_attention_scores, turn_center
from .rope import rope_mean_turn, rope_omega, rope_pairs


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
        # per RoPE (LayerInfo is hashable; layers with the same RoPE share it): the complex factor
        # that turns each window query back to pre-RoPE and on by the future's mean rotation R,
        # so the statistics come out as mu' = R mu and Sigma' = R Sigma R^T directly
        turn: dict = {}
        for li in inp.layers:
            if li not in turn:
                theta = qpos.astype(np.float64)[:, None] * rope_omega(li)  # [n, F]
                c, s = rope_mean_turn(li, future)
                # (c + i s) e^{-i theta} = cos' - i sin'
                cos, sin = c * np.cos(theta) + s * np.sin(theta), c * np.sin(theta) - s * np.cos(theta)
                turn[li] = (cos, sin, *rope_pairs(li))
        # the reads here (llama.cpp's context serves one thread), the arithmetic on the session's threads
        layers = [
            (q, keys(l), None if values is None else values(l), turn[inp.layers[l]]) for l, q in enumerate(queries)
        ]
        blas = compute_threads.kernel_sgemm(), compute_threads.kernel_ssyrk()
        d = layers[0][1].shape[-1] if layers else 0
        if None not in blas and self.use_covariance and n > d:
            out = expected_attention_scores(blas, layers, n, self.n_sink, self.epsilon, self.use_vnorm)
            if out is not None:  # (None: layers of different shapes)
                return out
        # each layer takes milliseconds of products that release the GIL
        return np.stack(compute_threads.map_layers(lambda a: self._layer(*a), layers))

    def _layer(self, q, k, v, turn) -> np.ndarray:
        """One layer's scores [Hkv, T] from the post-RoPE queries ``q`` [>= n, n_head, d] of its window."""
        cos = turn[0]
        n = cos.shape[0]
        # the turned window queries, centred [n_head, n, d] float32, and their mean mu' [n_head, d]
        cen, mu = turn_center(np.ascontiguousarray(np.asarray(q)[-n:], dtype=np.float32), *turn)
        k32 = np.asarray(k, dtype=np.float32)
        T, Hkv, d = k32.shape
        G = mu.shape[0] // Hkv
        kt = k32.transpose(1, 0, 2)  # [Hkv, T, d] (a view: BLAS reads the strides)
        if not self.use_covariance:
            logits = np.einsum("kgd,ktd->kgt", mu.reshape(Hkv, G, d), kt.astype(np.float64)) / np.sqrt(d)
        elif n > d:
            # a long window: Sigma' (d x d, times n) once per head, then for a KV group's keys one
            # [T, d] x [d, G (d + 1)] product gives every head's k^T Sigma' k / (2 n d) (the first
            # G d columns, summed against k) and mu' . k / sqrt(d) (the last G); float32: the
            # scores only rank tokens and need ~1e-6, not 1e-15
            sigma = cen.transpose(0, 2, 1) @ cen  # [n_head, d, d]
            m = np.empty((Hkv, d, G * (d + 1)), dtype=np.float32)
            m[:, :, : G * d] = (sigma / (n * 2 * d)).reshape(Hkv, G, d, d).transpose(0, 2, 1, 3).reshape(Hkv, d, G * d)
            m[:, :, G * d :] = (mu / np.sqrt(d)).reshape(Hkv, G, d).transpose(0, 2, 1)
            p = kt @ m  # [Hkv, T, G (d + 1)]
            quad = np.matmul(p[:, :, : G * d].reshape(Hkv, T, G, d), kt[:, :, :, None])[..., 0]  # [Hkv, T, G]
            logits = (quad + p[:, :, G * d :]).transpose(0, 2, 1).astype(np.float64)
        else:
            # a short window: k^T Sigma' k = |C k|^2 / n, O(T n d), in float64
            k64 = kt.astype(np.float64)
            proj = cen.astype(np.float64).reshape(Hkv, G * n, d) @ k64.transpose(0, 2, 1)  # [Hkv, G n, T]
            pr = proj.reshape(Hkv, G, n, T)
            quad = np.einsum("kgwt,kgwt->kgt", pr, pr)
            logits = np.einsum("kgd,ktd->kgt", mu.reshape(Hkv, G, d), k64) / np.sqrt(d) + quad / (n * 2 * d)
        s0 = min(self.n_sink, T)
        out = np.zeros((Hkv, T))
        # per head, then the group's mean; as contiguous rows (numpy reduces a strided view slowly)
        z = softmax_rows(np.ascontiguousarray(logits[:, :, s0:]).reshape(Hkv * G, T - s0))
        out[:, s0:] = z.reshape(Hkv, G, T - s0).mean(axis=1)
        if v is not None:
            v32 = np.asarray(v, dtype=np.float32)
            vnorm = np.sqrt(np.einsum("thd,thd->ht", v32, v32))  # [Hkv, T]
            out = (out + self.epsilon) * vnorm
        if 0 < s0 < T:
            out[:, :s0] = out[:, s0:].max(axis=1, keepdims=True)
        return out
