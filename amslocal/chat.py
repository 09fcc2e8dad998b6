"""Chat on top of a budgeted :class:`~amslocal.session.Session`: templates, turns, save and load.

**Templates** (:mod:`amslocal.templates`): the GGUF's own chat template in a jinja2 sandbox, or
ChatML, or the caller's.

**Turns.** Every turn renders the whole conversation and feeds only what is new: the text after
what the cache already holds (``fed_text``: the rendering up to the last generation prompt, plus
the reply exactly as sampled). Templates are normally prefix-stable, so this suffix is the end of
the previous turn and the new message. A template that rewrites earlier turns (some drop earlier
reasoning, some print the date) breaks the prefix; the cache cannot be patched in place, because
it is compressed and no longer holds every token, so the session then starts a fresh cache and
feeds the whole conversation again under the budget (bounded prefill; ``refeeds`` counts it).

**Protection.** The template's scaffolding (role headers, control tokens such as ``<|im_start|>``)
is found by rendering the conversation once more with marker strings in place of the message
contents; the tokens outside the contents are protected from eviction, and everything before the
first non-system message (the system prompt and its template) always stays. Scaffolding of older
turns is released oldest first once protection would pass half of what the budget leaves after
the sink and recent tokens, so protection can never crowd out the conversation itself. If the
marker rendering does not reproduce the template's output, only control tokens are protected.

**Cancelling.** :meth:`ChatSession.cancel` (thread-safe) stops a reply between two tokens; what was
generated stays in the conversation and in the cache. During prefill it stops between chunks: the
message is cut to what was read, and the turn gets an empty reply.

**Save files** (:mod:`amslocal.savefile` defines the format): messages, configuration,
statistics and the model's identity, the controller's arrays and llama.cpp's sequence state. The
cells land elsewhere in a new context, so saving also moves the saving session onto the restored
state: both continue from bit-identical caches and produce identical next-token logits.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import __version__, savefile
from .backend import ContextParams, Model, SamplerParams
from .engine import TextStream
from .errors import (
    AmsError,
    ChatError,
    ContextFullError,
    SaveFileError,
    SessionBusyError,
    TemplateError,
    UnknownScorerError,
)
from .session import BudgetError, CompressionConfig, Session, SessionStats
from .templates import CHATML_TEMPLATE, ChatTemplate, StopFilter

__all__ = [
    "CHATML_TEMPLATE",
    "ChatError",
    "ChatSession",
    "ChatTemplate",
    "SaveFileError",
    "SessionBusyError",
    "TemplateError",
    "TurnStats",
]

RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED

ProgressFn = Callable[[int, int], None]
Messages = Union[str, Sequence[Mapping[str, Any]]]


# --- the chat session ----------------------------------------------------------------------------


class _CancelFlag:
    """Raised from any thread or from a signal handler, read between tokens. Deliberately without a
    lock: a handler that interrupts its own thread inside ``threading.Event.clear`` would wait
    forever for the lock that thread holds."""

    __slots__ = ("raised",)

    def __init__(self) -> None:
        self.raised = False

    def set(self) -> None:
        self.raised = True

    def clear(self) -> None:
        self.raised = False

    def is_set(self) -> bool:
        return self.raised


@dataclass
class TurnStats:
    """One reply: what was read, what was generated, and why it stopped.

    ``stop``: eog | max_tokens | cancelled | cancelled_reading (during prefill; the message was cut
    to what was read and the reply is empty) | stop_string | context_full | none (no reply yet).
    """

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    reply_tokens: int = 0
    decode_s: float = 0.0
    stop: str = "none"
    refed: bool = False

    @property
    def decode_tok_per_s(self) -> float:
        return self.reply_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _Plan:
    conv: list[dict]
    text: str
    start: int  # characters of ``text`` the cache already holds
    tokens: list[int]
    flags: list[int]  # per token: 0 content, 1 template (protected), 2 system (always kept)
    ends: Optional[list[int]]  # byte end of each token in the suffix, when known
    ranges: Optional[list[tuple[int, int]]]
    version: int


class ChatSession:
    """A multi-turn chat whose KV cache stays inside a token budget.

    Thread-safety: a session serves one call at a time (a second concurrent call raises
    :class:`SessionBusyError`); :meth:`cancel` may be called from any thread at any time. Library
    code never prints; progress goes to the ``on_progress`` callbacks.
    """

    def __init__(
        self,
        model: Model,
        config: CompressionConfig = CompressionConfig(),
        ctx_params: ContextParams = ContextParams(),
        sampler_params: SamplerParams = SamplerParams(),
        *,
        system: Optional[str] = None,
        template: Union[ChatTemplate, str, None] = None,
        max_tokens: int = 512,
        keep: int = 0,
        observe_attention: bool = False,
    ):
        if keep < -1:
            raise ValueError(f"keep must be -1 (the whole first message), 0 or a number of tokens (got {keep})")
        self.model = model
        # as llama.cpp's --keep: the conversation's start, through the first ``keep`` tokens of its
        # first message (-1: all of it), is never evicted, like the system prompt
        self.keep = keep
        self.observe_attention = observe_attention  # diagnostics (benchmarks), see Session
        self.ctx_params = ctx_params
        self.sampler_params = sampler_params
        self.template = template if isinstance(template, ChatTemplate) else ChatTemplate.for_model(model, template)
        self.system = system
        self.max_tokens = max_tokens
        self.logits_hook: Optional[Callable[[np.ndarray], None]] = None  # called with the next-token logits
        # called for every generated token with the logits it was sampled from (log-probabilities)
        self.token_hook: Optional[Callable[[int, np.ndarray], None]] = None
        self.last_turn = TurnStats()
        self.refeeds = 0
        self._cancel = _CancelFlag()
        self._busy = threading.Lock()
        self._closed = False
        self._stream: Optional[weakref.ref] = None  # the reply iterator last handed out (close() ends it)
        self._version = 0
        config.validate(model.n_ctx_train)
        self.session = self._new_session(replace(config))
        self._reset_conversation()
        # fail now, not at the first message, on a template that cannot render a plain exchange or
        # a system prompt that does not fit the budget; a default system prompt of the template's
        # own is checked at the first chat message (raw generate() never renders the template)
        try:
            self._prepare(self.messages + [{"role": "user", "content": "Hello."}])
        except BudgetError:
            if self.system:
                raise

    # --- construction ---------------------------------------------------------------------------

    def _new_session(self, config: CompressionConfig) -> Session:
        from .scorers import SCORERS

        if config.scorer not in SCORERS:
            raise UnknownScorerError(f"unknown scorer {config.scorer}; choices: {', '.join(sorted(SCORERS))}")
        if config.budget is not None and config.scorer == "triattention" and config.calibration is None:
            from .calibration import load_for_model

            config = replace(config, calibration=load_for_model(self.model.path))
        return Session(
            self.model, config, self.ctx_params, self.sampler_params, observe_attention=self.observe_attention
        )

    def _reset_conversation(self) -> None:
        self._messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._fed_text = ""
        self._mode: Optional[str] = None  # chat | raw
        self._n_system = 0
        self._system_ids: list[int] = []
        self._n_replies = 0
        self._have_logits = False

    # --- public state ---------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        """The conversation (a copy), the system message first when there is one."""
        return [dict(m) for m in self._messages]

    @property
    def stats(self) -> SessionStats:
        return self.session.stats

    @property
    def config(self) -> CompressionConfig:
        return self.session.config

    @property
    def n_ctx(self) -> int:
        """Cells of the llama.cpp context (a budget's ``budget + interval``, rounded up by llama.cpp)."""
        return self.session.n_ctx

    @property
    def cells_used(self) -> int:
        return self.session.n_occupied

    def system_tokens_in_cache(self) -> tuple[int, int]:
        """(kept, total): how many of the system prompt's tokens (with its template) the cache holds,
        checked by token id against the first live positions."""
        _, toks = self.session.kept_tokens()
        kept = 0
        for a, b in zip(toks, self._system_ids):
            if a != b:
                break
            kept += 1
        return kept, len(self._system_ids)

    def cancel(self) -> None:
        """Stop the reply (or prefill) in progress at the next token or chunk. Thread-safe, and
        safe to call from a signal handler."""
        self._cancel.set()

    def close(self, timeout: float = 60.0) -> None:
        """Stop what the session is doing, then free the llama.cpp context; the session cannot be
        used afterwards. Thread-safe: a reply in progress in another thread is cancelled and
        waited for (it ends at its next token), a stream nobody iterates is closed. Raises
        :class:`SessionBusyError` if the session is still busy after ``timeout`` seconds (then
        nothing is freed). A second close does nothing."""
        if self._closed:
            return
        self._cancel.set()
        stream = self._stream() if self._stream is not None else None
        if stream is not None:
            try:
                stream.close()  # suspended between two pieces: its finally releases the session
            except ValueError:
                pass  # running in another thread right now: it stops at the next token
        if not self._busy.acquire(timeout=timeout):
            raise SessionBusyError(f"the session is still busy after {timeout:g} s; not closed")
        try:
            if not self._closed:
                self._closed = True
                self.session.close()
        finally:
            self._busy.release()

    # --- locking --------------------------------------------------------------------------------

    def _acquire(self) -> None:
        if self._closed:
            raise ChatError("the session is closed")
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError("the session is busy with another call (use one thread per session at a time)")

    # --- chat -----------------------------------------------------------------------------------

    def chat(
        self,
        messages: Messages,
        *,
        stream: bool = True,
        max_tokens: Optional[int] = None,
        on_progress: Optional[ProgressFn] = None,
        ignore_eos: bool = False,
        stop: Sequence[str] = (),
    ) -> Union[Iterator[str], str]:
        """Reply to a message (text) or to a whole conversation (a list of ``{"role", "content"}``).

        A list is the conversation so far (the session's system message is put first when the
        list has none); whatever the cache already holds of it is not read again. Returns an
        iterator of text pieces (``stream=True``) or the whole reply. The reply is added to
        :attr:`messages` when it ends, is cancelled, or the iterator is closed. ``on_progress(done,
        total)`` is called after each prefill chunk; ``ignore_eos`` (tests, benchmarks) lets a
        reply run past end-of-generation tokens; ``stop``: strings that end the reply (besides the
        template's own), not shown.
        """
        conv = self._conversation(messages)
        self._acquire()
        try:
            plan = self._prepare(conv)
        finally:
            self._busy.release()
        self._cancel.clear()
        it = self._chat_iter(
            plan, max_tokens if max_tokens is not None else self.max_tokens, on_progress, ignore_eos, tuple(stop)
        )
        self._stream = weakref.ref(it)
        return it if stream else "".join(it)

    def _conversation(self, messages: Messages) -> list[dict]:
        if self._mode == "raw":
            raise ChatError("this session holds raw text from generate(); clear() it before chat()")
        if isinstance(messages, str):
            return self.messages + [{"role": "user", "content": messages}]
        conv = []
        for i, m in enumerate(messages):
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ChatError(f"message {i} must be a mapping with string 'role' and 'content'")
            conv.append(dict(m))
        if not conv:
            raise ChatError("the conversation is empty")
        if self.system and conv[0]["role"] != "system":
            conv.insert(0, {"role": "system", "content": self.system})
        return conv

    def _prepare(self, conv: list[dict]) -> _Plan:
        """Render, find what is new, tokenise it and mark what to protect; changes nothing."""
        text = self.template.render(conv, add_generation_prompt=True)
        start = len(self._fed_text) if self._fed_text and text.startswith(self._fed_text) else 0
        suffix = text[start:]
        ranges = self.template.content_ranges(conv, text)
        tokens = self.model.tokenize(suffix, add_special=False, parse_special=True) if suffix else []
        lead = 0
        if start == 0 and self.model.add_bos and self.model.bos >= 0 and (not tokens or tokens[0] != self.model.bos):
            tokens, lead = [self.model.bos] + tokens, 1
        ends = self._token_ends(tokens[lead:], suffix)
        if ends is not None:
            ends = [0] * lead + ends

        # byte ranges, in the suffix, of the system region and of the contents
        def b(i: int) -> int:
            return len(suffix[: max(0, min(i - start, len(suffix)))].encode("utf-8"))

        sys_end = 0
        if start == 0:
            if ranges is not None:
                firsts = [r[0] for r, m in zip(ranges, conv) if m["role"] != "system"]
                sys_end = firsts[0] if firsts else len(text)
            elif conv[0]["role"] == "system" and conv[0]["content"]:
                at = text.find(conv[0]["content"])
                sys_end = at + len(conv[0]["content"]) if at >= 0 else 0
        sys_b = b(sys_end) if start == 0 else 0
        content_b = [(b(cs), b(ce)) for cs, ce in (ranges or []) if ce > start and ce > cs]
        flags: list[int] = []
        if ends is not None:
            b0 = 0
            for k, (tok, b1) in enumerate(zip(tokens, ends)):
                if k < lead or b0 < sys_b:
                    flags.append(2)
                elif ranges is None:
                    flags.append(1 if self.model.is_control(tok) else 0)
                else:
                    inside = b1 > b0 and any(cs <= b0 and b1 <= ce for cs, ce in content_b)
                    flags.append(0 if inside else 1)
                b0 = b1
        else:
            n_sys = lead + (
                len(self.model.tokenize(suffix[:sys_end], add_special=False, parse_special=True)) if sys_end else 0
            )
            flags = [2 if k < n_sys else (1 if self.model.is_control(t) else 0) for k, t in enumerate(tokens)]

        if self.keep and start == 0:
            flags = self._keep_first_message(flags)
        self._check_fits(tokens, flags, refeed=start == 0)
        return _Plan(conv, text, start, tokens, flags, ends, ranges, self._version)

    def _keep_first_message(self, flags: list[int]) -> list[int]:
        """Protect the rendering's start through the first ``keep`` tokens of the first message's
        content (its first run of content tokens; -1: the whole run) as the system prompt is
        protected: one protected prefix, so releasing template tokens never reaches it."""
        i = next((k for k, f in enumerate(flags) if f == 0), len(flags))
        end = i
        while end < len(flags) and flags[end] == 0 and (self.keep < 0 or end - i < self.keep):
            end += 1
        return [2] * end + flags[end:] if end > i else flags

    @staticmethod
    def _check_budget_for_system(cfg: CompressionConfig, n_system: int, what: Optional[str] = None) -> None:
        room = cfg.budget - cfg.n_sink - cfg.keep_last - 1
        if n_system > room and what is not None:
            raise BudgetError(
                f"{what} keeps {n_system} prompt tokens, but a budget of {cfg.budget} protects at most {room} "
                "(budget - n_sink - keep_last - 1); raise the budget or keep fewer tokens"
            )
        if n_system > room:
            raise BudgetError(
                f"the system prompt and its template take {n_system} tokens, but a budget of {cfg.budget} "
                f"protects at most {room} (budget - n_sink - keep_last - 1); raise the budget "
                "or shorten the system prompt"
            )

    def _check_fits(self, tokens: list[int], flags: list[int], refeed: bool) -> None:
        s = self.session
        cfg = s.config
        if cfg.budget is None:
            used = 0 if refeed else s.n_occupied
            free = s.n_ctx - used
            if len(tokens) + 1 > free:
                raise ContextFullError(
                    f"the message needs {len(tokens)} cells but the context has {free} free of "
                    f"{s.n_ctx}; clear the conversation (/clear), or use a budget"
                )
        elif refeed:
            what = f"--keep {self.keep} (with the system prompt)" if self.keep else None
            self._check_budget_for_system(cfg, sum(1 for f in flags if f == 2), what=what)

    def _token_ends(self, tokens: list[int], suffix: str) -> Optional[list[int]]:
        """Byte end of each token in ``suffix``, or None if the pieces do not spell the suffix."""
        pieces = [self.model.token_bytes(t, special=True) for t in tokens]
        joined = b"".join(pieces)
        target = suffix.encode("utf-8")
        skip = 0
        if joined != target:
            if joined[:1] == b" " and joined[1:] == target:  # SentencePiece's leading space
                skip = 1
            else:
                return None
        ends, acc = [], -skip
        for p in pieces:
            acc += len(p)
            ends.append(max(acc, 0))
        return ends

    def _chat_iter(
        self,
        plan: _Plan,
        max_tokens: int,
        on_progress: Optional[ProgressFn],
        ignore_eos: bool,
        stop: tuple[str, ...] = (),
    ) -> Iterator[str]:
        self._acquire()
        try:
            if plan.version != self._version:  # the session changed between chat() and the first next()
                plan = self._prepare(plan.conv)
            yield from self._run_turn(plan, max_tokens, on_progress, ignore_eos, stop)
        finally:
            self._busy.release()

    def _run_turn(
        self,
        plan: _Plan,
        max_tokens: int,
        on_progress: Optional[ProgressFn],
        ignore_eos: bool,
        stop: tuple[str, ...] = (),
    ) -> Iterator[str]:
        turn = TurnStats(refed=plan.start == 0 and bool(self._fed_text))
        self.last_turn = turn
        if turn.refed:
            self.refeeds += 1
        if plan.start == 0 and self.session.n_occupied:
            self._restart_cache()
        self._version += 1
        self._mode = "chat"
        self._messages = [dict(m) for m in plan.conv]
        if plan.start == 0:
            self._n_system = sum(1 for f in plan.flags if f == 2)
            self._system_ids = [t for t, f in zip(plan.tokens, plan.flags) if f == 2]
        st = self.session.stats
        p0 = st.prefill_s
        fed = self._feed(plan.tokens, plan.flags, on_progress)
        turn.prompt_tokens, turn.prefill_s = fed, st.prefill_s - p0
        suffix = plan.text[plan.start :]
        if fed < len(plan.tokens):  # cancelled while reading: keep what was read, reply nothing
            self._cut_message(plan, suffix, fed)
            turn.stop = "cancelled_reading"
            return
        self._fed_text = plan.text
        if plan.tokens:
            self._have_logits = True
        yield from self._reply(max_tokens, turn, chat=True, ignore_eos=ignore_eos, stop=stop)

    def _cut_message(self, plan: _Plan, suffix: str, fed: int) -> None:
        """Prefill was cancelled after ``fed`` tokens: cut the last message to what the cache holds."""
        if plan.ends is not None and fed > 0:
            read = suffix.encode("utf-8")[: plan.ends[fed - 1]].decode("utf-8", "ignore")
        elif fed > 0:
            read = b"".join(self.model.token_bytes(t, special=True) for t in plan.tokens[:fed]).decode(
                "utf-8", "ignore"
            )
            read = read if suffix.startswith(read) else ""
        else:
            read = ""
        cut_at = plan.start + len(read)
        self._fed_text = plan.text[:cut_at]
        self._have_logits = fed > 0 or self._have_logits
        last = self._messages[-1]
        if plan.ranges is not None:
            cs, _ = plan.ranges[-1]
            last["content"] = last["content"][: max(0, cut_at - cs)]
        self._messages.append({"role": "assistant", "content": ""})
        if self._n_system > sum(1 for f in plan.flags[:fed] if f == 2) and plan.start == 0:
            self._n_system = sum(1 for f in plan.flags[:fed] if f == 2)
            self._system_ids = self._system_ids[: self._n_system]

    def _restart_cache(self) -> None:
        """A fresh cache with the current configuration (statistics carry on)."""
        old = self.session
        stats = old.stats
        old.close()
        self.session = self._new_session(replace(old.config))
        self.session.stats = stats
        self._fed_text, self._n_system, self._system_ids, self._have_logits = "", 0, [], False

    def _feed(self, tokens: Sequence[int], flags: Sequence[int], on_progress: Optional[ProgressFn]) -> int:
        """Feed ``tokens`` through the session, protecting flagged ones before they can be evicted;
        returns the tokens fed (fewer when cancelled)."""
        return self.session.prefill(
            tokens,
            protect=flags,
            on_protect=self._limit_protection,
            cancel=self._cancel.is_set,
            on_progress=on_progress,
        )

    def _limit_protection(self) -> None:
        """Release the oldest template tokens once protection passes its share of the budget."""
        cfg = self.session.config
        if cfg.budget is not None:
            limit = max(self._n_system, (cfg.budget - cfg.n_sink - cfg.keep_last) // 2)
            self.session.release_oldest_protection(limit, keep_first=self._n_system)

    def _refresh_logits(self) -> None:
        """Logits for a session restored from a file (or with nothing new to read)."""
        try:
            self.session.refresh_logits(self.model.bos)
        except AmsError as exc:
            raise ChatError(str(exc)) from None
        self._have_logits = True

    def _reply_sampler(self) -> None:
        """With a fixed seed every reply gets its own seed, derived from the reply count, so a
        loaded session samples what the saved one would have; a grammar starts over."""
        sp = self.sampler_params
        if sp.temp > 0 and sp.seed != RANDOM_SEED:
            seed = (sp.seed * 1_000_003 + self._n_replies) & 0xFFFFFFFF
            self.session.set_sampler(replace(sp, seed=0 if seed == RANDOM_SEED else seed))
        elif sp.grammar:  # a grammar's state is where the last reply ended: every reply starts at its root
            self.session.set_sampler(sp)

    def _reply(
        self, max_tokens: int, turn: TurnStats, *, chat: bool, ignore_eos: bool = False, stop: Sequence[str] = ()
    ) -> Iterator[str]:
        s = self.session
        if not self._have_logits:
            self._refresh_logits()
        token_hook = self.token_hook
        logits = s.logits() if self.logits_hook is not None or token_hook is not None else None
        if self.logits_hook is not None:
            self.logits_hook(logits)
        self._reply_sampler()
        d0 = s.stats.decode_s
        text = TextStream(self.model)
        stops = StopFilter((tuple(self.template.stops) if chat else ()) + tuple(stop))
        raw: list[str] = []
        shown: list[str] = []
        n = 0
        turn.stop = "max_tokens"
        gen = s.generate([], max_tokens, ignore_eos=ignore_eos)
        try:
            for tok in gen:
                n += 1
                if token_hook is not None:  # the logits ``tok`` was sampled from; the next ones are ready now
                    token_hook(tok, logits)
                    logits = s.logits()
                piece = text.push(tok)
                raw.append(piece)
                out = stops.push(piece)
                if out:
                    shown.append(out)
                    yield out
                if stops.hit:
                    turn.stop = "stop_string"
                    break
                if self._cancel.is_set():
                    turn.stop = "cancelled"
                    break
            else:
                if n < max_tokens:
                    full = s.config.capacity is None and s.n_occupied >= s.n_ctx
                    turn.stop = "context_full" if full else "eog"
            tail = text.flush()
            raw.append(tail)
            out = stops.push(tail) + stops.flush()
            if out:
                shown.append(out)
                yield out
        finally:
            gen.close()
            turn.reply_tokens, turn.decode_s = n, s.stats.decode_s - d0
            self._n_replies += 1
            if chat:
                self._fed_text += "".join(raw)
                self._messages.append({"role": "assistant", "content": "".join(shown)})
            else:
                self._fed_text += "".join(raw)

    # --- raw generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: Optional[int] = None,
        stream: bool = True,
        ignore_eos: bool = False,
        on_progress: Optional[ProgressFn] = None,
        stop: Sequence[str] = (),
        keep: int = 0,
    ) -> Union[Iterator[str], str]:
        """Continue the session's raw text with ``prompt`` (no template) and generate.

        The first call starts with BOS when the model wants it; later calls continue where the
        last one stopped, under the same budget. A session holds either a chat or raw text.
        ``stop``: strings that end the text, not shown. ``keep`` (first call only): the prompt's
        first tokens that are never evicted, as llama.cpp's ``--keep`` (-1: the whole prompt).
        """
        if self._busy.locked():  # busy first: the mode may be about to change under this call
            raise SessionBusyError("the session is busy with another call (use one thread per session at a time)")
        if self._mode == "chat":
            raise ChatError("this session holds a chat; clear() it before generate()")
        self._cancel.clear()
        n = max_tokens if max_tokens is not None else self.max_tokens
        it = self._generate_iter(prompt, n, ignore_eos, on_progress, tuple(stop), keep)
        self._stream = weakref.ref(it)
        return it if stream else "".join(it)

    def _generate_iter(
        self,
        prompt: str,
        max_tokens: int,
        ignore_eos: bool,
        on_progress: Optional[ProgressFn],
        stop: tuple[str, ...] = (),
        keep: int = 0,
    ) -> Iterator[str]:
        self._acquire()
        try:
            s = self.session
            first = s.n_occupied == 0
            tokens = self.model.tokenize(prompt, add_special=first, parse_special=False) if prompt or first else []
            n_keep = (len(tokens) if keep < 0 else min(keep, len(tokens))) if first else 0
            flags = [2] * n_keep + [0] * (len(tokens) - n_keep)
            if n_keep and s.config.budget is not None:
                self._check_budget_for_system(s.config, n_keep, what=f"--keep {keep}")
            self._check_fits(tokens, flags, refeed=False)
            if n_keep:
                self._n_system = n_keep
            self._mode = "raw"
            self._version += 1
            turn = TurnStats()
            self.last_turn = turn
            st = s.stats
            p0 = st.prefill_s
            fed = self._feed(tokens, flags, on_progress)
            turn.prompt_tokens, turn.prefill_s = fed, st.prefill_s - p0
            self._fed_text += prompt if fed == len(tokens) else ""
            if fed < len(tokens):
                turn.stop = "cancelled_reading"
                return
            if tokens:
                self._have_logits = True
            yield from self._reply(max_tokens, turn, chat=False, ignore_eos=ignore_eos, stop=stop)
        finally:
            self._busy.release()

    # --- live changes ---------------------------------------------------------------------------

    @property
    def mode(self) -> Optional[str]:
        """What the session holds: "chat", "raw" (text from :meth:`generate`) or None (nothing yet)."""
        return self._mode

    @property
    def fed_text(self) -> str:
        """The text the cache has read, in order (a raw session: its prompts and outputs)."""
        return self._fed_text

    def set_sampling(self, **changes: Any) -> None:
        """Sample the next replies with these :class:`SamplerParams` fields changed (``temp``,
        ``top_p``, ``seed`` ...); a seed of None means random."""
        if "seed" in changes:
            seed = changes["seed"]
            changes["seed"] = RANDOM_SEED if seed is None else int(seed) & 0xFFFFFFFF
        params = replace(self.sampler_params, **changes)
        if params == self.sampler_params:
            return
        self._acquire()
        try:
            self.sampler_params = params
            self.session.set_sampler(params)
        finally:
            self._busy.release()

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays) and start a fresh cache and statistics."""
        self._acquire()
        try:
            old = self.session
            old.close()
            self.session = self._new_session(replace(old.config))
            self._reset_conversation()
            self._version += 1
        finally:
            self._busy.release()

    def set_budget(self, budget: int) -> None:
        """Compress to ``budget`` from the next message on.

        A smaller budget cuts the cache at the start of the next message; a budget whose
        ``budget + interval`` does not fit the context moves the session into a larger context
        (the cache and the controller state are carried over). Refused for a session without a
        budget, below ``n_sink + keep_last + 1``, above the trained context, or too small for the
        system prompt.
        """
        self._acquire()
        try:
            s = self.session
            if s.config.budget is None:
                raise BudgetError("this session has no budget (full cache); start a new one with a budget")
            cfg = replace(s.config, budget=budget).validate(self.model.n_ctx_train)
            self._check_budget_for_system(cfg, self._n_system)
            if cfg.capacity <= s.n_ctx:
                s.set_budget(cfg.budget)
            else:
                meta, arrays, kv = s.export_state()
                new = self._new_session(cfg)
                new.import_state(meta, arrays, kv)
                new.stats.kv_budget, new.stats.kv_capacity = cfg.budget, cfg.capacity
                s.close()
                self.session = new
                self._have_logits = False
            self._limit_protection()
            self._version += 1
        finally:
            self._busy.release()

    def set_scorer(self, name: str) -> None:
        """Score with ``name`` from the next compression on (see :meth:`Session.set_scorer`)."""
        from .scorers import SCORERS

        if name not in SCORERS:
            raise UnknownScorerError(f"unknown scorer {name}; choices: {', '.join(sorted(SCORERS))}")
        self._acquire()
        try:
            s = self.session
            if s.config.budget is None:
                raise ChatError("this session has no budget, so nothing is scored; start one with a budget")
            calibration = None
            if name == "triattention" and s.config.calibration is None:
                from .calibration import load_for_model

                calibration = load_for_model(self.model.path)
            s.set_scorer(name, calibration=calibration)
            self._version += 1
        finally:
            self._busy.release()

    # --- save and load --------------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> int:
        """Write the session to ``path`` (atomically); returns the bytes written.

        If the cache is full, the compression the next message would start with runs first. The
        session then continues from the saved state itself, so this process and one that loads the
        file produce identical next-token logits.
        """
        self._acquire()
        try:
            s = self.session
            cap = s.config.capacity
            if cap is not None and s.n_occupied >= cap:
                s.compress()
            meta, arrays, kv = s.export_state()
            doc = {
                "amslocal": __version__,
                "model": savefile.model_identity(self.model),
                "session": meta,
                "ctx": asdict(self.ctx_params),
                "sampler": asdict(self.sampler_params),
                "chat": {
                    "messages": self._messages,
                    "fed_text": self._fed_text,
                    "mode": self._mode,
                    "system": self.system,
                    "n_system": self._n_system,
                    "system_ids": self._system_ids,
                    "n_replies": self._n_replies,
                    "refeeds": self.refeeds,
                    "max_tokens": self.max_tokens,
                    "keep": self.keep,
                    "template": {
                        "source": self.template.source,
                        "kind": self.template.kind,
                        "stops": list(self.template.stops),
                    },
                },
            }
            data = savefile.pack(doc, arrays, kv)
            target = savefile.write_atomic(path, data)
            self._apply(*savefile.unpack(data, str(target), savefile.model_identity(self.model)))
            return len(data)
        finally:
            self._busy.release()

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Replace this session with the one saved in ``path`` (same model file required).

        The saved configuration, template and sampler settings come back with it; this session's
        thread count is kept. A damaged or foreign file raises :class:`SaveFileError` and leaves
        the session as it was.
        """
        data = savefile.read(path)
        self._acquire()
        try:
            self._apply(*savefile.unpack(data, str(path), savefile.model_identity(self.model)))
        finally:
            self._busy.release()

    def _apply(self, doc: dict, arrays: dict[str, np.ndarray], kv: bytes) -> None:
        """Build a fresh context from a parsed save and move this session onto it."""
        try:
            meta = doc["session"]
            chat = doc["chat"]
            config = CompressionConfig.from_dict(meta["config"])
            ctx_params = ContextParams(**{**doc["ctx"], "n_threads": self.ctx_params.n_threads})
            sampler_params = SamplerParams(**doc["sampler"])
            t = chat["template"]
            template = ChatTemplate(
                t["source"],
                kind=t["kind"],
                bos_token=self.template.bos_token,
                eos_token=self.template.eos_token,
                stops=t["stops"],
            )
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in chat["messages"]]
            fields = (
                chat["fed_text"],
                chat["mode"],
                int(chat["n_system"]),
                [int(x) for x in chat["system_ids"]],
                int(chat["n_replies"]),
                int(chat["refeeds"]),
                chat["system"],
                int(chat["max_tokens"]),
                int(chat.get("keep", 0)),  # files saved before --keep had none
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SaveFileError(f"the saved session is incomplete ({exc.__class__.__name__}: {exc})") from None
        old_ctx, old_sampler = self.ctx_params, self.sampler_params
        self.ctx_params, self.sampler_params = ctx_params, sampler_params
        try:
            new = self._new_session(config)
            new.import_state(meta, arrays, kv)
        except (AmsError, KeyError, TypeError, ValueError) as exc:
            self.ctx_params, self.sampler_params = old_ctx, old_sampler
            raise SaveFileError(f"the saved session cannot be restored: {exc}") from None
        self.session.close()
        self.session = new
        self.template = template
        self._messages = messages
        (
            self._fed_text,
            self._mode,
            self._n_system,
            self._system_ids,
            self._n_replies,
            self.refeeds,
            self.system,
            self.max_tokens,
            self.keep,
        ) = fields
        self._have_logits = False
        self._version += 1
