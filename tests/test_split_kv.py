"""Patch 0003: ggml's split-KV flash attention gives each thread an equal share of the visible
cells, not an equal range of cells. Any split must give the same attention.

The op is run here on its own, through ggml's C API: one query over >= 512 cells with holes in
the mask (ggml's split path), on 1, 2 and 3 threads, against a float64 softmax. A whole model is
no check: a decode step's logits move by up to ~0.7 between 1 and 2 threads in stock ggml too
(the split's rounding, amplified over 30 layers), which would hide a lost or doubled cell.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from amslocal.backend._ams_raw import _llama as llama

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml():
    """libggml-base and libggml-cpu next to the libllama this process loaded."""
    lib_dir = Path(llama._lib._name).parent
    base, cpu = (ctypes.CDLL(str(lib_dir / f"libggml-{name}.so")) for name in ("base", "cpu"))
    p = ctypes.c_void_p
    base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], p
    base.ggml_free.argtypes, base.ggml_free.restype = [p], None
    base.ggml_new_tensor_4d.argtypes = [p, ctypes.c_int] + [ctypes.c_int64] * 4
    base.ggml_new_tensor_4d.restype = p
    base.ggml_flash_attn_ext.argtypes = [p, p, p, p, p, ctypes.c_float, ctypes.c_float, ctypes.c_float]
    base.ggml_flash_attn_ext.restype = p
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [p], p
    base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [p, p], None
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [p], p
    cpu.ggml_graph_compute_with_ctx.argtypes, cpu.ggml_graph_compute_with_ctx.restype = (
        [p, p, ctypes.c_int],
        ctypes.c_int,
    )
    return base, cpu


def _flash_attn(q, k, v, mask, scale, n_threads):
    """ggml_flash_attn_ext of one query: q [n_head, d], k and v [n_head_kv, n_kv, d] (K/V type of
    their dtype), mask [n_kv] (0 or -inf) -> [n_head, d] float32."""
    base, cpu = _ggml()
    n_head, d = q.shape
    n_head_kv, n_kv, _ = k.shape
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    assert ctx
    try:
        kv_type = GGML_TYPE_F16 if k.dtype == np.float16 else GGML_TYPE_F32
        tq = base.ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d, 1, n_head, 1)
        tk = base.ggml_new_tensor_4d(ctx, kv_type, d, n_kv, n_head_kv, 1)
        tv = base.ggml_new_tensor_4d(ctx, kv_type, d, n_kv, n_head_kv, 1)
        tm = base.ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, 1)
        for t, a in ((tq, q.astype(np.float32)), (tk, k), (tv, v), (tm, mask.astype(np.float16))):
            a = np.ascontiguousarray(a)
            ctypes.memmove(base.ggml_get_data(t), a.ctypes.data, a.nbytes)
        out = base.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0, 0.0)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        res = np.empty((n_head, d), dtype=np.float32)  # [d, n_head, 1] in ggml's order
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


def _reference(q, k, v, mask, scale):
    G = q.shape[0] // k.shape[0]
    kh, vh = np.repeat(k.astype(np.float64), G, axis=0), np.repeat(v.astype(np.float64), G, axis=0)
    logits = scale * np.einsum("hd,hjd->hj", q.astype(np.float64), kh) + mask
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.einsum("hj,hjd->hd", p / p.sum(axis=1, keepdims=True), vh)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # the split path's cache types
@pytest.mark.parametrize("n_kv", [512, 768])
def test_split_flash_attention_equals_softmax_on_any_thread_count(dtype, n_kv):
    rng = np.random.default_rng(n_kv)
    n_head, n_head_kv, d = 6, 2, 64
    q = rng.normal(size=(n_head, d))
    k = rng.normal(size=(n_head_kv, n_kv, d)).astype(dtype)
    v = rng.normal(size=(n_head_kv, n_kv, d)).astype(dtype)
    # an evicted, refilled cache: most of the low cells empty, scattered holes, an empty tail
    mask = np.zeros(n_kv)
    mask[10:200] = -np.inf
    mask[rng.random(n_kv) < 0.2] = -np.inf
    mask[n_kv - 100 :] = -np.inf
    want = _reference(q, k, v, mask, 0.125)
    for n_threads in (1, 2, 3):
        got = _flash_attn(q, k, v, mask, 0.125, n_threads)
        # f16 K/V: the query is rounded to f16 for the products, as in a model's decode
        np.testing.assert_allclose(
            got, want, atol=2e-3 if dtype == np.float16 else 2e-5, err_msg=f"{n_threads} threads"
        )
