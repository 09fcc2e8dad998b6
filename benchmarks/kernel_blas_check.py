"""Check the kernels that call numpy's OpenBLAS from their threads against their references, under
whatever numpy this interpreter has: written to try numpy 1.x's OpenBLAS (``cblas_sgemm64_``,
``openblas_set_num_threads64_``), which the project's own environment (numpy 2) never loads.

Needs numpy, numba and the repository on the path, not the native library::

    python3 -m venv /tmp/np1 && /tmp/np1/bin/pip install "numpy<2" "numba==0.68.1"
    NUMBA_CACHE_DIR=/tmp/np1-cache PYTHONPATH=. /tmp/np1/bin/python benchmarks/kernel_blas_check.py
"""

from __future__ import annotations

import numba
import numpy as np

from amslocal import compute_threads
from amslocal.evidence import attention_per_query, attention_rows_ref
from amslocal.layers import LayerInfo
from amslocal.scorers import ExpectedAttention
from amslocal.scorers.base import ScoreInput


def main() -> None:
    compute_threads.use(numba.config.NUMBA_NUM_THREADS)
    sgemm, ssyrk = compute_threads.kernel_sgemm(), compute_threads.kernel_ssyrk()
    print(f"numpy {np.__version__}, BLAS threads {compute_threads.blas_threads()}, sgemm {sgemm}, ssyrk {ssyrk}")
    if sgemm is None or ssyrk is None:
        raise SystemExit("no kernel BLAS found: the kernels would take the numpy path")
    worst = 0.0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        H, G, W = rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 140)
        n, d = rng.integers(3, 300), rng.integers(2, 65)
        q = (rng.standard_normal((W, H * G, d)) * 2).astype(np.float32)
        k = (rng.standard_normal((n, H, d)) * 2).astype(np.float32)
        k_pos = rng.permutation(n).astype(np.int64)
        if seed % 2:  # in position order, as an event passes them (the kernel's other mask)
            k_pos.sort()
        q_pos = np.sort(rng.integers(n // 2, n + 3, W)).astype(np.int64)
        got, want = attention_per_query(q, k, q_pos, k_pos, 0.3, 0), attention_rows_ref(q, k, q_pos, k_pos, 0.3, 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"evidence: kernel = reference in 20 random cases, 10 with keys in order (largest difference {worst:.1e})")
    worst = 0.0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        L, T, W = 4, 200, 96
        layers = [LayerInfo(0, 9, 3, 64, 64, 64, 2, 0, 1e4, 1.0) for _ in range(L)]
        qs = [rng.normal(size=(W, 9, 64)).astype(np.float32) + rng.normal(size=64).astype(np.float32) for _ in layers]
        kv = [rng.normal(size=(T, 3, 64)).astype(np.float32) for _ in range(2 * L)]
        inp = ScoreInput(
            positions=np.arange(T, dtype=np.int64),
            cells=np.arange(T, dtype=np.int32),
            layers=layers,
            group=3,
            next_position=300,
            queries=qs,
            query_positions=np.arange(300 - W, 300),
            keys=lambda l: kv[l],
            values=lambda l: kv[L + l],
        )
        scorer = ExpectedAttention(window=W)
        got = scorer.score(inp)
        compute_threads._state["sgemm"] = None  # the numpy path, the kernel's reference
        want = scorer.score(inp)
        compute_threads._state["sgemm"] = sgemm
        np.testing.assert_allclose(got, want, rtol=2e-5)
        worst = max(worst, float(np.abs(got / want - 1).max()))
    print(f"expected attention: kernel = numpy path in 5 random cases (largest relative difference {worst:.1e})")


if __name__ == "__main__":
    main()
