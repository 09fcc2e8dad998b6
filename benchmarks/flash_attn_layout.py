"""ggml's CPU flash attention alone: one decode query over 30 layers shaped like SmolLM2's (9 query
heads, 3 KV heads, head size 64, 512 cells, f16 K/V), with the same 257 visible cells laid out as
StreamingLLM leaves them (the sinks and one run) or scattered as token sets leave them. The two
layouts take turns; between calls a 100 MB buffer is written, as a decode step's weights would
evict the caches (BENCHMARKS.md §9.8).

    .venv/bin/python benchmarks/flash_attn_layout.py [--threads 2] [--kv f16|f32] [--reps 300] [--warm]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

# the ggml C API through ctypes, as the split-KV test drives it
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_split_kv import GGML_TYPE_F16, GGML_TYPE_F32, _ggml, _InitParams  # noqa: E402

N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM, N_KV, N_VISIBLE = 30, 9, 3, 64, 512, 257


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", choices=("f16", "f32"), default="f16")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warm", action="store_true", help="do not evict the caches between calls")
    a = ap.parse_args()
    base, cpu = _ggml()
    ctx = base.ggml_init(_InitParams(256 << 20, None, False))
    rng = np.random.default_rng(0)
    kv_type, kv_dtype = (GGML_TYPE_F16, np.float16) if a.kv == "f16" else (GGML_TYPE_F32, np.float32)
    mask = base.ggml_new_tensor_4d(ctx, GGML_TYPE_F16, N_KV, 1, 1, 1)
    graph = base.ggml_new_graph(ctx)
    for _ in range(N_LAYER):
        q = base.ggml_new_tensor_4d(ctx, GGML_TYPE_F32, HEAD_DIM, 1, N_HEAD, 1)
        k = base.ggml_new_tensor_4d(ctx, kv_type, HEAD_DIM, N_KV, N_HEAD_KV, 1)
        v = base.ggml_new_tensor_4d(ctx, kv_type, HEAD_DIM, N_KV, N_HEAD_KV, 1)
        for t, x in (
            (q, 2 * rng.normal(size=(N_HEAD, HEAD_DIM)).astype(np.float32)),
            (k, rng.normal(size=(N_HEAD_KV, N_KV, HEAD_DIM)).astype(kv_dtype)),
            (v, rng.normal(size=(N_HEAD_KV, N_KV, HEAD_DIM)).astype(kv_dtype)),
        ):
            ctypes.memmove(base.ggml_get_data(t), x.ctypes.data, x.nbytes)
        base.ggml_build_forward_expand(graph, base.ggml_flash_attn_ext(ctx, q, k, v, mask, 0.125, 0.0, 0.0))

    def mask_of(visible: np.ndarray) -> np.ndarray:
        m = np.full(N_KV, -np.inf, dtype=np.float16)
        m[visible] = 0
        return m

    # 384 cells in use (budget 256 + interval 128), 257 of them visible right after an event
    layouts = {
        "one run": mask_of(np.r_[0:4, 131 : 131 + N_VISIBLE - 4]),
        "scattered": mask_of(np.r_[0:4, np.sort(rng.choice(np.arange(4, 384), N_VISIBLE - 4, replace=False))]),
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    flush = np.zeros(100 << 17)  # 100 MB of float64
    for _ in range(a.reps):
        for name, m in layouts.items():
            ctypes.memmove(base.ggml_get_data(mask), m.ctypes.data, m.nbytes)
            if not a.warm:
                flush += 1.0
            t0 = time.perf_counter()
            cpu.ggml_graph_compute_with_ctx(ctx, graph, a.threads)
            times[name].append(time.perf_counter() - t0)
    base.ggml_free(ctx)
    runs = {name: 1 + int(np.count_nonzero(np.diff(np.flatnonzero(m == 0)) > 1)) for name, m in layouts.items()}
    print(
        f"flash attention alone: {N_LAYER} layers, {N_VISIBLE} of {N_KV} cells visible, K/V {a.kv}, "
        f"{a.threads} threads, {a.reps} calls each, caches {'warm' if a.warm else 'evicted between calls'}"
    )
    med = {name: float(np.median(t[10:])) for name, t in times.items()}
    for name in layouts:
        print(f"  {name:10s} ({runs[name]:3d} runs of cells): median {med[name] * 1e3:.3f} ms")
    print(f"  scattered / one run: {med['scattered'] / med['one run']:.3f}")


if __name__ == "__main__":
    main()
