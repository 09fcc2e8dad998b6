"""The Python API: sessions on one engine, cancellation, templates, protection, save files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEFAULT_MODEL

from amslocal.api import Engine
from amslocal.chat import ChatError, ChatTemplate, SaveFileError, SessionBusyError, TemplateError

SYSTEM = "You are a terse assistant who answers in one sentence."
TALK = [
    "Tell me about the moon and its phases.",
    "Now tell me about the sun.",
    "And about the planets?",
    "And the stars?",
]
SMALL = dict(budget=96, interval=32, ams=True, temperature=0, max_tokens=40)  # compresses within two turns


@pytest.fixture(scope="module")
def engine():
    if not DEFAULT_MODEL.exists():
        pytest.skip("default model missing; run: python models/fetch.py")
    with Engine(DEFAULT_MODEL, n_threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf):
    with Engine(tiny_gguf, n_threads=1) as e:
        yield e


def _logits_of(session) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    session.logits_hook = seen.append
    return seen


# --- isolation and threads -------------------------------------------------------------------


def test_two_sessions_do_not_interfere(engine):
    alone = engine.session(system=SYSTEM, **SMALL)
    expected = [alone.chat(q, stream=False) for q in TALK[:2]]
    assert alone.stats.compressions > 0 and all(expected)

    # interleaved token by token with a session chatting about something else
    a, b = engine.session(system=SYSTEM, **SMALL), engine.session(**SMALL)
    got = []
    for q in TALK[:2]:
        ia, ib = a.chat(q), b.chat("Write a poem about rain and thunder.")
        pieces: list[str] = []
        live = [ia, ib]
        while live:  # one piece from each in turn
            for it in list(live):
                try:
                    piece = next(it)
                except StopIteration:
                    live.remove(it)
                    continue
                if it is ia:
                    pieces.append(piece)
        got.append("".join(pieces))
    assert got == expected

    # and in two threads at once
    results: dict[int, list[str]] = {}

    def run(k: int) -> None:
        s = engine.session(system=SYSTEM, **SMALL)
        results[k] = [s.chat(q, stream=False) for q in TALK[:2]]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: expected, 1: expected}


def test_cancel_from_another_thread_is_prompt(engine):
    s = engine.session(**SMALL)
    pieces: list[str] = []
    first = threading.Event()

    def consume() -> None:
        for p in s.chat("Tell me a very long story.", max_tokens=1_000_000, ignore_eos=True):
            pieces.append(p)
            first.set()

    t = threading.Thread(target=consume)
    t.start()
    assert first.wait(30)
    time.sleep(0.2)
    t0 = time.monotonic()
    s.cancel()
    t.join(timeout=10)
    assert not t.is_alive() and time.monotonic() - t0 < 2, "cancel() must stop the reply within a token or two"
    assert s.last_turn.stop == "cancelled" and 0 < s.last_turn.reply_tokens < 1_000_000
    assert s.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert s.chat("Thanks. Say hello.", stream=False)  # the session goes on


def test_one_call_at_a_time(engine):
    s = engine.session(**SMALL)
    it = s.chat("Hello!")
    next(it)
    with pytest.raises(SessionBusyError):
        s.chat("Another message while the first reply streams")
    it.close()
    assert s.messages[-1]["role"] == "assistant"  # closing the iterator keeps what was generated


# --- compression keeps the conversation's structure ------------------------------------------


def test_system_prompt_and_template_survive_compression(engine):
    s = engine.session(system=SYSTEM, **SMALL)
    for q in TALK:
        assert s.chat(q, stream=False)
        assert s.cells_used <= 96 + 32
    assert s.stats.compressions >= 2
    kept, total = s.system_tokens_in_cache()
    assert total > 10 and kept == total
    # the first live tokens spell the system turn exactly
    _, toks = s.session.gen.kept_tokens()
    text = b"".join(engine.model.token_bytes(t, special=True) for t in toks[:total]).decode()
    assert text.startswith("<|im_start|>system\n" + SYSTEM + "<|im_end|>")
    # every live <|im_start|> of the conversation is protected or was released oldest first
    im_start = engine.model.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]
    pos, toks = s.session.gen.kept_tokens()
    live_starts = [p for p, t in zip(pos, toks) if t == im_start]
    assert len(live_starts) >= 4  # system, and the headers of recent turns


def test_template_scaffolding_is_protected_contents_are_not(engine):
    s = engine.session(system=SYSTEM, **SMALL)
    conv = s.messages + [{"role": "user", "content": "What is a comet?"}]
    plan = s._prepare(conv)
    model = engine.model
    content = b"".join(model.token_bytes(t, special=True) for t, f in zip(plan.tokens, plan.flags) if f == 0)
    system = b"".join(model.token_bytes(t, special=True) for t, f in zip(plan.tokens, plan.flags) if f == 2)
    scaffold = b"".join(model.token_bytes(t, special=True) for t, f in zip(plan.tokens, plan.flags) if f == 1)
    assert content.decode() == "What is a comet?"
    assert system.decode() == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert scaffold.decode() == "<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_is_not_prefix_stable_reads_everything_again(engine):
    # the header counts the messages, so every turn changes the start of the text
    tpl = (
        "<|im_start|>system\n{{ messages|length }} messages<|im_end|>\n"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    s = engine.session(chat_template=tpl, **SMALL)
    assert s.chat(TALK[0], stream=False)
    assert s.refeeds == 0
    assert s.chat(TALK[1], stream=False)
    assert s.refeeds == 1 and s.last_turn.refed
    assert s.cells_used <= 128


def test_templates_render_in_a_sandbox(engine):
    t = ChatTemplate("{{ strftime_now('%Y') }}|{{ bos_token }}|{{ messages[0].content|tojson }}")
    assert t.render([{"role": "user", "content": "é"}]).split("|")[2] == '"é"'
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])
    with pytest.raises(TemplateError):  # the sandbox refuses attribute tricks
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% if %}")


def test_chat_and_raw_generation_do_not_mix(engine):
    s = engine.session(**SMALL)
    text = s.generate("Once upon a time", max_tokens=8, stream=False)
    assert text and s.last_turn.reply_tokens <= 8
    more = s.generate(" And then", max_tokens=8, stream=False)  # continues the same text
    assert more
    with pytest.raises(ChatError, match="raw text"):
        s.chat("hi")
    s.clear()
    assert s.chat("hi", stream=False) is not None


FACT = "Remember this: my locker code is 7341 and my name is Ada."


def _first_message_kept(engine, s) -> bool:
    """Whether the live cache still holds every token of FACT, in order, right after the system turn."""
    fact = engine.model.tokenize(FACT, add_special=False, parse_special=False)
    _, toks = s.session.gen.kept_tokens()
    return any(toks[i : i + len(fact)] == fact for i in range(len(toks) - len(fact) + 1))


def test_keep_protects_the_first_message_like_llama_keep(engine, tmp_path):
    """--keep -1: the conversation's start through its whole first message survives compression;
    without it the same conversation loses it; the setting survives a save and a load."""
    plain = engine.session(system=SYSTEM, **SMALL)
    kept = engine.session(system=SYSTEM, keep=-1, **SMALL)
    for s in (plain, kept):
        s.chat(FACT + " " + TALK[0], stream=False)
        for q in TALK[1:]:
            s.chat(q, stream=False)
            assert s.cells_used <= 96 + 32
        assert s.stats.compressions >= 3
    assert _first_message_kept(engine, kept) and not _first_message_kept(engine, plain)
    # one protected prefix: system turn, the first message's header and its content
    k, total = kept.system_tokens_in_cache()
    assert k == total and total > len(engine.model.tokenize(SYSTEM + FACT, add_special=False))
    kept.save(tmp_path / "k.ams")
    again = engine.session(**SMALL)
    again.load(tmp_path / "k.ams")
    assert again.keep == -1
    again.clear()  # a new conversation: its first message is kept again
    again.chat(FACT + " " + TALK[0], stream=False)
    for q in TALK[1:]:
        again.chat(q, stream=False)
    assert _first_message_kept(engine, again)


def test_keep_that_does_not_fit_the_budget_is_refused_in_one_line(engine):
    from amslocal.errors import BudgetError

    s = engine.session(keep=-1, **SMALL)
    with pytest.raises(BudgetError, match=r"--keep -1 \(with the system prompt\) keeps \d+ prompt tokens"):
        s.chat(" ".join(TALK * 6), stream=False)
    with pytest.raises(ValueError, match="keep must be"):
        engine.session(keep=-2, **SMALL)


def test_budget_and_scorer_change_on_a_live_session(engine):
    s = engine.session(system=SYSTEM, **SMALL)
    s.chat(TALK[0], stream=False)
    s.set_budget(300)  # 300 + 32 cells do not fit the 256-cell context: a larger one, same cache
    assert s.session.gen.ctx.n_ctx >= 332 and s.config.budget == 300
    s.set_scorer("keydiff")
    s.chat(TALK[1], stream=False)
    s.set_budget(64)  # the next message starts by cutting the cache to 64
    s.chat(TALK[2], stream=False)
    assert s.cells_used <= 64 + 32 and s.config.scorer == "keydiff"
    assert s.system_tokens_in_cache()[0] == s.system_tokens_in_cache()[1]
    with pytest.raises(Exception, match="too small"):
        s.set_budget(10)
    with pytest.raises(ChatError, match="unknown scorer"):
        s.set_scorer("nope")


# --- save and load ---------------------------------------------------------------------------


def test_save_then_load_continues_exactly(engine, tmp_path: Path):
    path = tmp_path / "s.ams"
    a = engine.session(system=SYSTEM, **SMALL)
    for q in TALK[:2]:
        a.chat(q, stream=False)
    assert a.stats.compressions > 0
    a.save(path)
    b = engine.session(budget=512, temperature=0.9)  # other settings: the file's come back
    b.load(path)
    assert b.messages == a.messages and b.config.budget == 96 and b.stats.compressions == a.stats.compressions
    la, lb = _logits_of(a), _logits_of(b)
    ra, rb = a.chat(TALK[2], stream=False), b.chat(TALK[2], stream=False)
    assert np.array_equal(la[0], lb[0]) and ra == rb
    assert a.session.gen.tokens_at == b.session.gen.tokens_at


def test_with_a_seed_sampled_replies_match_after_load(engine, tmp_path: Path):
    a = engine.session(budget=96, interval=32, temperature=0.9, seed=7, max_tokens=30)
    for q in TALK[:2]:
        a.chat(q, stream=False)
    a.save(tmp_path / "s.ams")
    b = engine.session(**SMALL)
    b.load(tmp_path / "s.ams")
    assert a.chat(TALK[2], stream=False) == b.chat(TALK[2], stream=False)


def _controller_state(s) -> dict:
    """Everything the controller decides with, keyed by position (cells differ after a load)."""
    ses = s.session
    view = ses.view
    cells, pos = view.occupied(0)
    state = {
        "tokens": sorted(ses.gen.tokens_at.items()),
        "protected": sorted(ses.protected_positions),
        "n_queries": view.n_queries,
        "queries": [None if q is None else q.tolist() for q in view.queries],
        "query_pos": view.query_pos.tolist(),
        "observing": (ses._observing, view.n_obs, view.obs_flags),
        "stats": ses.stats.as_dict(),
        "messages": s.messages,
    }
    # the selector's own state (AMS credit: one row, a row per (layer, KV head), or a row per row)
    state["selector"] = {k: v.tolist() for k, v in ses.selector.state_dict().items()}
    if ses.config.granularity != "token":  # which token every row of every cell holds
        state["rows"] = view.row_positions(ses.layers, cells).tolist()
    for il in ses.layers:
        state[f"evidence_{il}"] = view.evidence[il][:, cells].tolist()
        state[f"total_{il}"] = view.evidence_total[il][:, cells].tolist()
        state[f"k_{il}"] = view.read_k(il, cells).tolist()
        state[f"v_{il}"] = view.read_v(il, cells).tolist()
    return state


@pytest.mark.parametrize("scorer", ["tova", "expected-attention", "h2o"])  # attention, queries, every step
def test_load_restores_every_piece_of_controller_state(engine, tmp_path: Path, scorer: str):
    a = engine.session(system=SYSTEM, scorer=scorer, **SMALL)
    for q in TALK[:2]:
        a.chat(q, stream=False)
    list(a.chat("And the stars?", max_tokens=3))  # stop inside the observation window
    assert a.stats.compressions > 0 and a.session._observing and a.session.view.n_queries > 0
    assert a.cells_used < a.config.capacity  # so save does not compress first
    before = _controller_state(a)
    a.save(tmp_path / "s.ams")
    b = engine.session(**SMALL)
    b.load(tmp_path / "s.ams")
    assert b.config.scorer == scorer
    after = _controller_state(b)
    for key in before:
        assert before[key] == after[key], key


def test_damaged_and_foreign_files_are_refused(engine, tiny_engine, tmp_path: Path):
    good = tmp_path / "good.ams"
    s = engine.session(**SMALL)
    s.chat("Hello!", stream=False)
    s.save(good)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    cases = {
        "flipped.ams": (bytes(flipped), "damaged (checksum mismatch)"),
        "cut.ams": (data[: len(data) - 100], "damaged or truncated"),
        "header.ams": (data[:20], "damaged or truncated"),
        "other.ams": (b"GGUF" + data[4:], "not an amslocal session file"),
        "empty.ams": (b"", "not an amslocal session file"),
    }
    target = engine.session(**SMALL)
    target.chat("Keep me.", stream=False)
    before = target.messages
    for name, (blob, phrase) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(SaveFileError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
            target.load(tmp_path / name)
    with pytest.raises(SaveFileError, match="cannot read"):
        target.load(tmp_path / "missing.ams")
    # a file saved with another model
    foreign = tmp_path / "tiny.ams"
    t = tiny_engine.session(budget=256, interval=32, temperature=0, max_tokens=4)
    t.chat("hi", stream=False)
    t.save(foreign)
    with pytest.raises(SaveFileError, match="was saved with model tiny.gguf"):
        target.load(foreign)
    # none of that touched the session
    assert target.messages == before
    assert target.chat("Still here?", stream=False) is not None


def test_engine_close_closes_its_sessions(tiny_gguf):
    e = Engine(tiny_gguf, n_threads=1)
    s = e.session(budget=256, interval=32, temperature=0, max_tokens=4)
    s.chat("hi", stream=False)
    e.close()
    with pytest.raises(ChatError, match="closed"):
        s.chat("again")
