"""K/V reads return what a prefill stores: checked against layer 0 recomputed from the weights."""

from __future__ import annotations

import numpy as np
import pytest
from reference import TinyWeights

from amslocal.backend import ContextParams, SamplerParams
from amslocal.engine import Generator
from amslocal.errors import CacheError

TEXT = "Keys and values, read back from the cache, must match the weights."


@pytest.mark.parametrize(
    "fa,type_k,type_v,tol",
    [
        ("off", "f16", "f16", 2e-3),  # V stored transposed
        ("on", "f16", "f16", 2e-3),  # V stored by rows
        ("on", "q8_0", "q8_0", 2e-2),  # quantized and Hadamard-rotated (head size 64)
        ("on", "q4_0", "f16", 1.5e-1),
    ],
)
def test_layer0_kv_reads_match_weights(tiny_gguf, tiny_model, fa, type_k, type_v, tol):
    g = Generator(
        tiny_model, ContextParams(n_ctx=256, flash_attn=fa, type_k=type_k, type_v=type_v), SamplerParams(temp=0)
    )
    tokens = tiny_model.tokenize(TEXT)
    g.eval(tokens)
    cells, pos = g.view.occupied()
    assert list(pos) == list(range(len(tokens)))
    want_k, want_v = TinyWeights(tiny_gguf).layer0_kv(tokens, pos)
    got_k, got_v = g.view.read_k(0, cells), g.view.read_v(0, cells)
    scale_k, scale_v = np.abs(want_k).max(), np.abs(want_v).max()
    np.testing.assert_allclose(got_k, want_k, atol=tol * scale_k, rtol=0)
    np.testing.assert_allclose(got_v, want_v, atol=tol * scale_v, rtol=0)
    # a subset in arbitrary order reads the same rows
    pick = np.array([5, 0, 17, 3])
    np.testing.assert_array_equal(g.view.read_k(0, cells[pick]), got_k[pick])


@pytest.mark.parametrize(
    "fa,type_k,type_v",
    [("off", "f16", "f16"), ("on", "f16", "f16"), ("on", "q8_0", "q8_0"), ("on", "q4_0", "f16")],
)
def test_reads_through_the_backend_api_equal_the_in_place_ones(tiny_model, monkeypatch, fa, type_k, type_v):
    """A CPU cache is read in place; a GPU's through ggml_backend_tensor_get, one span per read
    (per dimension for transposed V). LLAMA_AMS_BACKEND_READS=1 sends the CPU's reads that way too:
    both paths must give the same floats, bit for bit, for every layout and type."""
    g = Generator(
        tiny_model, ContextParams(n_ctx=256, flash_attn=fa, type_k=type_k, type_v=type_v), SamplerParams(temp=0)
    )
    g.eval(tiny_model.tokenize(TEXT))
    cells, _ = g.view.occupied()
    pick = cells[np.array([5, 0, 17, 3, 9])]  # a span with holes, out of order
    reads = {}
    for backend_reads in ("0", "1"):
        monkeypatch.setenv("LLAMA_AMS_BACKEND_READS", backend_reads)
        reads[backend_reads] = []
        for il in g.view.kv_layers:
            for which in (cells, pick):
                g.view._read_memo.clear()  # read again, not from the event's memo
                reads[backend_reads] += [g.view.read_k(il, which), g.view.read_v(il, which)]
    for a, b in zip(reads["0"], reads["1"]):
        np.testing.assert_array_equal(a, b)


def test_q8_0_reads_agree_with_f16_on_a_real_model(smollm2_model):
    reads = {}
    for kv in ("f16", "q8_0"):
        g = Generator(
            smollm2_model, ContextParams(n_ctx=256, flash_attn="on", type_k=kv, type_v=kv), SamplerParams(temp=0)
        )
        g.eval(smollm2_model.tokenize(TEXT))
        cells, _ = g.view.occupied()
        reads[kv] = (g.view.read_k(0, cells), g.view.read_v(0, cells))
    for a, b in zip(reads["f16"], reads["q8_0"]):
        # without undoing the rotation the q8_0 rows would be unrelated to the f16 ones
        err = np.abs(a - b).max() / np.abs(a).max()
        assert err < 0.03, err


def test_bad_cells_are_refused(tiny_model):
    g = Generator(tiny_model, ContextParams(n_ctx=256), SamplerParams(temp=0))
    g.eval(tiny_model.tokenize(TEXT))
    with pytest.raises(CacheError, match="reading layer 0"):  # one AmsError line, not a RuntimeError
        g.view.read_k(0, np.array([10_000]))
