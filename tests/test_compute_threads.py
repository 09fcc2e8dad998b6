"""The controller's arithmetic uses the session's thread count, not one thread per core."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numba
import pytest

from amslocal import compute_threads
from amslocal.backend import ContextParams, SamplerParams
from amslocal.session import CompressionConfig, Session


def test_use_sets_numba_and_blas_threads():
    assert compute_threads.use(1) == 1
    assert numba.get_num_threads() == 1
    if compute_threads.blas_threads() is not None:  # numpy's bundled OpenBLAS (the wheels)
        assert compute_threads.blas_threads() == 1
    top = numba.config.NUMBA_NUM_THREADS
    assert compute_threads.use(top + 5) == top  # at most one per core
    assert numba.get_num_threads() == top
    if compute_threads.blas_threads() is not None:
        assert compute_threads.blas_threads() == 1  # BLAS stays on one thread (see the module)


def test_numba_setting_belongs_to_the_calling_thread():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: nothing to tell apart")
    compute_threads.use(2)
    seen = []
    worker = threading.Thread(target=lambda: seen.append((compute_threads.use(1), numba.get_num_threads())))
    worker.start()
    worker.join()
    assert seen == [(1, 1)]
    assert numba.get_num_threads() == 2  # this thread's setting did not change


def test_an_event_runs_with_the_sessions_thread_count(tiny_model):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: every count is 1")
    compute_threads.use(numba.config.NUMBA_NUM_THREADS)
    if compute_threads.blas_threads() is not None:  # as numpy starts: one BLAS thread per core
        compute_threads._blas()[0](numba.config.NUMBA_NUM_THREADS)
        compute_threads._state["blas_pinned"] = False
    cfg = CompressionConfig(budget=64, interval=16, scorer="tova", ams=False)
    s = Session(tiny_model, cfg, ContextParams(n_threads=1), SamplerParams(temp=0))
    list(s.generate(tiny_model.tokenize("abcdefghij" * 10), 16, ignore_eos=True))
    assert s.stats.compressions > 0
    assert numba.get_num_threads() == 1
    if compute_threads.blas_threads() is not None:
        assert compute_threads.blas_threads() == 1
    s.close()


def test_map_layers_is_the_serial_loop_on_the_sessions_threads():
    compute_threads.use(1)
    seen: list[str] = []

    def work(x):
        seen.append(threading.current_thread().name)
        return x * x

    assert compute_threads.map_layers(work, range(7)) == [x * x for x in range(7)]
    assert set(seen) == {threading.current_thread().name}  # one thread: the caller's
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no second thread to use")
    compute_threads.use(2)
    seen.clear()
    assert compute_threads.map_layers(work, range(7)) == [x * x for x in range(7)]  # in order
    assert len(set(seen)) == 2 and threading.current_thread().name in seen
    compute_threads.use(1)


def test_map_layers_raises_a_workers_exception_and_pool_threads_leave_signals_to_main():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no pool thread")
    import signal

    compute_threads.use(2)

    def work(x):
        if threading.current_thread() is not threading.main_thread() and x == 3:
            raise ValueError("layer 3")
        return signal.pthread_sigmask(signal.SIG_BLOCK, [])

    with pytest.raises(ValueError, match="layer 3"):
        compute_threads.map_layers(work, range(4))  # items 1 and 3 go to the pool thread
    masks = compute_threads.map_layers(work, [0, 1])
    assert signal.SIGINT not in masks[0]  # the caller's mask is its own
    assert {signal.SIGINT, signal.SIGTERM} <= masks[1]
    compute_threads.use(1)


_CONCURRENT_LAUNCHES = """
import threading
import numpy as np
import numba
from amslocal.evidence import attention_per_query
from amslocal.select.kernels import row_votes

q = np.random.rand(16, 4, 8).astype(np.float32)
k = np.random.rand(64, 2, 8).astype(np.float32)
scores, mass = np.random.rand(6, 64), np.full((6, 64), 1 / 64)
protected = np.zeros(64, dtype=np.bool_)

def work():
    for _ in range(200):
        attention_per_query(q, k, np.arange(64, 80), np.arange(64), 0.3)
        row_votes(scores, mass, protected, 32, 0.25, 2, 16, 1)

threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("layer", numba.threading_layer(), "ok")
"""


def test_parallel_kernels_launch_from_many_threads_on_the_workqueue_layer():
    """Numba's workqueue layer (where it finds no OpenMP or TBB, e.g. pip's numba on macOS)
    aborts the process when two threads launch parallel kernels at once, as a server's sessions
    do; the kernels take turns there."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_LAUNCHES], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "layer workqueue ok" in run.stdout
