"""Question-aware prefill: a prompt's last tokens observe every compression before they are read,
then leave no trace in the cache, the token map or the memory bound."""

from __future__ import annotations

import pytest

from amslocal.backend import ContextParams
from amslocal.session import CompressionConfig, Session

BUDGET, INTERVAL = 64, 32
TEXT = (
    "The grass is green. The sky is blue. " * 30
    + "The pass key is 48213. "
    + "Here we go. " * 20
    + "What is the pass key?"
)


def _prefill(model, question_aware: bool, scorer: str = "expected-attention"):
    s = Session(
        model,
        CompressionConfig(budget=BUDGET, interval=INTERVAL, scorer=scorer, question_aware=question_aware),
        ContextParams(n_threads=2),
    )
    events, peak = [], [0]
    s.on_compress = lambda pos, kept, inp: events.append((pos.copy(), inp.query_positions.copy()))
    collect = s.view.collect

    def counting_collect(*a, **k):  # cells in use after every decode, as llama.cpp reports them
        peak[0] = max(peak[0], s.view.n_occupied(0))
        return collect(*a, **k)

    s.view.collect = counting_collect
    tokens = model.tokenize(TEXT)
    s.prefill(tokens)
    return s, tokens, events, peak[0]


@pytest.mark.parametrize("question_aware", [False, True])
def test_observers_leave_no_trace_and_memory_stays_bounded(smollm2_model, question_aware):
    s, tokens, events, peak = _prefill(smollm2_model, question_aware)
    cells, positions = s.view.occupied(0)
    assert len(events) >= 10
    assert peak <= BUDGET + INTERVAL and s.stats.kv_cells_peak <= BUDGET + INTERVAL
    # the cache holds only the prompt's own tokens, at their own positions, and the map agrees
    assert sorted(s.gen.tokens_at) == positions.tolist()
    assert positions.max() == len(tokens) - 1 and s.gen.next_pos == len(tokens)
    assert all(s.gen.tokens_at[p] == tokens[p] for p in positions.tolist())
    assert s.stats.prompt_tokens == len(tokens)


def test_observers_are_the_evidence_of_prompt_events(smollm2_model):
    """With observers, the queries an event scores by sit past every candidate (they are the
    prompt's last tokens, decoded ahead); without, they are the newest candidates themselves."""
    _, tokens, with_obs, _ = _prefill(smollm2_model, True)
    _, _, without, _ = _prefill(smollm2_model, False)
    assert len(with_obs) > len(without) >= 10  # observers take cells: events come more often
    for pos, qpos in with_obs:  # the newest 16 (interval // 2) queries are the observers'
        assert (qpos[-16:] > pos.max()).all() and (qpos[:-16] <= pos.max()).all()
    for pos, qpos in without:
        assert qpos.max() == pos.max()


@pytest.mark.parametrize("ams", [False, True])
def test_observers_that_do_not_all_fit_still_end_the_window(smollm2_model, ams):
    """A prompt arriving when the cache holds more than capacity - observers (a reply ended
    there): the event takes as many observers as fit, so its last query is observed. Before, it
    compressed on the unobserved cache and TOVA had no last query to score by."""
    s = Session(
        smollm2_model, CompressionConfig(budget=64, interval=128, scorer="tova", ams=ams), ContextParams(n_threads=2)
    )
    tokens = smollm2_model.tokenize(TEXT)
    s.prefill(tokens[: 192 - 40], observers=())  # 40 cells free, outside every window
    seen = []
    s.on_compress = lambda pos, kept, inp: seen.append((pos.max(), inp.attn_last is not None))
    s.prefill(tokens[192 - 40 :])  # wants 64 observers; 40 fit
    assert seen and seen[0] == (192 - 40 - 1, True)
    assert sorted(s.gen.tokens_at) == s.view.occupied(0)[1].tolist() and s.gen.next_pos == len(tokens)


@pytest.mark.parametrize("scorer", ["tova", "snapkv"])
def test_second_message_on_a_part_full_cache_is_observed(smollm2_model, scorer):
    """A reply can end anywhere below the capacity; the next message's first event then has room
    for fewer observers than it wants. It takes as many as fit, so the last query before the
    event is still observed (TOVA scores by it alone)."""
    from amslocal.chat import ChatSession

    cfg = CompressionConfig(budget=BUDGET, interval=INTERVAL, scorer=scorer)
    chat = ChatSession(smollm2_model, cfg, ContextParams(n_threads=2), template="chatml", max_tokens=12)
    s = chat.session
    for message in ("Say hello.", TEXT[:300], TEXT[:400]):
        "".join(chat.chat(message))
        assert sorted(s.gen.tokens_at) == s.view.occupied(0)[1].tolist()
        assert s.n_occupied <= BUDGET + INTERVAL
    assert s.stats.compressions >= 3


def test_chat_message_is_question_aware_and_leaves_no_observer(smollm2_model):
    from amslocal.chat import ChatSession

    cfg = CompressionConfig(budget=BUDGET, interval=INTERVAL, scorer="tova")
    chat = ChatSession(smollm2_model, cfg, ContextParams(n_threads=2), template="chatml", max_tokens=4)
    seen = []
    chat.session.on_compress = lambda pos, kept, inp: seen.append(pos.max())
    reply = "".join(chat.chat(TEXT))
    s = chat.session
    cells, positions = s.view.occupied(0)
    assert s.stats.compressions >= 5 and len(seen) == s.stats.compressions
    assert sorted(s.gen.tokens_at) == positions.tolist() and s.n_occupied <= BUDGET + INTERVAL
    assert positions.max() == s.gen.next_pos - 1
    assert isinstance(reply, str)
    # events took more than the bare count: the message's last tokens observed each prompt event
    plain = ChatSession(
        smollm2_model,
        CompressionConfig(budget=BUDGET, interval=INTERVAL, scorer="tova", question_aware=False),
        ContextParams(n_threads=2),
        template="chatml",
        max_tokens=4,
    )
    "".join(plain.chat(TEXT))
    assert s.stats.compressions > plain.session.stats.compressions
