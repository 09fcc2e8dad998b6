"""RoPE as llama.cpp applies it, in plain numpy: rotate, un-rotate, and the facts scorers need.

llama.cpp (``ggml_rope_ext``, ``ext_factor == 0``) rotates the first ``n_rot`` dims of a head in
``n_rot / 2`` pairs; pair ``f`` at position ``p`` turns by ``theta_f = p * freq_scale *
base^(-2f / n_rot)``: ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)``. Which dims form pair
``f`` depends on the rope type:

- NORM (0, llama): adjacent dims ``(2f, 2f + 1)``;
- NEOX (2, qwen2/3, gpt-neox): the halves ``(f, f + n_rot / 2)``.

Dims ``>= n_rot`` pass through. Reading pair ``f`` as the complex number ``z_f = x0 + i x1``, the
rotation is ``z_f -> z_f * exp(i theta_f)``. Rope type NONE (-1) rotates nothing.

Not modelled (LayerInfo does not carry them): YaRN (``ext_factor``, ``attn_factor``), per-dim
``rope_freq_factors`` (llama3 / longrope scaling), M-RoPE sections and vision RoPE. The other rope
types are refused rather than silently mis-rotated.
"""

from __future__ import annotations

import numpy as np

from ..layers import LayerInfo

ROPE_NONE = -1
ROPE_NORM = 0
ROPE_NEOX = 2


def _check(layer: LayerInfo) -> None:
    if layer.rope_type not in (ROPE_NONE, ROPE_NORM, ROPE_NEOX):
        raise NotImplementedError(f"rope type {layer.rope_type} is not supported (only NONE -1, NORM 0, NEOX 2)")
    if layer.rope_type != ROPE_NONE and (layer.n_rot % 2 or layer.n_rot > layer.n_embd_head_k):
        raise ValueError(f"bad n_rot {layer.n_rot} for head size {layer.n_embd_head_k}")


def n_freqs(layer: LayerInfo) -> int:
    """Number of rotating pairs (complex frequencies) of a head."""
    _check(layer)
    return 0 if layer.rope_type == ROPE_NONE else layer.n_rot // 2


def rope_pairs(layer: LayerInfo) -> tuple[np.ndarray, np.ndarray]:
    """(re, im): the dims forming the real and imaginary part of each frequency, [F] int64 each."""
    F = n_freqs(layer)
    f = np.arange(F, dtype=np.int64)
    if layer.rope_type == ROPE_NORM:
        return 2 * f, 2 * f + 1
    return f, f + F  # NEOX (F == 0 for NONE)


def rope_omega(layer: LayerInfo) -> np.ndarray:
    """Angular frequency of each pair, radians per position: freq_scale * base^(-2f/n_rot). [F]"""
    F = n_freqs(layer)
    if F == 0:
        return np.zeros(0)
    f = np.arange(F, dtype=np.float64)
    return float(layer.rope_freq_scale) * float(layer.rope_freq_base) ** (-2.0 * f / layer.n_rot)


def _lead(positions, x_ndim: int) -> np.ndarray:
    """Positions as float64, with trailing axes added so they index the leading axes of x."""
    p = np.asarray(positions, dtype=np.float64)
    return p.reshape(p.shape + (1,) * (x_ndim - 1 - p.ndim))


def _pair_view(x: np.ndarray, layer: LayerInfo) -> tuple[np.ndarray, np.ndarray]:
    """Views (x0, x1) [..., F] of the real and imaginary dims of every pair of ``x`` [..., d]."""
    F = n_freqs(layer)
    rot = x[..., : 2 * F]
    if layer.rope_type == ROPE_NORM:
        pairs = rot.reshape(rot.shape[:-1] + (F, 2))
        return pairs[..., 0], pairs[..., 1]
    pairs = rot.reshape(rot.shape[:-1] + (2, F))
    return pairs[..., 0, :], pairs[..., 1, :]


def rope_rotate(x: np.ndarray, positions, layer: LayerInfo, inverse: bool = False, dtype=np.float64) -> np.ndarray:
    """Rotate ``x`` [..., d] as llama.cpp does at ``positions`` (or undo it with ``inverse``).

    ``positions`` index the leading axes of ``x``: a scalar, [N] for x [N, ..., d], [N, M] for
    x [N, M, ..., d], ...; they broadcast over the remaining ones. Returns a new array of ``dtype``
    (the angles are always computed in float64).
    """
    x = np.asarray(x, dtype=dtype)
    out = np.array(x, dtype=dtype, order="C")
    F = n_freqs(layer)
    if F == 0:
        return out
    theta = _lead(positions, x.ndim)[..., None] * rope_omega(layer)  # [..., F]
    if inverse:
        theta = -theta
    c, s = np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)
    x0, x1 = _pair_view(np.ascontiguousarray(x), layer)
    o0, o1 = _pair_view(out, layer)
    o0[...] = x0 * c - x1 * s
    o1[...] = x0 * s + x1 * c
    return out


def to_complex(x: np.ndarray, layer: LayerInfo) -> np.ndarray:
    """The rotating pairs of ``x`` [..., d] as complex numbers [..., F] (x0 + i x1)."""
    x0, x1 = _pair_view(np.ascontiguousarray(x, dtype=np.float64), layer)
    return x0 + 1j * x1


def rest_dims(x: np.ndarray, layer: LayerInfo) -> np.ndarray:
    """The dims of ``x`` [..., d] that never rotate: [..., d - 2F]."""
    return np.asarray(x, dtype=np.float64)[..., 2 * n_freqs(layer) :]


def rope_mean_turn(layer: LayerInfo, positions) -> tuple[np.ndarray, np.ndarray]:
    """The rotation averaged over ``positions``, per pair: (mean cos, mean sin), [F] each. Pair
    ``f`` of ``R x`` (see :func:`rope_mean_matrix`) is ``(c[f] + i s[f]) * (x_re + i x_im)``."""
    theta = np.asarray(positions, dtype=np.float64).reshape(-1, 1) * rope_omega(layer)  # [P, F]
    return np.cos(theta).mean(axis=0), np.sin(theta).mean(axis=0)


def rope_mean_matrix(layer: LayerInfo, positions) -> np.ndarray:
    """The rotation matrix averaged over ``positions``: [d, d], with ``rotate(x, p) = R_p @ x``."""
    d = layer.n_embd_head_k
    R = np.eye(d)
    if n_freqs(layer) == 0:
        return R
    c, s = rope_mean_turn(layer, positions)
    re, im = rope_pairs(layer)
    R[re, re] = c
    R[re, im] = -s
    R[im, re] = s
    R[im, im] = c
    return R
