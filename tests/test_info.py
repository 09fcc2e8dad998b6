"""``amslocal info``: model facts from the GGUF header, and the model-level checks of bad input.

Numbers are checked three ways: against dimensions written into tiny GGUF files and computed by
hand here; against what the patched llama.cpp reports for the same file (layer facts, and the KV
bytes per token measured as the growth of llama.cpp's own sequence state by one token); and against
the default model when it is present. Architectures that llama.cpp cannot load from a bare header
(mamba, jamba, deepseek2 ...) are written header-only: ``model_info`` never needs the weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tiny_gguf import add_kv, tiny_vocab, write_header_gguf, write_not_gguf, write_tiny_llama_gguf, write_truncated_gguf

from amslocal.errors import AmsError, ModelError, UnsupportedModelError
from amslocal.info import KV_TYPES, format_info, kv_cache_bytes, model_info
from amslocal.models import (
    check_compressible,
    check_request,
    load_model,
    locate_model,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- writers --------------------------------------------------------------------------------------


def write_tiny_model(
    path: Path,
    arch: str,
    *,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    n_ff: int = 64,
    n_ctx_train: int = 2048,
    extra: dict[str, Any] | None = None,
    gemma_norms: bool = False,
    seed: int = 0,
) -> Path:
    """A loadable random-weight decoder (llama-like tensors; gemma3's extra norms with ``gemma_norms``)."""
    tokens, scores, types = tiny_vocab()
    n_embd = n_head * head_dim
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int = n_embd) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        "context_length": n_ctx_train,
        "embedding_length": n_embd,
        "block_count": n_layer,
        "feed_forward_length": n_ff,
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 10000.0,
        **(extra or {}),
    }.items():
        add_kv(w, f"{arch}.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(False)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), n_embd)).astype(np.float32))
    for i in range(n_layer):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", norm())
        w.add_tensor(f"{p}.attn_q.weight", mat(n_head * head_dim, n_embd))
        w.add_tensor(f"{p}.attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"{p}.attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"{p}.attn_output.weight", mat(n_embd, n_head * head_dim))
        w.add_tensor(f"{p}.ffn_norm.weight", norm())
        w.add_tensor(f"{p}.ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(f"{p}.ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(f"{p}.ffn_down.weight", mat(n_embd, n_ff))
        if gemma_norms:
            w.add_tensor(f"{p}.attn_q_norm.weight", norm(head_dim))
            w.add_tensor(f"{p}.attn_k_norm.weight", norm(head_dim))
            w.add_tensor(f"{p}.post_attention_norm.weight", norm())
            w.add_tensor(f"{p}.post_ffw_norm.weight", norm())
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", mat(len(tokens), n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- fixtures -----------------------------------------------------------------------------------

# the tiny llama of these tests: 3 layers, 6 query heads over 2 KV heads of 32, FFN 64, 2048 context
TINY = dict(n_layer=3, n_head=6, n_head_kv=2, head_dim=32, n_ff=64, n_ctx_train=2048, rope_theta=500000.0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("info") / "tiny.gguf", seed=3, **TINY)


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory) -> Path:
    # 7 layers, gemma3's default pattern 6: layers 0-4 and 6 slide over 64 tokens, layer 5 is full
    return write_tiny_model(
        tmp_path_factory.mktemp("info") / "gemma3.gguf",
        "gemma3",
        n_layer=7,
        n_head=4,
        n_head_kv=1,
        head_dim=32,
        extra={"attention.sliding_window": 64},
        gemma_norms=True,
    )


@pytest.fixture(scope="module")
def mamba_path(tmp_path_factory) -> Path:
    return write_header_gguf(
        tmp_path_factory.mktemp("info") / "mamba.gguf",
        "mamba",
        {
            "context_length": 1 << 20,
            "embedding_length": 64,
            "block_count": 2,
            "feed_forward_length": 0,
            "attention.head_count": 0,
            "attention.head_count_kv": 0,
            "attention.layer_norm_rms_epsilon": 1e-5,
            "ssm.conv_kernel": 4,
            "ssm.inner_size": 128,
            "ssm.state_size": 16,
            "ssm.time_step_rank": 4,
            "general.file_type": 0,
        },
    )


def _backend():
    try:
        import amslocal.backend as backend
    except AmsError as exc:
        pytest.skip(f"patched backend not available: {exc}")
    return backend


# --- the tiny llama: every number ---------------------------------------------------------------


def test_tiny_llama_facts(tiny_path: Path) -> None:
    info = model_info(tiny_path)
    L, H, Hkv, d, ff, V = 3, 6, 2, 32, 64, 354  # V: the tiny vocabulary's natural size
    E = H * d  # 192
    assert info["architecture"] == "llama"
    assert info["path"] == str(tiny_path)
    assert info["file_size"] == tiny_path.stat().st_size
    assert info["gguf_version"] == 3
    assert info["name"] == "amslocal-tiny-llama"
    assert (info["n_layer"], info["n_head"], info["n_head_kv"]) == (3, 6, 2)
    assert info["n_head_kv_per_layer"] is None
    assert (info["head_dim_k"], info["head_dim_v"], info["n_rot"]) == (32, 32, 32)
    assert (info["n_embd"], info["n_ff"], info["n_ctx_train"]) == (192, 64, 2048)
    assert info["rope_type"] == "norm" and info["rope_freq_base"] == 500000.0 and info["rope_scaling"] is None
    assert info["sliding_window"] is None and info["n_layer_swa"] == 0 and info["sliding_window_layers"] is None
    assert info["n_layer_kv"] == 3
    assert info["vocab_size"] == V
    assert info["chat_template"] is False and info["chat_template_chars"] == 0
    assert info["file_type"] == "F32" and info["tensor_types"] == {"F32": 3 + 9 * L}  # embeddings, output norm, head
    # parameters: embeddings + per layer (2 norms, q, k, v, o, gate, up, down) + output norm + head
    per_layer = 2 * E + E * E + 2 * (Hkv * d * E) + E * E + 3 * ff * E
    assert info["n_params"] == V * E + L * per_layer + E + V * E == 542784
    # KV bytes per token: 3 layers x (K row + V row) of 2 heads x 32 values
    #   f32: 4 B each; f16: 2 B; q8_0: 34 B per 32 values; q4_0: 18 B per 32
    assert info["kv_bytes_per_token"] == {
        "f32": 3 * 2 * (2 * 32 * 4),  # 1536
        "f16": 3 * 2 * (2 * 32 * 2),  # 768
        "q8_0": 3 * 2 * (2 * 34),  # 408
        "q4_0": 3 * 2 * (2 * 18),  # 216
    }
    assert info["kv_bytes_per_token"] == {"f32": 1536, "f16": 768, "q8_0": 408, "q4_0": 216}
    assert info["kv_bytes_per_token_full"] == info["kv_bytes_per_token"]
    assert info["kv_bytes_per_token_swa"] == dict.fromkeys(KV_TYPES, 0)
    assert kv_cache_bytes(info, 1000) == 768 * 1000
    assert kv_cache_bytes(info, 1000, "q8_0", "f16") == (204 + 384) * 1000  # K at q8_0, V at f16
    assert info["compression"] == {
        "supported": True,
        "positions": ["keep", "compact"],
        "reason": "every one of the 3 attention layers keeps a per-token KV cache",
    }
    json.loads(json.dumps(info))  # JSON-serialisable, for `amslocal info --json`


def test_tiny_llama_text(tiny_path: Path) -> None:
    text = format_info(model_info(tiny_path))
    lines = text.splitlines()
    assert lines[0].startswith("model ") and "tiny.gguf" in lines[0]
    expect = {
        "architecture": "llama",
        "layers": "3",
        "heads": "6 query, 2 KV (GQA, 3 query heads per KV head)",
        "head dims": "key 32, value 32, rotary 32",
        "context": "2048 tokens (trained)",
        "rope": "norm, base 500000",
        "sliding window": "none",
        "vocabulary": "354 tokens",
        "chat template": "no",
        "parameters": "542.8K",
    }
    for label, value in expect.items():
        line = next(ln for ln in lines if ln.startswith(label + " "))
        assert line[len(label) :].strip() == value, line
    assert any(ln.split()[:2] == ["f16", "768"] for ln in lines), text
    assert any(ln.split()[:2] == ["q8_0", "408"] for ln in lines), text
    assert any(ln.split()[:2] == ["q4_0", "216"] for ln in lines), text
    assert lines[-1].startswith("compression") and "supported: every one of the 3" in lines[-1]
    # aligned: every top-level value starts in the same column
    starts = {m.start(2) for ln in lines if not ln.startswith(" ") and (m := re.match(r"^(\S.*?)\s{2,}(\S)", ln))}
    assert len(starts) == 1, text


def test_head_size_not_a_multiple_of_the_block(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "d24.gguf", n_layer=2, n_head=2, n_head_kv=2, head_dim=24)
    info = model_info(path)
    assert info["kv_bytes_per_token"] == {
        "f32": 2 * 2 * 2 * 24 * 4,
        "f16": 2 * 2 * 2 * 24 * 2,
        "q8_0": None,
        "q4_0": None,
    }
    assert kv_cache_bytes(info, 10, "q8_0") is None
    assert "n/a" in format_info(info)


# --- agreement with llama.cpp -------------------------------------------------------------------


def _state_growth(path: Path, type_k: str, type_v: str) -> int:
    """Bytes by which llama.cpp's saved state of sequence 0 grows when one token is added."""
    backend = _backend()
    from llama_cpp import llama_cpp as llama

    from amslocal.engine import Generator

    model = backend.Model(path)
    gen = Generator(
        model, backend.ContextParams(n_ctx=256, n_batch=64, n_ubatch=64, type_k=type_k, type_v=type_v, flash_attn="on")
    )
    gen.eval(list(range(40, 50)))
    before = llama.llama_state_seq_get_size(gen.ctx.ptr, 0)
    gen.eval([60])
    after = llama.llama_state_seq_get_size(gen.ctx.ptr, 0)
    n_caches = gen.view.n_caches
    del gen, model
    return after - before - 12 * n_caches  # each cache also writes pos, n_seq_id, seq_id per cell


@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_kv_bytes_match_llama_cpp(tiny_path: Path, kv_type: str) -> None:
    assert _state_growth(tiny_path, kv_type, kv_type) == model_info(tiny_path)["kv_bytes_per_token"][kv_type]


def test_layer_facts_match_llama_cpp(tiny_path: Path, gemma3_path: Path) -> None:
    backend = _backend()
    from amslocal.engine import Generator

    for path in (tiny_path, gemma3_path):
        info = model_info(path)
        model = backend.Model(path)
        assert (model.n_layer, model.n_ctx_train, model.n_vocab) == (
            info["n_layer"],
            info["n_ctx_train"],
            info["vocab_size"],
        )
        view = Generator(model, backend.ContextParams(n_ctx=256)).view
        swa = set(info["sliding_window_layers"] or [])
        rope = {"norm": 0, "neox": 2}[info["rope_type"]]
        for il, li in enumerate(view.layers):
            assert li.cache == (1 if il in swa else 0), (path.name, il)
            assert (li.n_head, li.n_head_kv) == (info["n_head"], info["n_head_kv"])
            assert (li.n_embd_head_k, li.n_embd_head_v, li.n_rot) == (
                info["head_dim_k"],
                info["head_dim_v"],
                info["n_rot"],
            )
            assert li.rope_type == rope
            if il in swa:
                assert li.n_swa == info["sliding_window"]
        assert view.n_caches == (2 if swa else 1)


def test_head_size_check_matches_llama_cpp(tmp_path: Path) -> None:
    backend = _backend()
    path = write_tiny_llama_gguf(tmp_path / "d24.gguf", n_layer=2, n_head=2, n_head_kv=2, head_dim=24)
    assert model_info(path)["kv_bytes_per_token"]["q8_0"] is None
    model = backend.Model(path)
    with pytest.raises(ModelError, match="could not create a context"):
        backend.Context(model, backend.ContextParams(n_ctx=256, type_k="q8_0", type_v="f16", flash_attn="on"))


# --- interleaved sliding-window attention --------------------------------------------------------


def test_gemma3_iswa(gemma3_path: Path) -> None:
    info = model_info(gemma3_path)
    assert info["architecture"] == "gemma3" and info["rope_type"] == "neox"
    assert info["sliding_window"] == 64 and info["sliding_window_kind"] == "swa"
    assert info["sliding_window_layers"] == [0, 1, 2, 3, 4, 6]
    assert info["sliding_window_pattern"] == "5 sliding-window : 1 full, repeating"
    assert (info["n_layer_kv"], info["n_layer_swa"]) == (7, 6)
    # one KV head of 32 per layer: K+V = 64 values per layer and token
    assert info["kv_bytes_per_token"] == {"f32": 7 * 256, "f16": 7 * 128, "q8_0": 7 * 68, "q4_0": 7 * 36}
    assert info["kv_bytes_per_token_swa"] == {"f32": 6 * 256, "f16": 6 * 128, "q8_0": 6 * 68, "q4_0": 6 * 36}
    assert info["kv_bytes_per_token_full"] == {"f32": 256, "f16": 128, "q8_0": 68, "q4_0": 36}
    # the SWA cache stops at pad256(64 + n_ubatch) cells
    assert kv_cache_bytes(info, 100) == 7 * 128 * 100
    assert kv_cache_bytes(info, 10000, n_ubatch=512) == 128 * 10000 + 6 * 128 * 768
    comp = info["compression"]
    assert comp["supported"] and comp["positions"] == ["keep", "compact"]
    assert comp["reason"] == (
        "interleaved sliding-window attention: the 1 full-attention layer is scored and "
        "evicted; the 6 sliding-window layers forget by themselves (at most 64 tokens)"
    )
    text = format_info(info)
    assert "64 tokens (sliding window) on 6 of 7 layers" in text


def test_gemma3_kv_bytes_match_llama_cpp(gemma3_path: Path) -> None:
    # 11 tokens < the 64-token window: both caches hold every token
    assert _state_growth(gemma3_path, "f16", "f16") == model_info(gemma3_path)["kv_bytes_per_token"]["f16"]


@pytest.mark.parametrize(
    "arch, kv, swa_layers",
    [
        ("gemma3", {"attention.sliding_window_pattern": 3}, [0, 1, 3, 4, 6]),  # a period in the file
        ("gemma4", {"attention.sliding_window_pattern": [True, False, True, True, False, True, False]}, [0, 2, 3, 5]),
        ("gemma2", {}, [0, 2, 4, 6]),  # gemma2: every other layer, window 4096 by default
        ("cohere2", {}, [0, 1, 2, 4, 5, 6]),
        ("smallthinker", {}, [1, 2, 3, 5, 6]),  # dense first
        ("llama", {}, None),  # llama.cpp ignores a sliding_window key for llama
        ("gemma3", {"attention.sliding_window": 0}, None),  # gemma3 with no window: all full attention
    ],
)
def test_swa_patterns(tmp_path: Path, arch: str, kv: dict, swa_layers: list[int] | None) -> None:
    base = {
        "context_length": 8192,
        "embedding_length": 64,
        "block_count": 7,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.key_length": 32,
        "attention.value_length": 32,
    }
    if arch != "gemma2":
        base["attention.sliding_window"] = 512
    info = model_info(write_header_gguf(tmp_path / "m.gguf", arch, {**base, **kv}))
    assert info["sliding_window_layers"] == swa_layers
    if swa_layers:
        assert info["sliding_window"] == (4096 if arch in ("gemma2", "smallthinker") else 512)
        assert info["kv_bytes_per_token_swa"]["f16"] == len(swa_layers) * 128
        assert info["compression"]["supported"]
    else:
        assert info["n_layer_swa"] == 0 and info["sliding_window"] is None


def test_all_layers_sliding_is_refused(tmp_path: Path) -> None:
    path = write_header_gguf(
        tmp_path / "m.gguf",
        "gemma4",
        {
            "context_length": 8192,
            "embedding_length": 64,
            "block_count": 3,
            "attention.head_count": 2,
            "attention.head_count_kv": 1,
            "attention.sliding_window": 512,
            "attention.sliding_window_pattern": [True, True, True],
        },
    )
    comp = model_info(path)["compression"]
    assert not comp["supported"] and "every attention layer uses a sliding window of 512 tokens" in comp["reason"]


# --- architectures that cannot be compressed ----------------------------------------------------


def test_mamba_is_refused(mamba_path: Path) -> None:
    info = model_info(mamba_path)
    assert info["architecture"] == "mamba" and info["n_layer"] == 2 and info["n_layer_kv"] == 0
    assert info["kv_bytes_per_token"] == dict.fromkeys(KV_TYPES, 0)
    comp = info["compression"]
    assert comp["supported"] is False and comp["positions"] == []
    assert comp["reason"].startswith("recurrent state cannot be evicted per token: 'mamba' is a recurrent")
    text = format_info(info)
    assert "not supported: recurrent state cannot be evicted per token" in text
    assert "fixed-size recurrent state" in text
    with pytest.raises(
        UnsupportedModelError,
        match=r"^mamba.gguf cannot be compressed: recurrent state cannot be "
        r"evicted per token",
    ):
        check_compressible(mamba_path)
    # a budget asked of it: refused from the header, before llama.cpp sees the file
    with pytest.raises(UnsupportedModelError, match="recurrent state cannot be evicted per token"):
        load_model(mamba_path, compress=True)
    with pytest.raises(UnsupportedModelError, match="recurrent state cannot be evicted per token"):
        check_request(mamba_path, budget=256)
    assert check_request(mamba_path)["architecture"] == "mamba"  # no budget: nothing to compress, no error


@pytest.mark.parametrize(
    "arch, kv, phrase",
    [
        ("rwkv7", {}, "recurrent state cannot be evicted per token"),
        ("jamba", {"attention.head_count_kv": [0, 4]}, "'jamba' is a hybrid architecture"),
        ("granitehybrid", {}, "hybrid architecture"),
        ("lfm2", {}, "hybrid architecture"),
        ("qwen3next", {}, "hybrid architecture"),
        ("bert", {"attention.causal": False}, "non-causal (embedding/encoder) model"),
        ("qwen2", {"attention.causal": False}, "non-causal"),
        ("llada", {}, "diffusion model"),
        ("clip", {}, "multimodal projector"),
        ("t5", {}, "encoder-decoder"),
        ("frobnitz", {}, "architecture 'frobnitz' is unknown to the llama.cpp"),
        (
            "deepseek2",
            {
                "attention.kv_lora_rank": 512,
                "attention.key_length_mla": 192,
                "attention.value_length_mla": 128,
                "attention.key_length": 576,
                "attention.value_length": 512,
                "attention.head_count_kv": 1,
                "rope.dimension_count": 64,
            },
            "MLA (DeepSeek-style) latent cache",
        ),
    ],
)
def test_uncompressible_architectures(tmp_path: Path, arch: str, kv: dict, phrase: str) -> None:
    base = {
        "context_length": 4096,
        "embedding_length": 64,
        "block_count": 2,
        "attention.head_count": 4,
        "attention.head_count_kv": 4,
    }
    path = write_header_gguf(tmp_path / f"{arch}.gguf", arch, {**base, **kv})
    info = model_info(path)
    assert info["compression"]["supported"] is False
    assert phrase in info["compression"]["reason"]
    with pytest.raises(UnsupportedModelError, match="cannot be compressed") as exc:
        check_compressible(path)
    assert phrase in str(exc.value) and "\n" not in str(exc.value)


def test_mla_latent_cache_bytes(tmp_path: Path) -> None:
    # DeepSeek-V2-Lite-like: the latent cache holds kv_lora_rank + rope dims (512 + 64) per token and
    # layer in K, and no V
    path = write_header_gguf(
        tmp_path / "ds.gguf",
        "deepseek2",
        {
            "context_length": 163840,
            "embedding_length": 2048,
            "block_count": 27,
            "attention.head_count": 16,
            "attention.head_count_kv": 1,
            "attention.key_length": 576,
            "attention.value_length": 512,
            "attention.key_length_mla": 192,
            "attention.value_length_mla": 128,
            "attention.kv_lora_rank": 512,
            "rope.dimension_count": 64,
        },
    )
    info = model_info(path)
    assert info["mla_latent_cache"] and info["kv_lora_rank"] == 512
    assert info["kv_bytes_per_token"]["f16"] == 27 * 576 * 2
    assert info["kv_bytes_per_token"]["q8_0"] == 27 * 18 * 34
    assert "latent cache (K only)" in format_info(info)


def test_mla_weights_with_per_head_cache_are_supported(tmp_path: Path) -> None:
    # an older DeepSeek-V2 conversion (no key_length_mla): llama.cpp decompresses K/V per head
    path = write_header_gguf(
        tmp_path / "ds.gguf",
        "deepseek2",
        {
            "context_length": 4096,
            "embedding_length": 256,
            "block_count": 2,
            "attention.head_count": 4,
            "attention.head_count_kv": 4,
            "attention.key_length": 192,
            "attention.value_length": 128,
            "attention.kv_lora_rank": 512,
            "rope.dimension_count": 64,
        },
    )
    info = model_info(path)
    assert not info["mla_latent_cache"] and info["compression"]["supported"]
    assert info["kv_bytes_per_token"]["f16"] == 2 * 4 * (192 + 128) * 2


def test_mrope_keeps_positions(tmp_path: Path) -> None:
    path = write_header_gguf(
        tmp_path / "vl.gguf",
        "qwen2vl",
        {
            "context_length": 32768,
            "embedding_length": 128,
            "block_count": 2,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "rope.dimension_sections": [8, 12, 12, 0],
        },
    )
    info = model_info(path)
    assert info["rope_type"] == "mrope"
    comp = info["compression"]
    assert comp["supported"] and comp["positions"] == ["keep"]
    assert "positions cannot be shifted (M-RoPE): --positions keep only" in comp["reason"]
    check_compressible(path, positions="keep")
    with pytest.raises(UnsupportedModelError, match="--positions compact is not possible"):
        check_compressible(path, positions="compact")
    with pytest.raises(UnsupportedModelError, match="use --positions keep"):
        check_request(path, budget=256, positions="compact")
    # glm4 is M-RoPE only when the file has rope sections
    plain = write_header_gguf(tmp_path / "glm4.gguf", "glm4", {"block_count": 1, "attention.head_count": 2})
    assert model_info(plain)["rope_type"] == "norm"


def test_per_layer_kv_heads(tmp_path: Path) -> None:
    # a per-layer head_count_kv array (OpenELM-style), with a layer that has no KV at all
    path = write_header_gguf(
        tmp_path / "elm.gguf",
        "openelm",
        {
            "context_length": 2048,
            "embedding_length": 128,
            "block_count": 3,
            "attention.head_count": [4, 4, 4],
            "attention.head_count_kv": [1, 0, 2],
            "attention.key_length": 32,
            "attention.value_length": 32,
        },
    )
    info = model_info(path)
    assert info["n_head_kv_per_layer"] == [1, 0, 2] and info["n_layer_kv"] == 2
    assert info["kv_bytes_per_token"]["f16"] == (1 + 2) * 64 * 2
    assert "0-2 KV (varies per layer)" in format_info(info)


# --- the default model --------------------------------------------------------------------------


def test_default_model() -> None:
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"default model missing ({DEFAULT_MODEL}); fetch it with: python models/fetch.py")
    info = model_info(locate_model(None))  # model_info takes a resolved path; locate_model resolves the default
    assert Path(info["path"]) == DEFAULT_MODEL or os.environ.get("AMSLOCAL_MODEL")
    info = model_info(DEFAULT_MODEL)
    assert info["architecture"] == "llama" and info["file_type"] == "Q4_1" and info["size_label"] == "135M"
    assert (info["n_layer"], info["n_head"], info["n_head_kv"]) == (30, 9, 3)
    assert (info["head_dim_k"], info["head_dim_v"], info["n_embd"], info["n_ctx_train"]) == (64, 64, 576, 8192)
    assert info["vocab_size"] == 49152 and info["chat_template"]
    assert info["rope_type"] == "norm" and info["rope_freq_base"] == 100000.0
    assert info["n_params"] == 134515008
    # 30 layers x 3 KV heads x 64 values, K and V
    assert info["kv_bytes_per_token"] == {
        "f32": 30 * 2 * 192 * 4,
        "f16": 30 * 2 * 192 * 2,
        "q8_0": 30 * 2 * 6 * 34,
        "q4_0": 30 * 2 * 6 * 18,
    }
    assert info["compression"]["supported"]
    assert _state_growth(DEFAULT_MODEL, "q8_0", "q8_0") == info["kv_bytes_per_token"]["q8_0"]


def test_info_does_not_load_the_model(tiny_path: Path) -> None:
    code = (
        "import sys; from amslocal.info import model_info; model_info(sys.argv[1]); "
        "print('amslocal.backend' in sys.modules, 'llama_cpp' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# --- the command line (once `amslocal info` is wired into cli.py) --------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "amslocal", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def info_command() -> None:
    proc = _run_cli("info", "--help")
    if proc.returncode != 0:
        pytest.skip("`amslocal info` is not wired into cli.py yet")


def test_cli_info(info_command: None, tiny_path: Path) -> None:
    backend = _backend()
    lib = backend.library_info()
    line = f"{' + '.join(lib['backends'])} (llama-cpp-python {lib['llama_cpp_python']}, patched)"
    if lib["gpu_offload"]:
        line += "; layers offload to the GPU by default (-ngl)"
    proc = _run_cli("info", str(tiny_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == format_info(model_info(tiny_path), [("backend", line)])
    assert "CPU" in lib["backends"] and lib["llama_cpp_python"] != "unknown"
    assert proc.stderr == ""
    proc = _run_cli("info", str(tiny_path), "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts.pop("backend") == {**lib, "available": True}
    assert facts == json.loads(json.dumps(model_info(tiny_path)))


def test_cli_info_without_the_backend_says_so(info_command: None, tiny_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "LLAMA_CPP_LIB_PATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "amslocal", "info", str(tiny_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    label, text = proc.stdout.splitlines()[-1].split(None, 1)
    assert label == "backend" and text.startswith("not available: ") and "native/setup.sh" in text


def test_cli_info_unsupported_is_not_an_error(info_command: None, mamba_path: Path) -> None:
    proc = _run_cli("info", str(mamba_path))
    assert proc.returncode == 0, proc.stderr
    assert "not supported: recurrent state cannot be evicted per token" in proc.stdout


@pytest.mark.parametrize("which", ["missing", "noise", "cut"])
def test_cli_info_bad_file(info_command: None, tmp_path: Path, tiny_path: Path, which: str) -> None:
    path = {
        "missing": lambda: tmp_path / "missing.gguf",
        "noise": lambda: write_not_gguf(tmp_path / "noise.gguf"),
        "cut": lambda: write_truncated_gguf(tiny_path, tmp_path / "cut.gguf"),
    }[which]()
    proc = _run_cli("info", str(path))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("amslocal: error:")
