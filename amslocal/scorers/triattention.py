"""TriAttention: score keys by the attention calibrated query statistics predict for the future.

From the public reference (github WeianMao/triattention, ``round_pruning_utils.py``). Read every
RoPE pair ``f`` of a head as a complex number (pairing by the layer's rope type, see
:mod:`.rope`). A query at position ``p`` and a key at position ``s``, both pre-RoPE ``z_f`` and
``k_f``, give the logit ``sum_f Re(z_f conj(k_f) exp(i w_f (p - s)))``. Replacing the query by
offline statistics of pre-RoPE queries of that head, ``E[z_f]`` (complex mean) and ``E|z_f|``::

    S_j(Delta) = sum_f |E z_f| |k_f| cos(w_f Delta + arg E z_f - arg k_f)
                     + (E|z_f| - |E z_f|) |k_f|

where ``Delta`` is a **query position minus the key's position** (the key is un-rotated from its
post-RoPE cached form at its current position ``s_j``). The score averages ``S_j`` over the
future queries at ``p = next_position + o``, ``o in {1, 2, 4, ..., offset_max_length}`` (17
offsets): ``Delta = next_position + o - s_j``. As in the reference (``round_start`` = tokens so
far = the next token's position, offsets from 1), the very next query (``o = 0``) is not among
them. ``w_f = freq_scale * base^(-2f / n_rot)``.

Dims past ``n_rot`` (partial RoPE) add ``E[q_rest] . k_rest``, which does not depend on distance
(an extension; the reference has full RoPE only). Scores are z-scored per query head over the
candidates, then the KV group's heads are averaged (``group_reduce="mean"``) or maxed (``"max"``,
the reference's combination across heads).

Calibration statistics (:func:`calibration_stats`) are per model layer **of the ScoreInput's
``layers`` list** (the KV layers of the full-attention cache, in that order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import numpy as np

from ..layers import LayerInfo
from ._common import require, zscore_rows
from .base import NEEDS_CALIBRATION, NEEDS_KEYS, ScoreInput
from .kernels import f64, tri_series
from .rope import n_freqs, rest_dims, rope_omega, rope_rotate, to_complex

CALIBRATION_VERSION = 1
_FACTS = ("n_head", "n_embd_head_k", "n_rot", "rope_type", "rope_freq_base", "rope_freq_scale")


def geometric_offsets(max_length: int) -> np.ndarray:
    """1, 2, 4, ... up to ``max_length`` (float64)."""
    if max_length < 1:
        raise ValueError("offset_max_length must be >= 1")
    return 2.0 ** np.arange(int(np.floor(np.log2(max_length))) + 1)


@dataclass
class TriAttention:
    """See the module docstring. Needs keys and ``inp.calibration`` from :func:`load_calibration`."""

    offset_max_length: int = 65536
    group_reduce: str = "mean"
    normalize: bool = True

    name: ClassVar[str] = "triattention"
    needs: ClassVar[frozenset[str]] = frozenset({NEEDS_KEYS, NEEDS_CALIBRATION})

    def __post_init__(self) -> None:
        if self.group_reduce not in ("mean", "max"):
            raise ValueError(f"triattention group_reduce must be 'mean' or 'max', got {self.group_reduce!r}")
        geometric_offsets(self.offset_max_length)  # validates

    @property
    def window(self) -> int:
        return 0

    def score(self, inp: ScoreInput) -> np.ndarray:
        keys = require(inp, "keys", self.name, "post-RoPE keys per layer")
        stats = require(inp, "calibration", self.name, "query statistics from `amslocal calibrate`")
        check_calibration(stats, inp.layers)
        positions = np.asarray(inp.positions, dtype=np.int64)
        delta0 = f64(int(inp.next_position) - positions)
        offsets = geometric_offsets(self.offset_max_length)
        return np.stack(
            [
                self._layer(li, l, keys(l), positions, delta0, offsets, stats, inp.group)
                for l, li in enumerate(inp.layers)
            ]
        )

    def _layer(self, li: LayerInfo, l: int, k, positions, delta0, offsets, stats, group) -> np.ndarray:
        k = rope_rotate(k, positions, li, inverse=True)  # [T, Hkv, d] pre-RoPE
        T, Hkv, _ = k.shape
        kc = to_complex(k, li)  # [T, Hkv, F]
        qm = np.asarray(stats["q_mean"][l])  # [n_head, F] complex
        s = tri_series(
            f64(kc.real),
            f64(kc.imag),
            f64(qm.real),
            f64(qm.imag),
            f64(stats["q_abs_mean"][l]),
            f64(rope_omega(li)),
            delta0,
            offsets,
            group,
        )  # [n_head, T]
        rest = rest_dims(k, li)  # [T, Hkv, d - 2F]
        if rest.shape[-1]:
            qr = np.asarray(stats["q_rest_mean"][l], dtype=np.float64)  # [n_head, d - 2F]
            s += np.einsum("hd,thd->ht", qr, rest[:, np.arange(qr.shape[0]) // group])
        if self.normalize:
            s = zscore_rows(s)
        s = s.reshape(Hkv, group, T)
        return s.mean(axis=1) if self.group_reduce == "mean" else s.max(axis=1)


# --- calibration -----------------------------------------------------------------------------


def _facts(li: LayerInfo) -> list[float]:
    return [float(getattr(li, f)) for f in _FACTS]


def calibration_stats(
    pre_rope_queries: Sequence[np.ndarray], layers: Sequence[LayerInfo], positions: Optional[np.ndarray] = None
) -> dict:
    """Per-layer, per-query-head statistics of pre-RoPE queries for :class:`TriAttention`.

    ``pre_rope_queries[l]``: [N, n_head, d] queries of ``layers[l]``. With ``positions`` [N] the
    queries are taken as post-RoPE (as llama.cpp reports them) and un-rotated first. Returns::

        {"q_mean": [L] of [n_head, F] complex128   E[z_f]
         "q_abs_mean": [L] of [n_head, F]          E|z_f|
         "q_rest_mean": [L] of [n_head, d - 2F]    E[q] on the dims RoPE leaves alone
         "n_samples": [L] int64, "layer_facts": [L, 6] (n_head, head size, n_rot, rope type,
         freq base, freq scale), "meta": {}}
    """
    if len(pre_rope_queries) != len(layers):
        raise ValueError(f"{len(pre_rope_queries)} query arrays for {len(layers)} layers")
    out: dict = {"q_mean": [], "q_abs_mean": [], "q_rest_mean": [], "meta": {}}
    n_samples = []
    for q, li in zip(pre_rope_queries, layers):
        q = np.asarray(q, dtype=np.float64)
        if q.ndim != 3 or q.shape[1] != li.n_head or q.shape[2] != li.n_embd_head_k:
            raise ValueError(f"queries of shape {q.shape}, expected [N, {li.n_head}, {li.n_embd_head_k}]")
        if positions is not None:
            q = rope_rotate(q, positions, li, inverse=True)
        z = to_complex(q, li)  # [N, n_head, F]
        out["q_mean"].append(z.mean(axis=0))
        out["q_abs_mean"].append(np.abs(z).mean(axis=0))
        out["q_rest_mean"].append(rest_dims(q, li).mean(axis=0))
        n_samples.append(q.shape[0])
    out["n_samples"] = np.asarray(n_samples, dtype=np.int64)
    out["layer_facts"] = np.asarray([_facts(li) for li in layers], dtype=np.float64).reshape(len(layers), len(_FACTS))
    return out


def merge_calibration(a: dict, b: dict) -> dict:
    """Statistics of the union of two calibration runs (means weighted by their sample counts)."""
    if not np.array_equal(a["layer_facts"], b["layer_facts"]):
        raise ValueError("cannot merge calibrations of different layers")
    na, nb = np.asarray(a["n_samples"], dtype=np.float64), np.asarray(b["n_samples"], dtype=np.float64)
    out = {"meta": dict(a.get("meta", {})), "layer_facts": a["layer_facts"], "n_samples": (na + nb).astype(np.int64)}
    for key in ("q_mean", "q_abs_mean", "q_rest_mean"):
        out[key] = [(xa * wa + xb * wb) / max(wa + wb, 1.0) for xa, xb, wa, wb in zip(a[key], b[key], na, nb)]
    return out


def check_calibration(stats: dict, layers: Sequence[LayerInfo]) -> None:
    """ValueError unless ``stats`` were made for exactly these layers (count, heads, RoPE)."""
    facts = np.asarray(stats.get("layer_facts", np.empty((0, len(_FACTS)))))
    want = np.asarray([_facts(li) for li in layers], dtype=np.float64).reshape(len(layers), len(_FACTS))
    if facts.shape != want.shape:
        raise ValueError(f"calibration has {facts.shape[0]} layers, the cache has {len(layers)}")
    bad = np.flatnonzero(~np.isclose(facts, want, rtol=1e-6).all(axis=1))
    if bad.size:
        l = int(bad[0])
        raise ValueError(
            f"calibration does not match layer {l}: "
            + ", ".join(f"{f} {x:g} vs {y:g}" for f, x, y in zip(_FACTS, facts[l], want[l]) if not np.isclose(x, y))
        )
    for l, li in enumerate(layers):
        if np.shape(stats["q_mean"][l]) != (li.n_head, n_freqs(li)):
            raise ValueError(f"calibration q_mean of layer {l} has shape {np.shape(stats['q_mean'][l])}")


def save_calibration(path, stats: dict, meta: Optional[dict] = None) -> Path:
    """Write ``stats`` (from :func:`calibration_stats`) and JSON-able ``meta`` to an .npz file."""
    path = Path(path)
    L = len(stats["q_mean"])
    arrays = {
        "version": np.asarray(CALIBRATION_VERSION),
        "n_samples": np.asarray(stats["n_samples"], dtype=np.int64),
        "layer_facts": np.asarray(stats["layer_facts"], dtype=np.float64),
        "meta": np.asarray(json.dumps({**stats.get("meta", {}), **(meta or {})})),
    }
    for l in range(L):
        qm = np.asarray(stats["q_mean"][l])
        arrays[f"q_mean_re_{l}"] = qm.real.astype(np.float64)
        arrays[f"q_mean_im_{l}"] = qm.imag.astype(np.float64)
        arrays[f"q_abs_mean_{l}"] = np.asarray(stats["q_abs_mean"][l], dtype=np.float64)
        arrays[f"q_rest_mean_{l}"] = np.asarray(stats["q_rest_mean"][l], dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(fh, **arrays)
    return path


def load_calibration(path) -> dict:
    """Read a file written by :func:`save_calibration`; the dict goes to ``ScoreInput.calibration``."""
    with np.load(Path(path), allow_pickle=False) as z:
        version = int(z["version"])
        if version != CALIBRATION_VERSION:
            raise ValueError(f"{path}: calibration format {version}, this build reads {CALIBRATION_VERSION}")
        L = int(z["layer_facts"].shape[0])
        return {
            "q_mean": [z[f"q_mean_re_{l}"] + 1j * z[f"q_mean_im_{l}"] for l in range(L)],
            "q_abs_mean": [z[f"q_abs_mean_{l}"] for l in range(L)],
            "q_rest_mean": [z[f"q_rest_mean_{l}"] for l in range(L)],
            "n_samples": z["n_samples"],
            "layer_facts": z["layer_facts"],
            "meta": json.loads(str(z["meta"])),
        }
