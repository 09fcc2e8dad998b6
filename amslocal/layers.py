"""Facts about one attention layer, shared by the cache view and the scorers (no backend import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerInfo:
    """Shape and RoPE facts of one layer, as llama.cpp uses them."""

    cache: int  # 0 = base cache, 1 = sliding-window cache, -1 = no KV
    n_head: int
    n_head_kv: int
    n_embd_head_k: int
    n_embd_head_v: int
    n_rot: int
    rope_type: int
    n_swa: int
    rope_freq_base: float
    rope_freq_scale: float
