"""The server's conversations: at most K live chat sessions, the rest saved to disk.

A client of an OpenAI-style API resends the whole conversation every turn. The pool finds the live
(or saved) session that has already absorbed the longest prefix of those messages and continues it,
so only the new messages are read; a request that matches nothing gets a new session. When a
(K+1)-th session is needed, the least recently used idle one is written to the session directory in
the ``chat`` save format and closed; a later request for its conversation loads it back. Memory is
therefore K bounded caches, however many conversations there are.

Session ids are the file names: they are checked against :data:`SESSION_ID` before any path is
made from them. The pool is used from the server's one worker thread; a lock guards the table so
that the HTTP side can list it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import savefile
from ..chat import ChatSession
from ..errors import AmsError, ChatError, SaveFileError, SessionBusyError

__all__ = ["SESSION_ID", "Conversation", "SessionPool", "Settings", "check_session_id"]

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUFFIX = ".amss"


def check_session_id(value: str) -> str:
    """``value`` if it is a valid session id (letters, digits, ``_``, ``-``; at most 64), else ChatError."""
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise ChatError("session_id must be 1-64 letters, digits, '_' or '-'")
    return value


@dataclass(frozen=True)
class Settings:
    """What a request may choose about its session's cache (None: the server's default)."""

    budget: Optional[int] = None
    scorer: Optional[str] = None
    ams: Optional[bool] = None


@dataclass
class Conversation:
    """One conversation: live (``chat`` set) or saved (``path`` set), with what it has absorbed."""

    id: str
    kind: str  # "chat" (messages) or "raw" (completions: text)
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    ams: bool = True
    chat: Optional[ChatSession] = None
    path: Optional[Path] = None
    last_used: int = 0  # the pool's clock: larger is more recent
    busy: bool = False
    restored: bool = False  # the last acquire loaded it from disk

    def absorbed(self) -> int:
        return len(self.messages) if self.kind == "chat" else len(self.text)


def _same(a: dict, b: dict) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


class SessionPool:
    """Live and saved conversations of one model.

    ``new_session(settings)`` makes a fresh :class:`ChatSession` with the server's defaults and
    the request's ``settings``; ``max_live`` is K; at most ``max_saved`` conversations stay on
    disk (the least recently used beyond it are forgotten: their next request starts a new
    session); ``session_dir`` None uses a private temporary directory that :meth:`close` removes
    (then nothing outlives the server).
    """

    def __init__(
        self,
        new_session: Callable[[Settings], ChatSession],
        *,
        max_live: int = 4,
        max_saved: int = 64,
        session_dir: Optional[os.PathLike] = None,
        model_identity: Optional[dict] = None,
        default_ams: bool = True,
    ):
        if max_live < 1:
            raise ValueError("max_live must be at least 1")
        self._new_session = new_session
        self.max_live = max_live
        self.max_saved = max_saved  # files kept; beyond it the least recently used conversation is forgotten
        self.forgotten = 0
        self.default_ams = default_ams
        self.persistent = session_dir is not None
        if session_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="amslocal-sessions-"))
        else:
            self.dir = Path(session_dir).expanduser()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AmsError(f"cannot create the session directory {self.dir}: {exc.strerror or exc}") from None
        self._identity = model_identity
        self._lock = threading.Lock()
        self._table: dict[str, Conversation] = {}
        self.live_peak = 0
        self.saves = 0
        self.restores = 0
        self.skipped_files: list[str] = []
        self._clock = 0
        if self.persistent:
            self._index_saved()
            self._limit_saved()

    # --- the table ------------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _index_saved(self) -> None:
        """Conversations saved by an earlier server in ``session_dir`` become matchable again."""
        for path in sorted(self.dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            sid = path.name[: -len(SUFFIX)]
            if not SESSION_ID.fullmatch(sid):
                continue
            try:
                doc, _, _ = savefile.unpack(savefile.read(path), str(path), self._identity)
                chat = doc["chat"]
                messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in chat["messages"]]
                kind = "raw" if chat.get("mode") == "raw" else "chat"
                ams = bool(doc["session"]["config"].get("ams", True))
                text = str(chat.get("fed_text", "")) if kind == "raw" else ""
            except (SaveFileError, KeyError, TypeError, ValueError, AttributeError):
                self.skipped_files.append(path.name)
                continue
            self._table[sid] = Conversation(sid, kind, messages, text, ams=ams, path=path, last_used=self._tick())

    @property
    def live(self) -> int:
        return sum(1 for c in self._table.values() if c.chat is not None)

    def describe(self) -> list[dict]:
        """The table, most recently used first (for the server's session list)."""
        with self._lock:
            rows = sorted(self._table.values(), key=lambda c: -c.last_used)
            out = []
            for c in rows:
                row: dict[str, Any] = {
                    "id": c.id,
                    "kind": c.kind,
                    "live": c.chat is not None,
                    "busy": c.busy,
                    "messages": len(c.messages),
                }
                if c.chat is not None:
                    st = c.chat.stats
                    row.update(
                        cells_used=c.chat.cells_used,
                        kv_budget=c.chat.config.budget,
                        compressions=st.compressions,
                        evicted_tokens=st.evicted_tokens,
                    )
                out.append(row)
            return out

    def _match(self, kind: str, messages: list[dict], text: str, ams: bool) -> Optional[Conversation]:
        best, best_len = None, -1
        for c in self._table.values():
            if c.kind != kind or c.busy or c.ams != ams:
                continue
            if kind == "chat":
                n = len(c.messages)
                if n == 0 or n > len(messages) or not all(_same(a, b) for a, b in zip(c.messages, messages)):
                    continue
            else:
                n = len(c.text)
                if n == 0 or not text.startswith(c.text):
                    continue
            if n > best_len or (n == best_len and best is not None and c.last_used > best.last_used):
                best, best_len = c, n
        return best

    # --- acquire and release --------------------------------------------------------------------

    def acquire(
        self,
        kind: str,
        *,
        messages: Optional[list[dict]] = None,
        text: str = "",
        session_id: Optional[str] = None,
        settings: Settings = Settings(),
    ) -> Conversation:
        """The conversation to continue for this request, live and marked busy.

        ``session_id`` names one (created when unknown); otherwise the longest absorbed prefix
        wins. Its budget and scorer follow ``settings``; a different ``ams`` is another session.
        """
        messages = messages or []
        ams = self.default_ams if settings.ams is None else settings.ams
        with self._lock:
            if session_id is not None:
                check_session_id(session_id)
                conv = self._table.get(session_id)
                if conv is not None and (conv.kind != kind or conv.ams != ams):
                    self._drop(conv)  # the id is reused for another kind of session: start over
                    conv = None
                if conv is not None and conv.busy:
                    raise SessionBusyError(f"session {session_id} is busy with another request")
            else:
                conv = self._match(kind, messages, text, ams)
            if conv is None:
                sid = session_id or uuid.uuid4().hex[:16]
                conv = Conversation(sid, kind, ams=ams)
                self._table[sid] = conv
            conv.busy = True
            conv.last_used = self._tick()
        try:
            self._make_live(conv, settings)
        except BaseException:
            with self._lock:
                conv.busy = False
                if conv.chat is None and conv.path is None:
                    self._table.pop(conv.id, None)
            raise
        return conv

    def _make_live(self, conv: Conversation, settings: Settings) -> None:
        conv.restored = False
        if conv.chat is None:
            self._make_room()
            chat = self._new_session(settings)
            if conv.path is not None:
                try:
                    chat.load(conv.path)
                except SaveFileError:
                    chat.close()
                    raise
                conv.restored = True
                self.restores += 1
            conv.chat = chat
            with self._lock:
                self.live_peak = max(self.live_peak, self.live)
        chat = conv.chat
        if chat.config.budget is not None:
            if settings.budget is not None and settings.budget != chat.config.budget:
                chat.set_budget(settings.budget)
            if settings.scorer is not None and settings.scorer != chat.config.scorer:
                chat.set_scorer(settings.scorer)

    def _make_room(self) -> None:
        """Save and close least recently used idle sessions until one more fits under K."""
        while True:
            with self._lock:
                live = [c for c in self._table.values() if c.chat is not None]
                if len(live) < self.max_live:
                    return
                idle = [c for c in live if not c.busy]
                if not idle:
                    raise SessionBusyError(f"all {self.max_live} live sessions are busy")
                victim = min(idle, key=lambda c: c.last_used)
                victim.busy = True
            try:
                self._save(victim)
            finally:
                with self._lock:
                    victim.busy = False
            self._limit_saved()

    def _save(self, conv: Conversation) -> None:
        chat = conv.chat
        assert chat is not None
        path = self.dir / f"{check_session_id(conv.id)}{SUFFIX}"
        try:
            if chat.mode is not None:  # nothing absorbed yet: nothing worth a file
                chat.save(path)
                conv.path = path
                self.saves += 1
        finally:
            chat.close()
            conv.chat = None
        if conv.path is None:
            with self._lock:
                self._table.pop(conv.id, None)

    def _limit_saved(self) -> None:
        """Forget the least recently used saved conversations beyond ``max_saved`` (their files too):
        a cache on disk is as large as in memory, so the directory must not grow without end."""
        with self._lock:
            saved = sorted(
                (c for c in self._table.values() if c.chat is None and c.path is not None and not c.busy),
                key=lambda c: c.last_used,
            )
            extra = saved[: max(0, len(saved) - self.max_saved)]
            for c in extra:
                self._table.pop(c.id, None)
        for c in extra:
            c.path.unlink(missing_ok=True)
            self.forgotten += 1

    def release(self, conv: Conversation) -> None:
        """The request is done with ``conv``: record what it has absorbed now."""
        with self._lock:
            chat = conv.chat
            if chat is not None:
                conv.messages = chat.messages if chat.mode == "chat" else []
                conv.text = chat.fed_text if chat.mode == "raw" else ""
            conv.busy = False
            conv.last_used = self._tick()

    def _drop(self, conv: Conversation) -> None:
        if conv.chat is not None:
            conv.chat.close()
            conv.chat = None
        if conv.path is not None:
            conv.path.unlink(missing_ok=True)
        self._table.pop(conv.id, None)

    # --- shutdown -------------------------------------------------------------------------------

    def close(self) -> dict:
        """Save every live session (persistent directory only) and close them all; a temporary
        directory is removed. Returns ``{"saved": n, "dir": path}``."""
        saved = 0
        with self._lock:
            convs = list(self._table.values())
        for conv in convs:
            if conv.chat is None:
                continue
            if self.persistent and conv.chat.mode is not None:
                try:
                    conv.chat.save(self.dir / f"{check_session_id(conv.id)}{SUFFIX}")
                    saved += 1
                except AmsError:
                    pass
            conv.chat.close()
            conv.chat = None
        if not self.persistent:
            shutil.rmtree(self.dir, ignore_errors=True)
        return {"saved": saved, "dir": str(self.dir)}
