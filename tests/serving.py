"""A live ``amslocal serve`` in a subprocess, for the server tests and the load benchmark."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
AMSLOCAL = [sys.executable, "-m", "amslocal"]


class Server:
    """``amslocal serve MODEL --port 0 ARGS``; waits until /health answers."""

    def __init__(self, model: os.PathLike, *args: str, timeout: float = 120.0, env: Optional[dict] = None):
        self.args = [*AMSLOCAL, "serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.base = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = next((re.search(r"on (http://\S+) ", line) for line in self.lines if " on http://" in line), None)
            if m:
                self.base = m.group(1)
                try:
                    if self.get("/health")[0] == 200:
                        return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start: {' | '.join(self.lines)}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def request(
        self, method: str, path: str, body: Any = None, headers: Optional[dict] = None, timeout: float = 300.0
    ) -> tuple[int, dict, Any]:
        """(status, lower-cased headers, parsed JSON or text); never raises for an HTTP status."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, raw = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
        try:
            return status, hdrs, json.loads(raw)
        except ValueError:
            return status, hdrs, raw.decode("utf-8", "replace")

    def get(self, path: str, **kw: Any) -> tuple[int, dict, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, dict, Any]:
        return self.request("POST", path, body, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop the server with ``sig``; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
