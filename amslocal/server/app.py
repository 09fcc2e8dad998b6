"""The OpenAI-compatible HTTP front-end (FastAPI): routes, request checks, streaming, errors.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST
/v1/completions``, amslocal's own ``GET /amslocal/props`` (defaults, scorers) and ``GET
/amslocal/sessions`` (the session table), and the chat page at ``/``.

Requests are parsed by hand from JSON, not by a schema, so that unknown fields are ignored (clients
send many) and every problem becomes one OpenAI error body naming the field. amslocal's own fields
ride in the body: ``kv_budget``, ``scorer``, ``ams``, ``session_id`` (and llama-server's
``top_k``, ``min_p``, ``repeat_penalty``, ``ignore_eos``).

Each request becomes a :class:`~amslocal.server.scheduler.Job` on the one worker thread. The
handler waits for the job to start (so an error while choosing the session still gets its HTTP
status), then streams or collects. A client that goes away cancels its job: waiting, it is
skipped; running, it stops at the next token and its session is free again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import Engine
from ..config import CompressionConfig
from ..errors import AmsError, BudgetError, ChatError, ContextFullError, OptionError, SessionBusyError
from .pool import Conversation, SessionPool, Settings, check_session_id
from .scheduler import Job, QueueFull, Scheduler

__all__ = ["ServerConfig", "create_app", "make_server"]

PAGE = Path(__file__).with_name("static") / "chat.html"
FINISH = {"eog": "stop", "stop_string": "stop", "max_tokens": "length", "context_full": "length"}


@dataclass
class ServerConfig:
    """What ``amslocal serve`` was started with. ``session`` holds :meth:`Engine.session`'s keyword
    arguments for a new conversation (budget, scorer, sampling defaults ...)."""

    model_id: str
    session: dict = field(default_factory=dict)
    sessions: int = 4
    max_saved: int = 64
    session_dir: Optional[str] = None
    api_key: Optional[str] = None
    max_queue: int = 16
    max_body_bytes: int = 8 << 20
    cors_origins: tuple = ()  # browser origins allowed to call the API ("*": any); none by default
    max_tokens_limit: int = 1 << 16

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise OptionError("--sessions must be at least 1")
        if self.max_queue < 0:
            raise OptionError("--max-queue must be 0 or more")


# --- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _from_ams(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SessionBusyError):
        return APIError(409, str(exc), code="session_busy")
    if isinstance(exc, BudgetError):
        return APIError(400, str(exc), param="kv_budget")
    if isinstance(exc, ContextFullError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (ChatError, OptionError)):
        return APIError(400, str(exc))
    if isinstance(exc, AmsError):
        return APIError(500, str(exc), type="server_error")
    return APIError(500, f"internal error: {exc.__class__.__name__}: {exc}", type="server_error")


# --- request parsing ----------------------------------------------------------------------------


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} from {lo:g} to {hi:g}", param=name)
    return value


def _flag(body: dict, name: str) -> Optional[bool]:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false", param=name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 16 or not all(isinstance(s, str) for s in value):
        raise APIError(400, "stop must be a string or a list of at most 16 strings", param="stop")
    return [s for s in value if s]


def _content(value: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts (other part types are refused)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(
                    400, f"messages[{i}]: content part {kind!r} is not supported (text only)", param="messages"
                )
        return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


ROLES = {"system", "developer", "user", "assistant", "tool"}


def _messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role", param="messages")
        role = m["role"]
        if role not in ROLES:
            raise APIError(
                400, f"messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))}", param="messages"
            )
        out.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), i)})
    return out


@dataclass
class Sampling:
    max_tokens: int
    temp: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: Optional[int]
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int
    grammar: Optional[str] = None


def _grammar(body: dict) -> Optional[str]:
    """GBNF from ``response_format`` (OpenAI: json_object, json_schema) or llama-server's ``grammar``."""
    from ..grammar import JSON_GRAMMAR, json_schema_grammar

    grammar = body.get("grammar")
    fmt = body.get("response_format")
    if grammar is not None and fmt is not None:
        raise APIError(400, "give response_format or grammar, not both", param="grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise APIError(400, "grammar must be GBNF text", param="grammar")
        return grammar
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            schema = fmt.get("schema")  # llama-server's extension
            return JSON_GRAMMAR if schema is None else json_schema_grammar(schema)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON schema", param="response_format")
            return json_schema_grammar(schema)
    except OptionError as exc:
        raise APIError(400, str(exc), param="response_format") from None
    raise APIError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


class _Requests:
    """Request parsing with the server's defaults."""

    def __init__(self, config: ServerConfig, scorers: list[str]):
        self.config = config
        self.defaults = config.session
        self.scorers = scorers

    def model(self, body: dict) -> str:
        name = body.get("model")
        cfg = self.config
        if name is None or name == "":
            return cfg.model_id
        if not isinstance(name, str):
            raise APIError(400, "model must be a string", param="model")
        if (
            name not in (cfg.model_id, "amslocal")
            and Path(name).stem != cfg.model_id
            and name != cfg.model_id + ".gguf"
        ):
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{cfg.model_id}'",
                param="model",
                code="model_not_found",
            )
        return cfg.model_id

    def sampling(self, body: dict, chat: bool) -> Sampling:
        d = self.defaults
        n = _number(body, "n", 1, 1, integer=True)
        del n  # only one choice per request
        if body.get("max_completion_tokens") is not None:
            max_tokens = _number(body, "max_completion_tokens", 1, self.config.max_tokens_limit, integer=True)
        else:
            max_tokens = _number(body, "max_tokens", 1, self.config.max_tokens_limit, integer=True)
        temp = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        top_k = _number(body, "top_k", 0, 1 << 20, integer=True)
        min_p = _number(body, "min_p", 0.0, 1.0)
        repeat_penalty = _number(body, "repeat_penalty", 1e-6, 10.0)
        seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
        stream = bool(_flag(body, "stream"))
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool((opts or {}).get("include_usage", False))
        logprobs = False
        top_logprobs = 0
        if chat:
            logprobs = bool(_flag(body, "logprobs"))
            top_logprobs = int(_number(body, "top_logprobs", 0, 20, integer=True) or 0)
            if top_logprobs and not logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        elif body.get("logprobs") is not None:
            raise APIError(400, "logprobs is supported on /v1/chat/completions only", param="logprobs")
        return Sampling(
            max_tokens=int(max_tokens if max_tokens is not None else d.get("max_tokens", 512)),
            temp=float(temp if temp is not None else d.get("temperature", 0.8)),
            top_p=float(top_p if top_p is not None else d.get("top_p", 0.95)),
            top_k=int(top_k if top_k is not None else d.get("top_k", 40)),
            min_p=float(min_p if min_p is not None else d.get("min_p", 0.05)),
            repeat_penalty=float(repeat_penalty if repeat_penalty is not None else d.get("repeat_penalty", 1.0)),
            seed=int(seed) & 0xFFFFFFFF if seed is not None else d.get("seed"),
            stop=_stop(body),
            stream=stream,
            include_usage=include_usage,
            ignore_eos=bool(_flag(body, "ignore_eos")),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            grammar=_grammar(body),
        )

    def settings(self, body: dict) -> Settings:
        budget = _number(body, "kv_budget", 1, 1 << 24, integer=True)
        scorer = body.get("scorer")
        if scorer is not None and (not isinstance(scorer, str) or scorer not in self.scorers):
            raise APIError(400, f"scorer must be one of {', '.join(self.scorers)}", param="scorer")
        ams = _flag(body, "ams")
        if (budget is not None or scorer is not None or ams is not None) and self.defaults.get("budget") is None:
            raise APIError(
                400, "this server runs without a budget (--budget off); kv_budget, scorer and ams do not apply"
            )
        return Settings(budget=int(budget) if budget is not None else None, scorer=scorer, ams=ams)

    @staticmethod
    def session_id(body: dict) -> Optional[str]:
        value = body.get("session_id")
        if value is None:
            return None
        try:
            return check_session_id(value)
        except ChatError as exc:
            raise APIError(400, str(exc), param="session_id") from None


# --- the worker's side ----------------------------------------------------------------------------


class _LogprobRecorder:
    """Per generated token: its log-probability and the top alternatives, in OpenAI's shape."""

    def __init__(self, model: Any, top: int):
        self.model, self.top, self.items = model, top, []

    def _entry(self, tok: int, logprob: float) -> dict:
        raw = self.model.token_bytes(tok, special=True)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def __call__(self, tok: int, logits: np.ndarray) -> None:
        x = logits.astype(np.float64)
        m = float(x.max())
        logp = x - (m + np.log(np.exp(x - m).sum()))
        entry = self._entry(tok, float(logp[tok]))
        if self.top:
            best = np.argpartition(-logp, self.top - 1)[: self.top]
            best = best[np.argsort(-logp[best], kind="stable")]
            entry["top_logprobs"] = [self._entry(int(t), float(logp[t])) for t in best]
        else:
            entry["top_logprobs"] = []
        self.items.append(entry)

    def take(self) -> list[dict]:
        out, self.items = self.items, []
        return out


def _usage(conv: Conversation, prompt_tokens: int, before: tuple[int, int]) -> dict:
    chat = conv.chat
    assert chat is not None
    st, turn = chat.stats, chat.last_turn
    fed = turn.prompt_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": turn.reply_tokens,
        "total_tokens": prompt_tokens + turn.reply_tokens,
        "prompt_tokens_details": {"cached_tokens": max(0, prompt_tokens - fed)},
        "prompt_tokens_fed": fed,
        "cells_used": chat.cells_used,
        "kv_budget": chat.config.budget,
        "kv_capacity": chat.config.capacity,  # budget + interval: the most cells ever in use
        "compressions": st.compressions - before[0],
        "evicted_tokens": st.evicted_tokens - before[1],
        "session_restored": conv.restored,
    }


def _run(job: Job, pool: SessionPool, kind: str, payload: Any, sid: Optional[str], settings: Settings, s: Sampling):
    """The worker's part of one request: choose the session, feed what is new, generate."""
    if kind == "chat":
        conv = pool.acquire("chat", messages=payload, session_id=sid, settings=settings)
    else:
        conv = pool.acquire("raw", text=payload, session_id=sid, settings=settings)
    chat = conv.chat
    assert chat is not None
    recorder = _LogprobRecorder(chat.model, s.top_logprobs) if s.logprobs else None
    try:
        chat.set_sampling(
            temp=s.temp,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed,
            grammar=s.grammar,
        )
        st = chat.stats
        before = (st.compressions, st.evicted_tokens)
        if kind == "chat":
            it = chat.chat(payload, max_tokens=s.max_tokens, stop=s.stop, ignore_eos=s.ignore_eos)
            prompt_text = chat.template.render(payload, add_generation_prompt=True)
        else:
            held = chat.fed_text if chat.mode == "raw" else ""
            if held and not payload.startswith(held):  # a named session given another text: start over
                chat.clear()
                held = ""
            it = chat.generate(payload[len(held) :], max_tokens=s.max_tokens, stop=s.stop, ignore_eos=s.ignore_eos)
            prompt_text = payload
        chat.token_hook = recorder
        job.on_cancel(chat.cancel)
        job.emit("start", conv.id)
        for piece in it:
            job.emit("piece", (piece, recorder.take() if recorder else None))
        prompt_tokens = len(chat.model.tokenize(prompt_text, add_special=kind == "raw", parse_special=kind == "chat"))
        job.emit(
            "done",
            {
                "finish_reason": FINISH.get(chat.last_turn.stop, "stop"),
                "usage": _usage(conv, prompt_tokens, before),
                "logprobs": recorder.take() if recorder else None,
            },
        )
    finally:
        chat.token_hook = None
        job.on_cancel(None)
        pool.release(conv)


# --- the app -------------------------------------------------------------------------------------


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


class _Guard:
    """ASGI middleware: the API key (every route but /health and the page) and the body size limit."""

    OPEN = {"/health", "/", "/favicon.ico"}

    def __init__(self, app: Any, api_key: Optional[str], max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.state: Any = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") not in self.OPEN:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = APIError(401, "Incorrect API key provided", code="invalid_api_key")
                return await err.response()(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large()(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> JSONResponse:
        return _BodyTooLarge(self.max_body).response()


class _BodyTooLarge(APIError):
    """Raised while the body is read, so the app answers it like any API error."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes", code="request_too_large")


class _ClientGone(Exception):
    """The client disconnected; its job is cancelled."""


def create_app(engine: Engine, config: ServerConfig) -> Any:
    """The ASGI app serving ``engine``'s model (the engine stays the caller's to close)."""
    from ..savefile import model_identity
    from ..scorers import SCORERS

    scorers = sorted(SCORERS)
    requests = _Requests(config, scorers)
    state: dict[str, Any] = {}
    # AMS or not, decided once for the server's budget when not given: a conversation saved and
    # matched again after a restart must name the same selector as the request that made it
    defaults = dict(config.session)
    if defaults.get("ams") is None:
        defaults["ams"] = CompressionConfig(budget=defaults.get("budget", 1024)).resolved_ams()

    def new_session(settings: Settings):
        kwargs = dict(defaults)
        if settings.budget is not None:
            kwargs["budget"] = settings.budget
        if settings.scorer is not None:
            kwargs["scorer"] = settings.scorer
        if settings.ams is not None:
            kwargs["ams"] = settings.ams
        return engine.session(**kwargs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["pool"] = SessionPool(
            new_session,
            max_live=config.sessions,
            max_saved=config.max_saved,
            session_dir=config.session_dir,
            model_identity=model_identity(engine.model),
            default_ams=bool(defaults["ams"]),
        )
        state["scheduler"] = Scheduler(config.max_queue)
        state["started"] = time.time()
        try:
            yield
        finally:
            state["scheduler"].stop()
            state["closed"] = state["pool"].close()

    app = FastAPI(title="amslocal", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.amslocal = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))).response()

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _from_ams(exc).response()

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict:
        sched: Scheduler = state["scheduler"]
        pool: SessionPool = state["pool"]
        return {
            "status": "ok",
            "model": config.model_id,
            "live_sessions": pool.live,
            "live_sessions_peak": pool.live_peak,
            "max_sessions": pool.max_live,
            "saved_sessions": sum(1 for r in pool.describe() if not r["live"]),
            "forgotten_sessions": pool.forgotten,
            "waiting": sched.waiting,
            "running": sched.current is not None,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(state.get("started", time.time()))
        return {
            "object": "list",
            "data": [{"id": config.model_id, "object": "model", "created": created, "owned_by": "amslocal"}],
        }

    @app.get("/amslocal/props")
    async def props() -> dict:
        d = config.session
        return {
            "model": config.model_id,
            "kv_budget": d.get("budget"),
            "interval": d.get("interval"),
            "scorer": d.get("scorer"),
            "ams": defaults["ams"],
            "scorers": scorers,
            "max_tokens": d.get("max_tokens"),
            "sessions": config.sessions,
            "version": __version__,
        }

    @app.get("/amslocal/sessions")
    async def sessions() -> dict:
        return {"object": "list", "data": state["pool"].describe()}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def submit(request: Request, kind: str, payload: Any, sid: Optional[str], settings: Settings, s: Sampling):
        job = Job(lambda j: _run(j, state["pool"], kind, payload, sid, settings, s), asyncio.get_running_loop())
        try:
            state["scheduler"].submit(job)
        except QueueFull as exc:
            raise APIError(
                503,
                f"the server is busy ({config.max_queue} requests waiting); retry in {exc.retry_after} s",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        return job

    async def next_event(job: Job, request: Request) -> tuple[str, Any]:
        """The job's next event; a client that disconnected meanwhile cancels the job."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise _ClientGone() from None

    async def first_event(job: Job, request: Request) -> str:
        try:
            kind, value = await next_event(job, request)
        except BaseException:
            job.cancel()
            raise
        if kind == "error":
            raise _from_ams(value)
        if kind == "cancelled":
            raise APIError(499, "the request was cancelled")
        return value

    async def completion(request: Request, kind: str) -> Response:
        body = await body_of(request)
        model = requests.model(body)
        if kind == "chat":
            payload: Any = _messages(body)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string (or a list of one string)", param="prompt")
            if body.get("echo"):
                raise APIError(400, "echo is not supported", param="echo")
            payload = prompt
        s = requests.sampling(body, chat=kind == "chat")
        settings = requests.settings(body)
        sid = requests.session_id(body)
        job = await submit(request, kind, payload, sid, settings, s)
        session_id = await first_event(job, request)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        headers = {"X-Session-Id": session_id}
        base = {"id": rid, "created": created, "model": model, "system_fingerprint": f"amslocal-{__version__}"}
        if not s.stream:
            return await collect(job, request, kind, base, session_id, headers)
        return StreamingResponse(
            stream(job, request, kind, base, session_id, s),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def collect(job, request, kind, base, session_id, headers) -> JSONResponse:
        pieces: list[str] = []
        lp: list[dict] = []
        try:
            while True:
                ev, value = await next_event(job, request)
                if ev == "piece":
                    pieces.append(value[0])
                    lp.extend(value[1] or [])
                elif ev == "error":
                    raise _from_ams(value)
                elif ev == "done":
                    break
        except BaseException:
            job.cancel()
            raise
        lp.extend(value["logprobs"] or [])
        text = "".join(pieces)
        if kind == "chat":
            choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}}
            choice["logprobs"] = {"content": lp} if value["logprobs"] is not None else None
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = value["finish_reason"]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        out = {**base, "object": obj, "choices": [choice], "usage": value["usage"], "session_id": session_id}
        return JSONResponse(out, headers=headers)

    async def stream(job, request, kind, base, session_id, s: Sampling) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: Optional[dict], text: Optional[str], finish: Optional[str], logprobs=None) -> dict:
            if kind == "chat":
                choice: dict = {"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**base, "object": obj, "choices": [choice], "session_id": session_id}

        try:
            if kind == "chat":
                yield _sse(chunk({"role": "assistant", "content": ""}, None, None))
            while True:
                ev, value = await next_event(job, request)
                if ev == "piece":
                    piece, lp = value
                    lpd = {"content": lp} if lp is not None else None
                    yield _sse(chunk({"content": piece}, piece, None, lpd))
                elif ev == "error":
                    yield _sse(_from_ams(value).body())
                    break
                elif ev in ("done", "cancelled"):
                    if ev == "done":
                        tail = value["logprobs"]
                        lpd = {"content": tail} if tail else None
                        yield _sse(chunk({}, "", value["finish_reason"], lpd))
                        if s.include_usage:
                            yield _sse(
                                {
                                    **base,
                                    "object": obj,
                                    "choices": [],
                                    "usage": value["usage"],
                                    "session_id": session_id,
                                }
                            )
                    break
            yield b"data: [DONE]\n\n"
        except _ClientGone:
            pass
        finally:
            job.cancel()  # a no-op once the job is done; otherwise the client went away

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await completion(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, "raw")

    outer: Any = _Guard(app, config.api_key, config.max_body_bytes)
    if config.cors_origins:  # outside the key check: a browser's preflight carries no key
        from starlette.middleware.cors import CORSMiddleware

        outer = CORSMiddleware(
            outer,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Session-Id", "Retry-After"],
        )
    outer.state = app.state  # the pool's shutdown report: state.amslocal["closed"]
    return outer


def make_server(app: Any, *, verbose: bool = False) -> Any:
    """A uvicorn server for ``app`` (run it with ``.run(sockets=[sock])``): its logs only with
    ``verbose``, 3 s for open streams to end at shutdown."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's, without re-raising the signal once shut down: a stop by Ctrl-C or SIGTERM
            # is the normal end of a server (its sessions are saved), exit code 0
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=3,
        lifespan="on",
    )
    return Server(config)
