"""Tiny random-weight GGUF files for fast mechanical tests.

``write_tiny_llama_gguf`` writes a complete ``llama``-architecture model (a few
hundred KB) that stock llama.cpp loads, tokenizes and decodes in milliseconds.
Its outputs are meaningless, but deterministic for a given ``seed``, finite, and
non-degenerate: attention probabilities vary across positions and logits vary
across the vocabulary, so KV-cache and sampling code paths are really exercised.

``write_not_gguf`` and ``write_truncated_gguf`` make bad inputs for error-path tests.

Tokenizer: SentencePiece-style (``tokenizer.ggml.model = "llama"``) with
``<unk>``/``<s>``/``</s>`` (ids 0/1/2), the 256 byte-fallback tokens ``<0x00>`` ..
``<0xFF>`` (ids 3..258) and one NORMAL piece per printable ASCII character (space
is ``"▁"``). Any text therefore tokenizes, ASCII text to exactly one token per
character (plus BOS when requested) with no implicit leading space, which keeps
token counts predictable and detokenization an exact round trip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np

__all__ = [
    "TINY_BOS_ID",
    "TINY_EOS_ID",
    "TINY_UNK_ID",
    "tiny_vocab",
    "write_not_gguf",
    "write_tiny_llama_gguf",
    "write_truncated_gguf",
]

TINY_UNK_ID = 0
TINY_BOS_ID = 1
TINY_EOS_ID = 2

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker


def tiny_vocab(n_vocab: int | None = None) -> tuple[list[str], list[float], list[int]]:
    """Return ``(tokens, scores, token_types)`` for the tiny SPM vocabulary.

    The natural size is 3 specials + 256 bytes + 95 printable-ASCII pieces = 354.
    A larger ``n_vocab`` pads with UNUSED ``<extra_N>`` tokens (handy for testing
    vocab-sized buffers); a smaller one is rejected because byte fallback needs
    every byte token.
    """
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]

    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)

    # Printable ASCII as NORMAL pieces so ASCII text never needs byte fallback.
    # Scores only rank merges; with single-character pieces no merges exist.
    for i, c in enumerate(chr(cp) for cp in range(0x20, 0x7F)):
        tokens.append(_SPM_SPACE if c == " " else c)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i + 1))

    natural = len(tokens)
    if n_vocab is None:
        n_vocab = natural
    if n_vocab < natural:
        raise ValueError(f"n_vocab must be >= {natural} (specials + 256 byte tokens + ASCII pieces), got {n_vocab}")
    for i in range(n_vocab - natural):
        tokens.append(f"<extra_{i}>")
        types.append(gguf.TokenType.UNUSED)
        scores.append(-1e9)
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama_gguf(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 32,
    n_embd: int | None = None,
    n_ff: int = 64,
    n_vocab: int | None = None,
    n_ctx_train: int = 4096,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    seed: int = 0,
    dtype: Literal["f32", "f16"] = "f32",
    attn_score_std: float = 2.0,
) -> Path:
    """Write a random-weight ``llama`` GGUF to ``path`` and return it as a ``Path``.

    ``n_embd`` defaults to ``n_head * head_dim``; ``n_vocab`` defaults to the tiny
    vocabulary's natural size (354, see :func:`tiny_vocab`). ``dtype`` applies to
    the 2-D weight matrices; norm vectors are always f32 (as in real conversions).

    Weights are N(0, 1/fan_in) so activations stay O(1) through the residual
    stream, except ``attn_q``/``attn_k`` whose std is chosen so the pre-softmax
    attention scores have std ~``attn_score_std`` (score std = n_embd * std**2 for
    unit-RMS inputs): peaked enough that attention is clearly non-uniform, not so
    peaked that it collapses to one-hot.
    """
    if n_head % n_head_kv != 0:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if n_embd is None:
        n_embd = n_head * head_dim

    path = Path(path)
    tokens, scores, types = tiny_vocab(n_vocab)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    wdtype = np.float32 if dtype == "f32" else np.float16
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    qk_std = float(np.sqrt(attn_score_std / n_embd))

    def mat(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne (cols, rows): cols is the input (fan-in) dim.
        s = 1.0 / np.sqrt(cols) if std is None else std
        return (rng.standard_normal((rows, cols)) * s).astype(wdtype)

    def norm() -> np.ndarray:
        # Near-one gains: a real-looking norm that is not exactly the identity.
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("amslocal-tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    # Explicit key/value lengths: llama.cpp otherwise derives head_dim as n_embd / n_head,
    # which is wrong whenever n_embd is given independently.
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(TINY_UNK_ID)
    w.add_bos_token_id(TINY_BOS_ID)
    w.add_eos_token_id(TINY_EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # No implicit leading "▁": token count is then exactly len(ascii_text) (+1 for BOS)
    # and detokenizing round-trips the text byte for byte.
    w.add_add_space_prefix(False)

    # Embeddings at unit scale so the residual stream starts O(1), like a trained model's
    # post-norm activations.
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd)).astype(wdtype))
    for i in range(n_layer):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", norm())
        w.add_tensor(f"{p}.attn_q.weight", mat(q_dim, n_embd, qk_std))
        w.add_tensor(f"{p}.attn_k.weight", mat(kv_dim, n_embd, qk_std))
        w.add_tensor(f"{p}.attn_v.weight", mat(kv_dim, n_embd))
        w.add_tensor(f"{p}.attn_output.weight", mat(n_embd, q_dim))
        w.add_tensor(f"{p}.ffn_norm.weight", norm())
        w.add_tensor(f"{p}.ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(f"{p}.ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(f"{p}.ffn_down.weight", mat(n_embd, n_ff))
    w.add_tensor("output_norm.weight", norm())
    # Separate (untied) output head: logits std ~1 across the vocabulary.
    w.add_tensor("output.weight", mat(n_vocab, n_embd))

    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_not_gguf(path: str | os.PathLike[str], *, size: int = 4096, seed: int = 0) -> Path:
    """Write ``size`` random bytes that are guaranteed not to start with the GGUF magic."""
    data = bytearray(np.random.default_rng(seed).bytes(size))
    if data[:4] == b"GGUF":
        data[0] ^= 0xFF
    path = Path(path)
    path.write_bytes(bytes(data))
    return path


def write_truncated_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy the first half of the valid GGUF ``src`` to ``dst`` (valid magic, cut-off data)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def add_kv(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(key)


def write_header_gguf(path: Path, arch: str, kv: dict[str, Any]) -> Path:
    """A GGUF with metadata only (no tensors): enough for model_info, not for llama.cpp."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        add_kv(w, key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
