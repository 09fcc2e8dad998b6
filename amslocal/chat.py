"""Chat on top of a budgeted :class:`~amslocal.session.Session`: templates, turns, save and load.

**Templates.** The chat template comes from the GGUF metadata (``tokenizer.chat_template``) and is
rendered in jinja2's ``ImmutableSandboxedEnvironment`` with the helpers Hugging Face templates
expect (``raise_exception``, ``strftime_now``, ``tojson``, ``bos_token``, ``eos_token``). A model
without a template gets ChatML (and stops at the text ``<|im_end|>``); a caller may pass its own.

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

**Save files** hold a magic and version header, a sha256 of the payload, and the payload (an
uncompressed ``.npz``, read with ``allow_pickle=False``): a JSON document (messages, configuration,
statistics, the model's sha256) plus the controller's arrays and llama.cpp's sequence state. The
cells land elsewhere in a new context, so saving also moves the saving session onto the restored
state: both continue from bit-identical caches and produce identical next-token logits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import __version__
from .backend import ContextParams, Model, Sampler, SamplerParams
from .engine import TextStream
from .errors import AmsError
from .session import BudgetError, CompressionConfig, Session, SessionStats

__all__ = [
    "CHATML_TEMPLATE", "ChatError", "ChatSession", "ChatTemplate", "SaveFileError", "SessionBusyError",
    "TemplateError", "TurnStats",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")

SAVE_MAGIC = b"AMSCHAT\x00"
SAVE_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256(payload)
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED

ProgressFn = Callable[[int, int], None]
Messages = Union[str, Sequence[Mapping[str, Any]]]


class ChatError(AmsError):
    """A chat request that cannot be served (bad messages, a full context, a wrong mode)."""


class TemplateError(ChatError):
    """The chat template does not compile or refuses the conversation."""


class SaveFileError(AmsError):
    """A save file that is unreadable, damaged, of another format, or of another model."""

    exit_code = 2


class SessionBusyError(ChatError):
    """The session is serving another call (a session is used by one thread at a time)."""


# --- templates -----------------------------------------------------------------------------------

def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError as JinjaTemplateError

    raise JinjaTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[tuple] = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A jinja chat template rendered in a sandbox. ``kind``: gguf | chatml | custom."""

    def __init__(self, source: str, *, kind: str = "custom", bos_token: str = "", eos_token: str = "",
                 stops: Sequence[str] = ()):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.kind, self.stops = source, kind, tuple(stops)
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"chat template ({kind}): syntax error on line {exc.lineno}: {exc.message}") from None

    @classmethod
    def for_model(cls, model: Model, override: Optional[str] = None) -> "ChatTemplate":
        """``override`` (template text, or ``"chatml"``), else the GGUF's template, else ChatML."""
        bos = model.token_text(model.bos) if model.bos >= 0 else ""
        eos = model.token_text(model.eos) if model.eos >= 0 else ""
        if override is not None and override.strip().lower() != "chatml":
            return cls(override, kind="custom", bos_token=bos, eos_token=eos)
        source = None if override is not None else model.chat_template()
        if source:
            return cls(source, kind="gguf", bos_token=bos, eos_token=eos)
        # ChatML: stop at its end marker when the model does not know it as a token
        im_end = model.tokenize("<|im_end|>", add_special=False, parse_special=True)
        known = len(im_end) == 1 and model.is_eog(im_end[0])
        return cls(CHATML_TEMPLATE, kind="chatml", bos_token=bos, eos_token=eos, stops=() if known else CHATML_STOPS)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as exc:  # jinja's own errors, and whatever a template's expressions raise
            msg = " ".join(str(exc).split()) or exc.__class__.__name__
            raise TemplateError(f"chat template ({self.kind}): {msg}") from None

    def content_ranges(self, messages: Sequence[Mapping[str, Any]], text: str,
                       add_generation_prompt: bool = True) -> Optional[list[tuple[int, int]]]:
        """Character range of each message's content in ``text`` (this template's rendering), or
        None when the template does not reproduce contents verbatim, exactly once each."""
        marked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
        try:
            skeleton = self.render(marked, add_generation_prompt)
        except TemplateError:
            return None
        ranges: list[Optional[tuple[int, int]]] = [None] * len(messages)
        out, cursor, shift = [], 0, 0
        for m in re.finditer("\ue000(\\d+)\ue001", skeleton):
            i = int(m.group(1))
            if i >= len(messages) or ranges[i] is not None:
                return None
            out.append(skeleton[cursor:m.start()])
            content = messages[i]["content"]
            start = m.start() + shift
            ranges[i] = (start, start + len(content))
            out.append(content)
            shift += len(content) - (m.end() - m.start())
            cursor = m.end()
        out.append(skeleton[cursor:])
        if any(r is None for r in ranges) or "".join(out) != text:
            return None
        return ranges  # type: ignore[return-value]


class _StopFilter:
    """Holds back text that may be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.buf, self.hit = tuple(s for s in stops if s), "", False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.buf, self.hit = self.buf[:min(cuts)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


# --- the chat session ----------------------------------------------------------------------------

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
    start: int               # characters of ``text`` the cache already holds
    tokens: list[int]
    flags: list[int]         # per token: 0 content, 1 template (protected), 2 system (always kept)
    ends: Optional[list[int]]  # byte end of each token in the suffix, when known
    ranges: Optional[list[tuple[int, int]]]
    version: int


def _model_identity(model: Model) -> dict:
    from .calibration import model_sha256

    path = Path(model.path)
    return {"name": path.name, "size": path.stat().st_size, "sha256": model_sha256(path), "arch": model.arch,
            "n_vocab": model.n_vocab}


class ChatSession:
    """A multi-turn chat whose KV cache stays inside a token budget.

    Thread-safety: a session serves one call at a time (a second concurrent call raises
    :class:`SessionBusyError`); :meth:`cancel` may be called from any thread at any time. Library
    code never prints; progress goes to the ``on_progress`` callbacks.
    """

    def __init__(self, model: Model, config: CompressionConfig = CompressionConfig(),
                 ctx_params: ContextParams = ContextParams(), sampler_params: SamplerParams = SamplerParams(),
                 *, system: Optional[str] = None, template: Union[ChatTemplate, str, None] = None,
                 max_tokens: int = 512, observe_attention: bool = False):
        self.model = model
        self.observe_attention = observe_attention  # diagnostics (benchmarks), see Session
        self.ctx_params = ctx_params
        self.sampler_params = sampler_params
        self.template = template if isinstance(template, ChatTemplate) else ChatTemplate.for_model(model, template)
        self.system = system
        self.max_tokens = max_tokens
        self.logits_hook: Optional[Callable[[np.ndarray], None]] = None  # called with the next-token logits
        self.last_turn = TurnStats()
        self.refeeds = 0
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self._version = 0
        if config.budget is not None and config.budget > model.n_ctx_train:
            raise BudgetError(f"the budget {config.budget} is above the model's trained context ({model.n_ctx_train})")
        self.session = self._new_session(replace(config))
        self._reset_conversation()
        # fail now, not at the first message, on a template that cannot render a plain exchange or
        # a system prompt that does not fit the budget
        self._prepare(self.messages + [{"role": "user", "content": "Hello."}])

    # --- construction ---------------------------------------------------------------------------

    def _new_session(self, config: CompressionConfig) -> Session:
        from .scorers import SCORERS

        if config.scorer not in SCORERS:
            raise ChatError(f"unknown scorer {config.scorer}; choices: {', '.join(sorted(SCORERS))}")
        if config.budget is not None and config.scorer == "triattention" and config.calibration is None:
            from .calibration import load_for_model

            config = replace(config, calibration=load_for_model(self.model.path))
        return Session(self.model, config, self.ctx_params, self.sampler_params,
                       observe_attention=self.observe_attention)

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
    def cells_used(self) -> int:
        return self.session.n_occupied

    def system_tokens_in_cache(self) -> tuple[int, int]:
        """(kept, total): how many of the system prompt's tokens (with its template) the cache holds,
        checked by token id against the first live positions."""
        _, toks = self.session.gen.kept_tokens()
        kept = 0
        for a, b in zip(toks, self._system_ids):
            if a != b:
                break
            kept += 1
        return kept, len(self._system_ids)

    def cancel(self) -> None:
        """Stop the reply (or prefill) in progress at the next token or chunk. Thread-safe."""
        self._cancel.set()

    def close(self) -> None:
        """Free the llama.cpp context; the session cannot be used afterwards."""
        self._closed = True
        self.session.gen.ctx.close()

    # --- locking --------------------------------------------------------------------------------

    def _acquire(self) -> None:
        if getattr(self, "_closed", False):
            raise ChatError("the session is closed")
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError("the session is busy with another call (use one thread per session at a time)")

    # --- chat -----------------------------------------------------------------------------------

    def chat(self, messages: Messages, *, stream: bool = True, max_tokens: Optional[int] = None,
             on_progress: Optional[ProgressFn] = None, ignore_eos: bool = False) -> Union[Iterator[str], str]:
        """Reply to a message (text) or to a whole conversation (a list of ``{"role", "content"}``).

        A list is the conversation so far (the session's system message is put first when the
        list has none); whatever the cache already holds of it is not read again. Returns an
        iterator of text pieces (``stream=True``) or the whole reply. The reply is added to
        :attr:`messages` when it ends, is cancelled, or the iterator is closed. ``on_progress(done,
        total)`` is called after each prefill chunk; ``ignore_eos`` (tests, benchmarks) lets a
        reply run past end-of-generation tokens.
        """
        conv = self._conversation(messages)
        self._acquire()
        try:
            plan = self._prepare(conv)
        finally:
            self._busy.release()
        self._cancel.clear()
        it = self._chat_iter(plan, max_tokens if max_tokens is not None else self.max_tokens, on_progress,
                             ignore_eos)
        return it if stream else "".join(it)

    def _conversation(self, messages: Messages) -> list[dict]:
        if self._mode == "raw":
            raise ChatError("this session holds raw text from generate(); clear() it before chat()")
        if isinstance(messages, str):
            return self.messages + [{"role": "user", "content": messages}]
        conv = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
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
            return len(suffix[:max(0, min(i - start, len(suffix)))].encode("utf-8"))

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
            n_sys = lead + (len(self.model.tokenize(suffix[:sys_end], add_special=False, parse_special=True))
                            if sys_end else 0)
            flags = [2 if k < n_sys else (1 if self.model.is_control(t) else 0) for k, t in enumerate(tokens)]

        self._check_fits(tokens, flags, refeed=start == 0)
        return _Plan(conv, text, start, tokens, flags, ends, ranges, self._version)

    @staticmethod
    def _check_budget_for_system(cfg: CompressionConfig, n_system: int) -> None:
        room = cfg.budget - cfg.n_sink - cfg.keep_last - 1
        if n_system > room:
            raise BudgetError(f"the system prompt and its template take {n_system} tokens, but a budget of {cfg.budget} "
                              f"protects at most {room} (budget - n_sink - keep_last - 1); raise the budget "
                              "or shorten the system prompt")

    def _check_fits(self, tokens: list[int], flags: list[int], refeed: bool) -> None:
        s = self.session
        cfg = s.config
        if cfg.budget is None:
            used = 0 if refeed else s.n_occupied
            free = s.gen.ctx.n_ctx - used
            if len(tokens) + 1 > free:
                raise ChatError(f"the message needs {len(tokens)} cells but the context has {free} free of "
                                f"{s.gen.ctx.n_ctx}; /clear, or chat with a --budget")
        elif refeed:
            self._check_budget_for_system(cfg, sum(1 for f in flags if f == 2))

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

    def _chat_iter(self, plan: _Plan, max_tokens: int, on_progress: Optional[ProgressFn],
                   ignore_eos: bool) -> Iterator[str]:
        self._acquire()
        try:
            if plan.version != self._version:  # the session changed between chat() and the first next()
                plan = self._prepare(plan.conv)
            yield from self._run_turn(plan, max_tokens, on_progress, ignore_eos)
        finally:
            self._busy.release()

    def _run_turn(self, plan: _Plan, max_tokens: int, on_progress: Optional[ProgressFn],
                  ignore_eos: bool) -> Iterator[str]:
        turn = TurnStats(refed=plan.start == 0 and bool(self._fed_text))
        self.last_turn = turn
        if turn.refed:
            self.refeeds += 1
        if plan.start == 0 and self.session.gen.tokens_at:
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
        suffix = plan.text[plan.start:]
        if fed < len(plan.tokens):  # cancelled while reading: keep what was read, reply nothing
            self._cut_message(plan, suffix, fed)
            turn.stop = "cancelled_reading"
            return
        self._fed_text = plan.text
        if plan.tokens:
            self._have_logits = True
        yield from self._reply(max_tokens, turn, chat=True, ignore_eos=ignore_eos)

    def _cut_message(self, plan: _Plan, suffix: str, fed: int) -> None:
        """Prefill was cancelled after ``fed`` tokens: cut the last message to what the cache holds."""
        if plan.ends is not None and fed > 0:
            read = suffix.encode("utf-8")[:plan.ends[fed - 1]].decode("utf-8", "ignore")
        elif fed > 0:
            read = b"".join(self.model.token_bytes(t, special=True) for t in plan.tokens[:fed]).decode("utf-8", "ignore")
            read = read if suffix.startswith(read) else ""
        else:
            read = ""
        cut_at = plan.start + len(read)
        self._fed_text = plan.text[:cut_at]
        self._have_logits = fed > 0 or self._have_logits
        last = self._messages[-1]
        if plan.ranges is not None:
            cs, _ = plan.ranges[-1]
            last["content"] = last["content"][:max(0, cut_at - cs)]
        self._messages.append({"role": "assistant", "content": ""})
        if self._n_system > sum(1 for f in plan.flags[:fed] if f == 2) and plan.start == 0:
            self._n_system = sum(1 for f in plan.flags[:fed] if f == 2)
            self._system_ids = self._system_ids[:self._n_system]

    def _restart_cache(self) -> None:
        """A fresh cache with the current configuration (statistics carry on)."""
        old = self.session
        stats = old.stats
        old.gen.ctx.close()
        self.session = self._new_session(replace(old.config))
        self.session.stats = stats
        self._fed_text, self._n_system, self._system_ids, self._have_logits = "", 0, [], False

    def _feed(self, tokens: Sequence[int], flags: Sequence[int], on_progress: Optional[ProgressFn]) -> int:
        """Feed ``tokens`` chunk by chunk, protecting flagged ones before they can be evicted.

        Each chunk fits the free room, so a compression only happens between chunks, after the
        protected positions of every fed token are registered. Returns the tokens fed (fewer when
        cancelled).
        """
        s = self.session
        n_batch = s.gen.batch.capacity
        i, total = 0, len(tokens)
        # question-aware prefill: until the feed reaches them, the message's last tokens observe
        # every compression (see Session.feed)
        obs = s.observer_tail(tokens) if s.config.question_aware and s.config.budget is not None else []
        while i < total:
            if self._cancel.is_set():
                break
            cap = s.config.capacity
            if cap is None:
                n = min(n_batch, total - i)
            else:
                active = obs if i < total - len(obs) else []
                room = cap - s.n_occupied - len(active)
                if room <= 0:
                    s.compress(observers=active)
                    continue
                n = min(room, n_batch, total - i)
            p0 = s.gen.next_pos
            protect = [p0 + k for k in range(n) if flags[i + k]]
            if protect:
                s.protect(protect)
                self._limit_protection()
            s.prefill(tokens[i:i + n], observers=())
            i += n
            if on_progress is not None:
                on_progress(i, total)
        return i

    def _limit_protection(self) -> None:
        """Release the oldest template tokens once protection passes its share of the budget."""
        s = self.session
        cfg = s.config
        if cfg.budget is None:
            return
        limit = max(self._n_system, (cfg.budget - cfg.n_sink - cfg.keep_last) // 2)
        prot = sorted(s.protected_positions)
        excess = len(prot) - limit
        if excess > 0:
            s.protected_positions.difference_update(prot[self._n_system:self._n_system + excess])

    def _refresh_logits(self) -> None:
        """Logits for a session restored from a file (or with nothing new to read): decode the last
        token again at its own position."""
        s = self.session
        if not s.gen.tokens_at:
            if self.model.bos < 0:
                raise ChatError("nothing to continue from: the cache is empty and the model has no BOS token")
            s.prefill([self.model.bos])
        else:
            p = max(s.gen.tokens_at)
            tok = s.gen.tokens_at[p]
            s.gen.evict([p])
            s.gen.eval([tok], [p])
        self._have_logits = True

    def _reply_sampler(self) -> None:
        """With a fixed seed every reply gets its own seed, derived from the reply count, so a
        loaded session samples what the saved one would have."""
        sp = self.sampler_params
        if sp.temp > 0 and sp.seed != RANDOM_SEED:
            seed = (sp.seed * 1_000_003 + self._n_replies) & 0xFFFFFFFF
            self.session.gen.sampler = Sampler(replace(sp, seed=0 if seed == RANDOM_SEED else seed))

    def _reply(self, max_tokens: int, turn: TurnStats, *, chat: bool, ignore_eos: bool = False) -> Iterator[str]:
        s = self.session
        if not self._have_logits:
            self._refresh_logits()
        if self.logits_hook is not None:
            self.logits_hook(s.gen.ctx.logits(-1))
        self._reply_sampler()
        d0 = s.stats.decode_s
        text = TextStream(self.model)
        stop = _StopFilter(self.template.stops if chat else ())
        raw: list[str] = []
        shown: list[str] = []
        n = 0
        turn.stop = "max_tokens"
        gen = s.generate([], max_tokens, ignore_eos=ignore_eos)
        try:
            for tok in gen:
                n += 1
                piece = text.push(tok)
                raw.append(piece)
                out = stop.push(piece)
                if out:
                    shown.append(out)
                    yield out
                if stop.hit:
                    turn.stop = "stop_string"
                    break
                if self._cancel.is_set():
                    turn.stop = "cancelled"
                    break
            else:
                if n < max_tokens:
                    full = s.config.capacity is None and s.n_occupied >= s.gen.ctx.n_ctx
                    turn.stop = "context_full" if full else "eog"
            tail = text.flush()
            raw.append(tail)
            out = stop.push(tail) + stop.flush()
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

    def generate(self, prompt: str, *, max_tokens: Optional[int] = None, stream: bool = True,
                 ignore_eos: bool = False, on_progress: Optional[ProgressFn] = None) -> Union[Iterator[str], str]:
        """Continue the session's raw text with ``prompt`` (no template) and generate.

        The first call starts with BOS when the model wants it; later calls continue where the
        last one stopped, under the same budget. A session holds either a chat or raw text.
        """
        if self._mode == "chat":
            raise ChatError("this session holds a chat; clear() it before generate()")
        self._cancel.clear()
        it = self._generate_iter(prompt, max_tokens if max_tokens is not None else self.max_tokens,
                                 ignore_eos, on_progress)
        return it if stream else "".join(it)

    def _generate_iter(self, prompt: str, max_tokens: int, ignore_eos: bool,
                       on_progress: Optional[ProgressFn]) -> Iterator[str]:
        self._acquire()
        try:
            s = self.session
            first = not s.gen.tokens_at
            tokens = self.model.tokenize(prompt, add_special=first, parse_special=False) if prompt or first else []
            self._check_fits(tokens, [0] * len(tokens), refeed=False)
            self._mode = "raw"
            self._version += 1
            turn = TurnStats()
            self.last_turn = turn
            st = s.stats
            p0 = st.prefill_s
            fed = self._feed(tokens, [0] * len(tokens), on_progress)
            turn.prompt_tokens, turn.prefill_s = fed, st.prefill_s - p0
            self._fed_text += prompt if fed == len(tokens) else ""
            if fed < len(tokens):
                turn.stop = "cancelled_reading"
                return
            if tokens:
                self._have_logits = True
            yield from self._reply(max_tokens, turn, chat=False, ignore_eos=ignore_eos)
        finally:
            self._busy.release()

    # --- live changes ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays) and start a fresh cache and statistics."""
        self._acquire()
        try:
            old = self.session
            old.gen.ctx.close()
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
            if budget > self.model.n_ctx_train:
                raise BudgetError(f"the budget {budget} is above the model's trained context ({self.model.n_ctx_train})")
            cfg = replace(s.config, budget=int(budget))
            Session._validate(cfg)
            self._check_budget_for_system(cfg, self._n_system)
            if cfg.capacity <= s.gen.ctx.n_ctx:
                s.set_budget(budget)
            else:
                meta, arrays, kv = s.export_state()
                new = self._new_session(cfg)
                new.import_state(meta, arrays, kv)
                new.stats.kv_budget, new.stats.kv_capacity = cfg.budget, cfg.capacity
                s.gen.ctx.close()
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
            raise ChatError(f"unknown scorer {name}; choices: {', '.join(sorted(SCORERS))}")
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
                "format": "amslocal-chat",
                "version": SAVE_VERSION,
                "amslocal": __version__,
                "model": _model_identity(self.model),
                "session": meta,
                "ctx": asdict(self.ctx_params),
                "sampler": asdict(self.sampler_params),
                "chat": {
                    "messages": self._messages, "fed_text": self._fed_text, "mode": self._mode,
                    "system": self.system, "n_system": self._n_system, "system_ids": self._system_ids,
                    "n_replies": self._n_replies, "refeeds": self.refeeds, "max_tokens": self.max_tokens,
                    "template": {"source": self.template.source, "kind": self.template.kind,
                                 "stops": list(self.template.stops)},
                },
            }
            arrays = dict(arrays)
            arrays["kv"] = np.frombuffer(kv, dtype=np.uint8)
            arrays["doc"] = np.frombuffer(json.dumps(doc).encode("utf-8"), dtype=np.uint8)
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            payload = buf.getvalue()
            data = _HEADER.pack(SAVE_MAGIC, SAVE_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload
            target = Path(path)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, target)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise SaveFileError(f"cannot write {target}: {exc.strerror or exc}") from None
            self._apply(*self._parse(data, str(target)))
            return len(data)
        finally:
            self._busy.release()

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Replace this session with the one saved in ``path`` (same model file required).

        The saved configuration, template and sampler settings come back with it; this session's
        thread count is kept. A damaged or foreign file raises :class:`SaveFileError` and leaves
        the session as it was.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SaveFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._acquire()
        try:
            self._apply(*self._parse(data, str(path)))
        finally:
            self._busy.release()

    def _parse(self, data: bytes, name: str) -> tuple[dict, dict[str, np.ndarray]]:
        if len(data) < len(SAVE_MAGIC) or data[:len(SAVE_MAGIC)] != SAVE_MAGIC:
            raise SaveFileError(f"{name} is not an amslocal session file")
        if len(data) < _HEADER.size:
            raise SaveFileError(f"{name} is damaged or truncated (the header is cut short)")
        _, version, length, digest = _HEADER.unpack_from(data)
        if version != SAVE_VERSION:
            raise SaveFileError(f"{name} is session format {version}; this amslocal reads format {SAVE_VERSION}")
        payload = data[_HEADER.size:]
        if len(payload) != length:
            raise SaveFileError(f"{name} is damaged or truncated ({len(payload)} of {length} payload bytes)")
        if hashlib.sha256(payload).digest() != digest:
            raise SaveFileError(f"{name} is damaged (checksum mismatch)")
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            doc = json.loads(arrays.pop("doc").tobytes().decode("utf-8"))
        except Exception as exc:
            raise SaveFileError(f"{name} is damaged ({exc.__class__.__name__}: {exc})") from None
        if doc.get("format") != "amslocal-chat":
            raise SaveFileError(f"{name} is not an amslocal session file")
        mine = _model_identity(self.model)
        theirs = doc.get("model", {})
        if theirs.get("sha256") != mine["sha256"]:
            raise SaveFileError(f"{name} was saved with model {theirs.get('name', '?')} "
                                f"(sha256 {str(theirs.get('sha256', '?'))[:12]}), not {mine['name']} "
                                f"(sha256 {mine['sha256'][:12]})")
        return doc, arrays

    def _apply(self, doc: dict, arrays: dict[str, np.ndarray]) -> None:
        """Build a fresh context from a parsed save and move this session onto it."""
        try:
            meta = doc["session"]
            chat = doc["chat"]
            config = CompressionConfig.from_dict(meta["config"])
            ctx_params = ContextParams(**{**doc["ctx"], "n_threads": self.ctx_params.n_threads})
            sampler_params = SamplerParams(**doc["sampler"])
            t = chat["template"]
            template = ChatTemplate(t["source"], kind=t["kind"], bos_token=self.template.bos_token,
                                    eos_token=self.template.eos_token, stops=t["stops"])
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in chat["messages"]]
            fields = (chat["fed_text"], chat["mode"], int(chat["n_system"]), [int(x) for x in chat["system_ids"]],
                      int(chat["n_replies"]), int(chat["refeeds"]), chat["system"], int(chat["max_tokens"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SaveFileError(f"the saved session is incomplete ({exc.__class__.__name__}: {exc})") from None
        old_ctx, old_sampler = self.ctx_params, self.sampler_params
        self.ctx_params, self.sampler_params = ctx_params, sampler_params
        try:
            new = self._new_session(config)
            kv = arrays.pop("kv").tobytes()
            new.import_state(meta, arrays, kv)
        except (AmsError, KeyError, TypeError, ValueError) as exc:
            self.ctx_params, self.sampler_params = old_ctx, old_sampler
            raise SaveFileError(f"the saved session cannot be restored: {exc}") from None
        self.session.gen.ctx.close()
        self.session = new
        self.template = template
        self._messages = messages
        (self._fed_text, self._mode, self._n_system, self._system_ids, self._n_replies, self.refeeds,
         self.system, self.max_tokens) = fields
        self._have_logits = False
        self._version += 1
