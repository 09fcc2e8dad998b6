"""Shared fixtures: a tiny random-weight GGUF (made here, no download) and the default model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from tiny_gguf import write_tiny_llama_gguf  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# one marker for the tests that need the default model (models/fetch.py fetches it)
needs_model = pytest.mark.skipif(
    not DEFAULT_MODEL.exists(), reason="default model missing; run: python models/fetch.py"
)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """2 layers, 4 query heads over 2 KV heads (GQA), head size 64, f32 weights."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", head_dim=64, n_layer=2, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf):
    from amslocal.backend import Model

    return Model(tiny_gguf)


@pytest.fixture(scope="session")
def smollm2_model():
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"default model missing at {DEFAULT_MODEL}; run: python models/fetch.py")
    from amslocal.backend import Model

    return Model(DEFAULT_MODEL)


@pytest.fixture(params=["kernel-blas", "numpy-matmul"])
def products(request, monkeypatch):
    """Both ways to the controller's products: BLAS called from the Numba kernels' threads, and
    numpy's matmul (where numpy's BLAS is not OpenBLAS)."""
    import numba

    from amslocal import compute_threads

    if request.param == "kernel-blas":
        # what a session's event does first (BLAS on one thread), with every core, so that the
        # kernel's threads call BLAS at once
        compute_threads.use(numba.config.NUMBA_NUM_THREADS)
        if compute_threads.kernel_sgemm() is None or compute_threads.kernel_ssyrk() is None:
            pytest.skip("numpy's BLAS here has no cblas_sgemm and cblas_ssyrk to call from kernels")
    else:
        monkeypatch.setattr(compute_threads, "kernel_sgemm", lambda: None)
        monkeypatch.setattr(compute_threads, "kernel_ssyrk", lambda: None)
    return request.param
