"""`amslocal serve` against a live server on 127.0.0.1: the OpenAI client, session reuse, eviction to
disk, disconnects, errors, and the session pool on its own."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import DEFAULT_MODEL, needs_model
from serving import Server

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'amslocal[server]'")
openai = pytest.importorskip("openai")

SMALL = ["--budget", "96", "--interval", "32", "-t", "1"]  # compresses within a few turns
TINY = ["--budget", "128", "--interval", "32", "-t", "1", "--chat-template", "chatml"]  # the random-weight model


@pytest.fixture(scope="module")
def smol():
    if not DEFAULT_MODEL.exists():
        pytest.skip("default model missing; run: python models/fetch.py")
    with Server(DEFAULT_MODEL, *SMALL) as server:
        yield server


def _client(server: Server, key: str = "none"):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=300)


def _usage(obj) -> dict:
    return obj.usage.model_dump() if obj.usage is not None else {}


# --- the openai client ----------------------------------------------------------------------------


@needs_model
def test_openai_client_chat_streaming_and_not(smol):
    client = _client(smol)
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]
    messages = [{"role": "user", "content": "Name three rivers."}]

    whole = client.chat.completions.create(model=models.data[0].id, messages=messages, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    u = _usage(whole)
    assert u["completion_tokens"] > 0 and u["prompt_tokens_fed"] == u["prompt_tokens"] > 0
    assert u["kv_budget"] == 96 and 0 < u["cells_used"] <= 96 + 32

    chunks = list(
        client.chat.completions.create(
            model=models.data[0].id,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # the same greedy reply, in pieces
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u["completion_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


@needs_model
def test_openai_client_completions(smol):
    client = _client(smol)
    out = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="The capital of France is", max_tokens=8)
    assert out.object == "text_completion" and out.choices[0].text
    pieces = list(
        client.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices)
    # a prompt that continues an earlier one (its prompt + output) reads only what is new
    first = client.completions.create(model="amslocal", prompt="1, 2, 3,", max_tokens=6, temperature=0)
    follow = client.completions.create(
        model="amslocal", prompt="1, 2, 3," + first.choices[0].text + " and", max_tokens=4, temperature=0
    )
    assert _usage(follow)["prompt_tokens_fed"] < _usage(follow)["prompt_tokens"]


@needs_model
def test_response_format_constrains_the_reply(smol):
    client = _client(smol)
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    ask = [{"role": "user", "content": "Invent a person; answer in JSON."}]
    r = client.chat.completions.create(
        model="amslocal",
        messages=ask,
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}},
    )
    assert set(json.loads(r.choices[0].message.content)) == {"name", "age"}
    r = client.chat.completions.create(
        model="amslocal", messages=ask, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content.lstrip().startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="amslocal", messages=ask, max_tokens=4, response_format={"type": "json_schema", "json_schema": {}}
        )
    with pytest.raises(openai.BadRequestError, match="does not parse"):
        client.chat.completions.create(
            model="amslocal", messages=ask, max_tokens=4, extra_body={"grammar": "root ::= ("}
        )


# --- reuse --------------------------------------------------------------------------------------


@needs_model
def test_three_turns_resent_in_full_feed_only_new_messages_and_match_chat(smol):
    from amslocal.api import Engine

    questions = ["Tell me about the moon.", "And the sun?", "Which is bigger?"]
    system = "You are a terse assistant."
    client = _client(smol)
    messages = [{"role": "system", "content": system}]
    served, usages = [], []
    for q in questions:
        messages.append({"role": "user", "content": q})
        r = client.chat.completions.create(model="amslocal", messages=messages, max_tokens=40, temperature=0.7, seed=5)
        reply = r.choices[0].message.content
        served.append(reply)
        usages.append(_usage(r))
        messages.append({"role": "assistant", "content": reply})

    with Engine(DEFAULT_MODEL, n_threads=1) as engine:
        chat = engine.session(budget=96, interval=32, temperature=0.7, seed=5, max_tokens=40)
        conv = [{"role": "system", "content": system}]
        expected, fed = [], []
        for q in questions:
            conv.append({"role": "user", "content": q})
            reply = chat.chat(conv, stream=False)
            expected.append(reply)
            fed.append(chat.last_turn.prompt_tokens)
            conv.append({"role": "assistant", "content": reply})
        compressions = chat.stats.compressions

    assert served == expected
    assert [u["prompt_tokens_fed"] for u in usages] == fed
    assert usages[1]["prompt_tokens_fed"] < usages[1]["prompt_tokens"] // 2  # only the new message
    assert usages[2]["prompt_tokens_details"]["cached_tokens"] > 0
    assert sum(u["compressions"] for u in usages) == compressions > 0


# --- eviction to disk -----------------------------------------------------------------------------


def _first_token_logprobs(server: Server, messages: list[dict]) -> tuple[dict, list[tuple[str, float]]]:
    status, _, body = server.post(
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 5},
    )
    assert status == 200, body
    first = body["choices"][0]["logprobs"]["content"][0]
    return body, [(t["token"], t["logprob"]) for t in first["top_logprobs"]]


def test_sessions_beyond_the_limit_are_saved_and_restored_with_the_same_logits(tiny_gguf, tmp_path):
    convs = [[{"role": "user", "content": f"conversation {i} starts with a few words"}] for i in range(3)]
    args = [*TINY]
    results = {}
    with (
        Server(tiny_gguf, *args, "--sessions", "8") as ref,
        Server(tiny_gguf, *args, "--sessions", "1", "--session-dir", str(tmp_path)) as small,
    ):
        for name, server in (("ref", ref), ("small", small)):
            turns = [list(c) for c in convs]
            for t in turns:  # turn 1 of every conversation: the small server keeps only the last live
                status, _, body = server.post(
                    "/v1/chat/completions", {"messages": t, "max_tokens": 6, "temperature": 0}
                )
                assert status == 200, body
                t.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
                t.append({"role": "user", "content": "and then?"})
            results[name] = [_first_token_logprobs(server, t) for t in turns]
        assert small.get("/health")[2]["live_sessions_peak"] == 1
        assert len(list(tmp_path.glob("*.amss"))) >= 2

    for (ref_body, ref_lp), (body, lp) in zip(results["ref"], results["small"]):
        assert [t for t, _ in lp] == [t for t, _ in ref_lp]
        np.testing.assert_allclose([p for _, p in lp], [p for _, p in ref_lp], atol=1e-4)
        assert body["choices"][0]["message"]["content"] == ref_body["choices"][0]["message"]["content"]
    restored = [body["usage"] for body, _ in results["small"]]
    assert [u["session_restored"] for u in restored] == [True, True, True]  # each was saved by the next one
    assert all(u["prompt_tokens_fed"] < u["prompt_tokens"] for u in restored)


def test_sigterm_saves_the_live_sessions_and_a_restart_continues_them(tiny_gguf, tmp_path):
    args = [*TINY, "--session-dir", str(tmp_path)]
    messages = [{"role": "user", "content": "remember this conversation"}]
    server = Server(tiny_gguf, *args)
    status, _, body = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})
    assert status == 200
    assert server.stop(signal.SIGTERM) == 0
    assert any("saved 1 live conversation" in line for line in server.lines), server.lines
    assert (tmp_path / f"{body['session_id']}.amss").exists()

    messages += [
        {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
        {"role": "user", "content": "go on"},
    ]
    with Server(tiny_gguf, *args) as again:
        status, _, body2 = again.post("/v1/chat/completions", {"messages": messages, "max_tokens": 5})
        assert status == 200
        assert body2["session_id"] == body["session_id"] and body2["usage"]["session_restored"]
        assert body2["usage"]["prompt_tokens_fed"] < body2["usage"]["prompt_tokens"]


# --- disconnects, load, errors --------------------------------------------------------------------


def _stream_and_drop(server: Server, body: dict, n_chunks: int = 3) -> str:
    """Open a streaming request, read ``n_chunks`` events, hang up; returns the session id."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            sid = r.headers["x-session-id"]
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= n_chunks:
                        break
    return sid


def _wait_idle(server: Server, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = server.get("/health")[2]
        if not h["running"] and h["waiting"] == 0:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"the server is still busy after {timeout} s: {h}")


ENDLESS = {"max_tokens": 60000, "ignore_eos": True, "temperature": 0}


def test_a_client_that_disconnects_mid_stream_frees_its_session(tiny_gguf):
    with Server(tiny_gguf, *TINY) as server:
        sid = _stream_and_drop(server, {"messages": [{"role": "user", "content": "talk forever"}], **ENDLESS})
        _wait_idle(server)
        row = next(r for r in server.get("/amslocal/sessions")[2]["data"] if r["id"] == sid)
        assert not row["busy"] and row["messages"] == 2  # the message and the cut reply
        # the same session serves its next request at once
        status, _, body = server.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "again"}], "session_id": sid, "max_tokens": 4},
            timeout=30,
        )
        assert status == 200 and body["session_id"] == sid


def _error(resp: tuple[int, dict, object], status: int, code: str | None = None) -> dict:
    got, _, body = resp
    assert got == status, body
    assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def _announce_body(server: Server, length: int) -> tuple[int, dict, object]:
    """A request whose headers announce a body of ``length`` bytes; the answer, before sending it."""
    import http.client

    host, port = server.base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    r = conn.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read()))
    conn.close()
    return out


def test_bad_requests_get_openai_error_bodies(tiny_gguf):
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with Server(tiny_gguf, *TINY, "--max-body", "1") as s:
        _error(s.post("/v1/chat/completions", b"{not json"), 400)
        _error(s.post("/v1/chat/completions", b"[1, 2]"), 400)
        _error(s.post("/v1/chat/completions", {**ok, "model": "gpt-17"}), 404, "model_not_found")
        _error(s.post("/v1/chat/completions", {"messages": []}), 400)
        _error(s.post("/v1/chat/completions", {**ok, "temperature": "hot"}), 400)
        _error(s.post("/v1/chat/completions", {**ok, "n": 2}), 400)
        _error(s.post("/v1/chat/completions", {**ok, "kv_budget": 0}), 400)
        _error(s.post("/v1/chat/completions", {**ok, "kv_budget": 2}), 400)  # too small for sinks + recent
        _error(s.post("/v1/chat/completions", {**ok, "scorer": "nope"}), 400)
        _error(s.post("/v1/chat/completions", {**ok, "session_id": "../../etc/passwd"}), 400)
        _error(s.post("/v1/completions", {"prompt": 5}), 400)
        _error(s.get("/v1/nothing"), 404)
        _error(_announce_body(s, 2 << 20), 413, "request_too_large")  # refused before it is read
        with httpx.Client(timeout=60) as http:  # no length announced: cut off once past the limit
            chunks = (b"x" * 65536 for _ in range(40))
            r = http.post(s.base + "/v1/chat/completions", content=chunks)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert s.post("/v1/chat/completions", {**ok, "model": "tiny", "unknown_field": {"a": 1}})[0] == 200


def test_a_server_without_budget_refuses_what_does_not_fit(tiny_gguf):
    with Server(tiny_gguf, "--budget", "off", "-c", "256", "-t", "1", "--chat-template", "chatml") as s:
        long = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 2}
        err = _error(s.post("/v1/chat/completions", long), 400, "context_length_exceeded")
        assert "free of 256" in err["message"] and err["param"] == "messages"
        _error(
            s.post("/v1/chat/completions", {**long, "messages": [{"role": "user", "content": "hi"}], "kv_budget": 64}),
            400,
        )
        assert (
            s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200
        )
    assert any("full cache of 256" in line and "scorer" not in line for line in s.lines), s.lines


def test_api_key_guards_every_route_but_health(tiny_gguf):
    with Server(tiny_gguf, *TINY, "--api-key", "s3cret") as s:
        assert s.get("/health")[0] == 200
        _error(s.get("/v1/models"), 401, "invalid_api_key")
        _error(s.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        _error(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 401)
        assert s.get("/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            _client(s, "wrong").models.list()
        assert _client(s, "s3cret").models.list().data
        assert "access-control-allow-origin" not in s.get("/health", headers={"Origin": "http://x"})[1]  # no CORS


def test_cors_lets_a_named_origin_call_from_a_browser(tiny_gguf):
    with Server(tiny_gguf, *TINY, "--api-key", "k", "--cors-origin", "http://app.local") as s:
        pre = {"Origin": "http://app.local", "Access-Control-Request-Method": "POST"}
        pre["Access-Control-Request-Headers"] = "authorization,content-type"
        status, headers, _ = s.request("OPTIONS", "/v1/chat/completions", headers=pre)
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.local"
        status, headers, _ = s.get("/v1/models", headers={"Origin": "http://app.local", "Authorization": "Bearer k"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.local"
        status, headers, _ = s.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in headers


def test_a_full_queue_gets_503_with_retry_after(tiny_gguf):
    with Server(tiny_gguf, *TINY, "--max-queue", "1") as s:
        running = threading.Thread(
            target=_stream_and_drop,
            args=(s, {"messages": [{"role": "user", "content": "one"}], **ENDLESS}, 400),
            daemon=True,
        )
        running.start()
        while not s.get("/health")[2]["running"]:
            time.sleep(0.02)
        waiting = threading.Thread(
            target=s.post,
            args=("/v1/chat/completions", {"messages": [{"role": "user", "content": "two"}], "max_tokens": 2}),
            daemon=True,
        )
        waiting.start()
        while s.get("/health")[2]["waiting"] < 1:
            time.sleep(0.02)
        status, headers, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "three"}]})
        _error((status, headers, body), 503, "server_busy")
        assert int(headers["retry-after"]) >= 1
        running.join(60)
        waiting.join(60)
        _wait_idle(s)


# --- the pool on its own --------------------------------------------------------------------------


def test_pool_matches_the_longest_absorbed_prefix_and_keeps_kinds_apart(tiny_gguf, tmp_path):
    from amslocal.api import Engine
    from amslocal.server.pool import SessionPool, Settings

    with Engine(tiny_gguf, n_threads=1) as engine:

        def new(settings: Settings):
            return engine.session(budget=settings.budget or 128, interval=32, chat_template="chatml", max_tokens=3)

        pool = SessionPool(new, max_live=2, session_dir=tmp_path)
        u1 = [{"role": "user", "content": "a"}]
        a = pool.acquire("chat", messages=u1)
        reply = a.chat.chat(u1, stream=False, max_tokens=3)
        pool.release(a)
        longer = u1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "b"}]
        assert pool.acquire("chat", messages=longer).id == a.id  # continues a
        pool.release(a)
        assert pool.acquire("chat", messages=[{"role": "user", "content": "other"}]).id != a.id
        raw = pool.acquire("raw", text="a")
        assert raw.id != a.id and raw.kind == "raw"
        pool.release(raw)
        with pytest.raises(Exception, match="session_id"):
            pool.acquire("chat", messages=u1, session_id="../x")
        assert pool.live <= 2 and pool.saves >= 1
        with pytest.raises(Exception, match="busy"):
            pool.acquire("chat", messages=u1, session_id=[c for c in pool._table if pool._table[c].busy][0])
        pool.close()

        # at most max_saved conversations stay on disk; the oldest beyond it is forgotten
        small = SessionPool(new, max_live=1, max_saved=1, session_dir=tmp_path / "small")
        ids = []
        for text in ("first", "second", "third"):
            msgs = [{"role": "user", "content": text}]
            conv = small.acquire("chat", messages=msgs)
            conv.chat.chat(msgs, stream=False, max_tokens=2)
            small.release(conv)
            ids.append(conv.id)
        assert small.forgotten == 1 and [p.stem for p in (tmp_path / "small").glob("*.amss")] == [ids[1]]
        again = small.acquire("chat", messages=[{"role": "user", "content": "first"}, {"role": "user", "content": "x"}])
        assert again.id not in ids  # forgotten: a new session
        small.release(again)
        small.close()


def test_serve_refuses_bad_options_in_one_line(tiny_gguf, tmp_path):
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    for args, want in (
        (["--budget", "0"], "budget"),
        (["--session-dir", str(tmp_path / "file")], "not a directory"),
        (["--port", "99999"], "port"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "amslocal", "serve", str(tiny_gguf), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with Server(tiny_gguf, *TINY) as s:
        port = s.base.rsplit(":", 1)[1]
        r = subprocess.run(
            [sys.executable, "-m", "amslocal", "serve", str(tiny_gguf), "--port", port],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and "cannot listen" in r.stderr, r.stderr
