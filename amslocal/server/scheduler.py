"""One worker thread runs the requests, first come first served, from a bounded queue.

llama.cpp already uses every core for one decode, so requests run one at a time, in arrival order
(fair: no client can overtake another). A full queue refuses at once (:class:`QueueFull`, the server
answers 503 with ``Retry-After``) instead of letting waiting times grow without bound.

A job reports to its request handler through an asyncio queue on the event loop's thread. A job
can be cancelled from the handler at any time: before it starts it is skipped, while it runs its
``on_cancel`` callback (the chat session's thread-safe ``cancel``) stops it at the next token.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Callable, Optional

__all__ = ["Job", "QueueFull", "Scheduler"]


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


class Job:
    """A request's work: ``run(job)`` runs on the worker thread and reports with :meth:`emit`."""

    def __init__(self, run: Callable[["Job"], None], loop: asyncio.AbstractEventLoop):
        self.run = run
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._on_cancel: Optional[Callable[[], None]] = None
        self.enqueued = time.perf_counter()
        self.started: Optional[float] = None

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand ``(kind, value)`` to the request handler (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def on_cancel(self, fn: Optional[Callable[[], None]]) -> None:
        """Call ``fn`` when the job is cancelled (at once if it already is)."""
        with self._lock:
            self._on_cancel = fn
            fire = fn is not None and self.cancelled.is_set()
        if fire:
            fn()

    def cancel(self) -> None:
        """Stop the job: skipped if it has not started, stopped at the next token if it has."""
        with self._lock:
            self.cancelled.set()
            fn = self._on_cancel
        if fn is not None:
            fn()


class Scheduler:
    """A bounded FIFO of jobs and the one thread that runs them."""

    def __init__(self, max_queue: int = 16):
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.current: Optional[Job] = None
        self._mean_s = 2.0  # running mean of a job's duration, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="amslocal-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull(1)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(max(1, round(self._mean_s * (len(self._queue) + 1))))
            self._queue.append(job)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                job = self._queue.popleft()
                self.current = job
            try:
                if job.cancelled.is_set():
                    job.emit("cancelled")
                    continue
                job.started = time.perf_counter()
                try:
                    job.run(job)
                except BaseException as exc:  # reported to the handler, never kills the worker
                    job.emit("error", exc)
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - job.started)
            finally:
                with self._cond:
                    self.current = None

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything (waiting jobs are skipped, the running one stops at its next token)
        and wait for the worker to finish."""
        with self._cond:
            self._stopping = True
            jobs = list(self._queue) + ([self.current] if self.current is not None else [])
            self._cond.notify_all()
        for job in jobs:
            job.cancel()
        self._thread.join(timeout)
