"""Closing while another thread generates cancels and waits: never a freed context under a decode.

Each case runs in a child process, so a crash (the old segfault, exit 139) fails the test instead
of killing the test run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys, threading, time
    from amslocal.api import Engine
    from amslocal.errors import ChatError

    what = sys.argv[2]
    engine = Engine(sys.argv[1], n_threads=1)
    s = engine.session(budget=64, interval=16, max_tokens=4000, temperature=0.0)
    out = {}
    started = threading.Event()

    def work():
        try:
            pieces = s.chat("Tell me a very long story.", ignore_eos=True)
            for i, piece in enumerate(pieces):
                started.set()
            out["ended"] = True
        except Exception as exc:
            out["error"] = repr(exc)

    t = threading.Thread(target=work)
    t.start()
    started.wait(60)
    time.sleep(0.2)  # inside the decode loop
    t0 = time.perf_counter()
    (engine.close if what == "engine" else s.close)()
    waited = time.perf_counter() - t0
    t.join(30)
    assert not t.is_alive(), "the generating thread did not stop"
    try:
        s.chat("again?", stream=False)
        raise SystemExit("a closed session answered")
    except ChatError as exc:
        assert "closed" in str(exc)
    s.close()  # a second close does nothing
    print(f"OK waited={waited:.3f} {out}")
""")


@pytest.mark.parametrize("what", ["session", "engine"])
def test_close_during_generation_cancels_and_waits(tiny_gguf, what):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tiny_gguf), what], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "OK waited=" in r.stdout


def test_close_ends_a_stream_nobody_iterates(tiny_model):
    """A reply iterator left suspended holds the session; close() ends it and frees the context."""
    from amslocal.api import Engine

    engine = Engine(tiny_model.path, n_threads=1)
    s = engine.session(budget=64, interval=16, max_tokens=200, temperature=0.0)
    it = s.chat("Hello there", ignore_eos=True)
    next(it)  # started: it holds the session now
    s.close(timeout=5)
    with pytest.raises(StopIteration):
        next(it)
    engine.close()
