"""How many threads the controller's arithmetic (Numba's parallel kernels, numpy's BLAS) may use.

llama.cpp decodes with ``-t`` threads (by default every core but one). Numba and OpenBLAS start
one thread per core and wait for each other at every barrier, so when another process holds a
core an event collapses: SmolLM2 at ``-t 1`` with the other of 2 cores busy, TOVA's event took
238 ms and Expected Attention's 2.9 s, against 7 and 30 ms now (BENCHMARKS.md §9.2). So the
Numba kernels use the session's own thread count, set at every event (Numba's setting belongs to
the calling thread: a server runs sessions on several). numpy's BLAS runs on one thread: the
controller's products are small (a few MFLOP per layer), and OpenBLAS's pool, spinning after a
product, starved the Numba kernel that came next (TOVA+AMS's event on 2 threads: 11 -> 352 ms).
The kernels that need products call numpy's OpenBLAS from their own threads (:func:`kernel_sgemm`,
:func:`kernel_ssyrk`): the event's evidence, and Expected Attention's layers. Where numpy's BLAS is
not OpenBLAS, a scorer whose layers cost milliseconds each spreads them over as many Python
threads as the session decodes with (:func:`map_layers`): numpy's products and Numba's ``nogil``
kernels release the GIL, and each thread's BLAS call runs in that thread, so nothing spins.
It pays only for events of tens of milliseconds: after a decode, ggml's OpenMP worker keeps
spinning on the other core for a while (libgomp's GOMP_SPINCOUNT), and a short event's second
thread shares that core with it (BENCHMARKS.md §9.3). Where Numba threads with OpenMP (its omp
layer, as on Linux here), its parallel kernels run on that same team and do not compete with it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

import numba
import numpy as np

# cblas.h's CBLAS_ORDER, CBLAS_TRANSPOSE and CBLAS_UPLO values, for the kernels that call BLAS
CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, CBLAS_UPPER = 101, 111, 112, 121

# OpenBLAS's thread count under the names numpy's wheels export it (scipy-openblas, 64-bit ints or not)
_BLAS_PREFIXES = ("scipy_openblas_", "openblas_")
_BLAS_SUFFIXES = ("64_", "_64_", "")

_lock = threading.Lock()
_state: dict = {"started": False, "blas": None, "blas_found": False, "blas_pinned": False, "pool": None}

T = TypeVar("T")
R = TypeVar("R")


def _find_blas() -> Optional[tuple[Callable[[int], None], Callable[[], int]]]:
    """numpy's bundled OpenBLAS's (set, get) thread count, or None (another BLAS: left as it is)."""
    for lib in _blas_libraries():
        for prefix in _BLAS_PREFIXES:
            for suffix in _BLAS_SUFFIXES:
                set_n = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                get_n = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                if set_n is not None and get_n is not None:
                    set_n.argtypes, set_n.restype = [ctypes.c_int], None
                    get_n.argtypes, get_n.restype = [], ctypes.c_int
                    return set_n, get_n
    return None


def _blas_libraries() -> Iterable[ctypes.CDLL]:
    """numpy's bundled OpenBLAS (already loaded by numpy: the same handle), where it has one."""
    root = os.path.dirname(np.__file__)
    for d in (os.path.join(os.path.dirname(root), "numpy.libs"), os.path.join(root, ".dylibs")):
        for path in sorted(glob.glob(os.path.join(d, "*openblas*"))):
            try:
                yield ctypes.CDLL(path)
            except OSError:
                continue


def _find_cblas(name: str, args: Callable[[type], list]) -> Optional[Callable[..., None]]:
    """numpy's OpenBLAS ``cblas_<name>`` as a ctypes function that Numba kernels can call, or None
    (another BLAS, or the variable ``AMSLOCAL_KERNEL_BLAS=0``). ``args(int_type)``: its argument
    types, its integers 64-bit wherever the symbol's name says so (numpy 2's ILP64 build) and C
    ints elsewhere."""
    if os.environ.get("AMSLOCAL_KERNEL_BLAS", "1") == "0":
        return None
    for lib in _blas_libraries():
        for prefix in ("scipy_", ""):
            for suffix in _BLAS_SUFFIXES:
                fn = getattr(lib, f"{prefix}cblas_{name}{suffix}", None)
                if fn is not None:
                    fn.argtypes = args(ctypes.c_int64 if "64" in suffix else ctypes.c_int)
                    fn.restype = None
                    return fn
    return None


def _sgemm_args(i: type) -> list:
    """cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)"""
    e, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    return [e, e, e, i, i, i, f, p, i, p, i, f, p, i]


def _ssyrk_args(i: type) -> list:
    """cblas_ssyrk(order, uplo, trans, n, k, alpha, a, lda, beta, c, ldc)"""
    e, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    return [e, e, e, i, i, f, p, i, f, p, i]


def _kernel_blas(name: str, args: Callable[[type], list]) -> Optional[Callable[..., None]]:
    if not _state["blas_pinned"] or _blas() is None:  # BLAS not (or not known to be) on one thread
        return None
    with _lock:
        if name not in _state:
            _state[name] = _find_cblas(name, args)
        return _state[name]


def kernel_sgemm() -> Optional[Callable[..., None]]:
    """numpy's BLAS single-precision product for Numba kernels to call from each of their threads
    (:func:`_find_cblas`), or None until :func:`use` has put BLAS on one thread. Then a call from
    a kernel thread stays on that thread: an event's products run on the decode's own OpenMP
    team, where numpy's matmul would use one core (its own pool would spin after each product)."""
    return _kernel_blas("sgemm", _sgemm_args)


def kernel_ssyrk() -> Optional[Callable[..., None]]:
    """numpy's BLAS ``C = alpha A^T A + beta C`` (one triangle of C) for Numba kernels, as
    :func:`kernel_sgemm`: half the arithmetic of the product."""
    return _kernel_blas("ssyrk", _ssyrk_args)


def _blas():
    with _lock:
        if not _state["blas_found"]:
            _state["blas"], _state["blas_found"] = _find_blas(), True
        return _state["blas"]


def start_workers() -> None:
    """Start Numba's worker threads with SIGINT and SIGTERM blocked (once per process).

    Each worker inherits the starting thread's signal mask, and a signal must reach the main
    thread: a Ctrl-C that lands on a worker never wakes the main thread's blocking read (the
    chat prompt would ignore it)."""
    with _lock:
        if _state["started"]:
            return
        _state["started"] = True
        if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to block
            numba.get_num_threads()
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
        try:
            numba.get_num_threads()  # launches the threading layer's workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _launches_are_threadsafe() -> bool:
    """False where Numba's parallel kernels run on its ``workqueue`` layer (where it finds neither
    OpenMP nor TBB: pip's numba on macOS, for one). That layer aborts the whole process when two
    threads launch parallel kernels at once, as two sessions of a server do at their events."""
    safe = _state.get("launch_threadsafe")
    if safe is None:
        start_workers()  # picks the layer
        safe = _state["launch_threadsafe"] = numba.threading_layer() != "workqueue"
    return safe


_launch_lock = threading.Lock()


def parallel_kernel(kernel: Callable[..., R]) -> Callable[..., R]:
    """``kernel`` (a Numba ``parallel=True`` function, called from Python only) made safe to call
    from any thread: launches take turns on the ``workqueue`` layer, and run as they are on a
    threadsafe one. Its workers start first, with signals blocked (:func:`start_workers`)."""

    @functools.wraps(kernel)
    def launch(*args):
        if _launches_are_threadsafe():
            return kernel(*args)
        with _launch_lock:
            return kernel(*args)

    return launch


def use(n_threads: int) -> int:
    """Let the calling thread's Numba kernels use ``n_threads`` (at most one per core) and the
    process's BLAS one; returns the Numba count in force."""
    start_workers()
    n = max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if not _state["blas_pinned"]:
        blas = _blas()
        if blas is not None:
            blas[0](1)
        _state["blas_pinned"] = True
    return n


def blas_threads() -> Optional[int]:
    """The thread count numpy's BLAS uses, where it can be read here (else None)."""
    blas = _blas()
    return None if blas is None else int(blas[1]())


def _init_pool_thread() -> None:
    """SIGINT and SIGTERM go to the main thread (see start_workers), and a Numba kernel run here
    stays on this thread: the threads already split the work between them."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    numba.set_num_threads(1)


def _pool() -> ThreadPoolExecutor:
    """One pool per process, one thread per core but the caller's (sessions share it)."""
    with _lock:
        if _state["pool"] is None:
            n = max(1, numba.config.NUMBA_NUM_THREADS - 1)
            _state["pool"] = ThreadPoolExecutor(n, thread_name_prefix="amslocal-layers", initializer=_init_pool_thread)
        return _state["pool"]


def map_layers(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on as many threads as the calling thread's Numba count (what
    :func:`use` set: the session's): the caller takes every n-th item from the first, a pool
    thread each other share. ``fn`` must be safe to run concurrently (no cache reads: llama.cpp's
    context is not) and its Numba kernels serial (the caller's would take n threads again). The
    results come in the items' order; an exception in any share is raised here, after every share
    has finished."""
    items = list(items)
    n = min(numba.get_num_threads(), len(items))
    if n <= 1:
        return [fn(x) for x in items]
    run = lambda share: [fn(x) for x in share]  # noqa: E731
    pool = _pool()
    futures = [pool.submit(run, items[i::n]) for i in range(1, n)]
    out: list = [None] * len(items)
    try:
        out[0::n] = run(items[0::n])
    finally:
        for i, f in enumerate(futures, 1):
            out[i::n] = f.result()  # waits for every share, and raises the first one's exception
    return out
