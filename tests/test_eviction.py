"""Eviction with seq_rm, compaction with seq_add: the cache view and the decode loop stay consistent."""

from __future__ import annotations

import numpy as np
import pytest
from reference import TinyWeights
from tiny_gguf import write_tiny_llama_gguf

from amslocal.backend import ContextParams, Model, SamplerParams
from amslocal.engine import Generator, compaction_shifts, position_runs

TEXT = "Evict a few scattered tokens from the middle of this sentence and keep generating text."


def assert_consistent(g: Generator) -> None:
    """The engine's token map, the cell map and next_pos agree."""
    cells, pos = g.view.occupied()
    assert sorted(g.tokens_at) == list(pos)
    assert g.next_pos == pos.max() + 1
    assert len(set(cells)) == len(cells)


def test_position_helpers():
    assert position_runs([7, 3, 4, 5, 9, 4]) == [(3, 6), (7, 8), (9, 10)]
    assert compaction_shifts([0, 1, 4, 5, 9]) == [(4, 6, -2), (9, 10, -5)]
    assert compaction_shifts([0, 1, 2]) == []


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_scattered_eviction_keeps_map_evidence_and_loop_consistent(request, which):
    model = request.getfixturevalue("tiny_model" if which == "tiny" else "smollm2_model")
    g = Generator(model, ContextParams(n_ctx=256, flash_attn="auto"), SamplerParams(temp=0))
    g.view.observe(1, attn=True)
    tokens = model.tokenize(TEXT)
    g.eval(tokens)
    for tok in list(g.generate([], 5, ignore_eos=True)):
        pass
    end = g.next_pos
    victims = [p for p in range(4, end - 4) if p % 3 == 0]
    freed = {int(c) for c, p in zip(*g.view.occupied()) if p in victims}
    runs = g.evict(victims)
    assert runs == len(victims)  # no two victims adjacent
    assert_consistent(g)
    assert not set(victims) & set(g.view.cell_pos()[g.view.cell_pos() >= 0].tolist())
    assert g.next_pos == end  # holes do not move the end

    # keep decoding: the loop starts at pos_max + 1 and new tokens may reuse freed cells
    reused = set()
    expected = {il: g.view.evidence[il].copy() for il in g.view.kv_layers}
    before = g.view.cell_pos()
    out = []
    for _ in range(len(victims) + 3):
        tok = g.sample()
        out.append(tok)
        g.eval([tok])
        after = g.view.cell_pos()
        changed = np.flatnonzero(after != before)
        reused |= set(changed.tolist()) & freed
        for il in g.view.kv_layers:
            expected[il][:, changed] = 0.0
            a = g.view.last_attn(il)
            expected[il][:, : a.shape[1]] += a
        before = after
        assert_consistent(g)
    assert reused, "llama.cpp did not reuse any freed cell"
    for il in g.view.kv_layers:
        np.testing.assert_allclose(g.view.evidence[il], expected[il], rtol=1e-6, atol=1e-9)
    assert len(out) == len(victims) + 3 and g.next_pos == end + len(out)


def test_compaction_matches_fresh_prefill(tmp_path):
    """With one layer, K/V depend only on token and position: after compaction the cache must
    hold exactly what a fresh prefill of the kept tokens at the dense positions stores."""
    path = write_tiny_llama_gguf(tmp_path / "one_layer.gguf", n_layer=1, head_dim=64, seed=2)
    model = Model(path)
    params = ContextParams(n_ctx=256, flash_attn="on")
    g = Generator(model, params, SamplerParams(temp=0))
    g.eval(model.tokenize(TEXT))
    victims = [p for p in range(3, g.next_pos - 3) if p % 4 in (1, 2)]
    g.evict(victims)
    pos, kept = g.kept_tokens()
    assert g.compact() > 0
    assert g.kept_tokens() == (list(range(len(kept))), kept)
    assert g.view.cell_pos().max() == len(kept) - 1  # positions in the cell map are dense already

    # K reads apply the pending shift: layer 0 keys now sit at the dense positions
    cells, cpos = g.view.occupied()
    want_k, _ = TinyWeights(path).layer0_kv(kept, cpos)
    np.testing.assert_allclose(g.view.read_k(0, cells), want_k, atol=3e-3 * np.abs(want_k).max(), rtol=0)

    probe = model.tokenize(" next", add_special=False)
    g.eval(probe)
    fresh = Generator(model, params, SamplerParams(temp=0))
    fresh.eval(kept + probe)
    a, b = g.ctx.logits(), fresh.ctx.logits()
    pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
    pa, pb = pa / pa.sum(), pb / pb.sum()
    assert np.abs(pa - pb).sum() < 1e-2
    assert a.argmax() == b.argmax()

    # without compaction the positions would differ, and so would the distribution
    h = Generator(model, params, SamplerParams(temp=0))
    h.eval(model.tokenize(TEXT))
    h.evict(victims)
    h.eval(probe)
    c = h.ctx.logits()
    pc = np.exp(c - c.max())
    assert np.abs(pc / pc.sum() - pb).sum() > 1e-3


def test_generation_continues_after_compaction(smollm2_model):
    g = Generator(smollm2_model, ContextParams(n_ctx=256), SamplerParams(temp=0))
    g.eval(smollm2_model.tokenize(TEXT))
    g.evict(range(5, 15))
    g.compact()
    out = list(g.generate([], 10, ignore_eos=True))
    assert len(out) == 10
    assert_consistent(g)


def test_compaction_keeps_accumulated_evidence(tiny_model):
    """seq_add moves positions, not tokens: the tokens' accumulated evidence must survive it."""
    g = Generator(tiny_model, ContextParams(n_ctx=256), SamplerParams(temp=0))
    g.view.observe(1, attn=True)
    g.eval(tiny_model.tokenize(TEXT))
    for _ in range(4):
        g.eval([g.sample()])
    g.evict(range(5, 25))
    cells, _ = g.view.occupied()
    before = {il: g.view.evidence_total[il][:, cells].copy() for il in g.view.kv_layers}
    assert all(b.sum() > 0 for b in before.values())
    g.compact()
    g.eval([g.sample()])  # the next collect sees the shifted positions
    for il in g.view.kv_layers:
        added = g.view.last_attn(il)[:, cells]
        np.testing.assert_allclose(g.view.evidence_total[il][:, cells], before[il] + added, rtol=1e-6)
