"""Owned handles over the low-level llama.cpp API: model, context, batch, sampler chain.

Each class owns one native object, frees it exactly once (``close()`` or garbage collection), and
turns native failure codes into :mod:`amslocal.errors` exceptions. Nothing here knows about KV
compression; the cache view and the engine sit on top.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import ContextParams, SamplerParams
from ..errors import AmsError, DecodeError, ModelError, OptionError
from . import _ams_raw as ams
from ._ams_raw import _llama as llama

# llama.cpp's own log lines (model loading, cache notes, warnings) go through this callback: hidden
# unless asked for ($AMSLOCAL_VERBOSE, or set_llama_log(True), which `generate -v` does), because
# library code never prints and every error the user sees is amslocal's one line
_log = {"show": bool(os.environ.get("AMSLOCAL_VERBOSE")), "last": 0}
_LOG_DEBUG, _LOG_CONT = 4, 5  # ggml_log_level: debug lines (per graph node) stay hidden even then


@llama.llama_log_callback
def _llama_log(level: int, text: bytes, user_data) -> None:
    if level != _LOG_CONT:
        _log["last"] = level
    if _log["show"] and _log["last"] != _LOG_DEBUG:
        try:
            sys.stderr.write(text.decode("utf-8", "replace"))
        except Exception:  # a log line must never raise into llama.cpp
            pass


llama.llama_log_set(_llama_log, ctypes.c_void_p(0))


def set_llama_log(show: bool) -> None:
    """Show (or hide, the default) llama.cpp's own log lines on stderr."""
    _log["show"] = bool(show)


llama.llama_backend_init()

# KV cache element types by name (ggml_type values)
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


N_GPU_LAYERS_ENV = "AMSLOCAL_N_GPU_LAYERS"


def default_threads() -> int:
    """Every core but one. llama.cpp's threads spin-wait on each other, so when another process
    takes a core they collapse: on 2 cores with one busy, 2 threads decoded SmolLM2 at 55 tok/s and
    1 thread at 155 (idle: 166 and 150; BENCHMARKS.md, the default thread count)."""
    return max(1, (os.cpu_count() or 1) - 1)


def library_info() -> dict:
    """What the loaded libllama was built with: its backends (``CPU``, ``CUDA``, ``Metal`` ...),
    whether it can offload layers, and llama-cpp-python's version."""
    raw = llama.llama_print_system_info()
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    backends = []
    for part in text.split("|"):
        name, sep, _ = part.partition(" : ")
        if sep and name.strip() and name.strip() not in backends:
            backends.append(name.strip())
    return {
        "backends": backends,
        "gpu_offload": bool(llama.llama_supports_gpu_offload()),
        "llama_cpp_python": getattr(sys.modules.get("llama_cpp"), "__version__", "unknown"),
        "system_info": text.strip(" |"),
    }


def gpu_layers_from_env() -> int:
    """Layers to offload when the caller does not say: $AMSLOCAL_N_GPU_LAYERS (-1 = all), else all
    of them when the library was built with a GPU backend (CUDA, Metal, ...), as llama.cpp does."""
    raw = os.environ.get(N_GPU_LAYERS_ENV, "").strip()
    if not raw:
        return -1 if llama.llama_supports_gpu_offload() else 0
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${N_GPU_LAYERS_ENV} must be an integer (got {raw!r})") from None


class Model:
    """A loaded GGUF model (weights only; contexts are made from it)."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: Optional[int] = None, use_mmap: bool = True):
        self.path = Path(path)
        params = llama.llama_model_default_params()
        if n_gpu_layers is None:  # llama.cpp's habit: an environment variable sets the default offload
            n_gpu_layers = gpu_layers_from_env()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        self._ptr = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise ModelError(f"llama.cpp could not load {self.path} (unsupported architecture or damaged file)")
        self.vocab = llama.llama_model_get_vocab(self._ptr)
        self.n_layer = llama.llama_model_n_layer(self._ptr)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self._ptr)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)

    @property
    def ptr(self):
        if not self._ptr:
            raise ValueError("model is closed")
        return self._ptr

    def meta(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(512)
        n = llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def arch(self) -> str:
        return self.meta("general.architecture") or "?"

    def is_recurrent(self) -> bool:
        return bool(llama.llama_model_is_recurrent(self.ptr)) or bool(llama.llama_model_is_hybrid(self.ptr))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama.llama_token * n_max)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (llama.llama_token * n_max)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        """A control token (``<|im_start|>``, ``<s>``...): chat-template structure, not text."""
        return bool(llama.llama_vocab_is_control(self.vocab, token))

    @property
    def bos(self) -> int:
        """The BOS token id (-1 if the vocabulary has none)."""
        return int(llama.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        """The EOS token id (-1 if the vocabulary has none)."""
        return int(llama.llama_vocab_eos(self.vocab))

    @property
    def add_bos(self) -> bool:
        """Whether the model expects BOS at the start of a sequence."""
        return bool(llama.llama_vocab_get_add_bos(self.vocab))

    def token_text(self, token: int) -> str:
        """A token's text with special tokens spelled out (``<|im_end|>``); '' for an invalid id."""
        if not 0 <= token < self.n_vocab:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", "replace")

    def chat_template(self, name: Optional[str] = None) -> Optional[str]:
        """The chat template stored in the GGUF (``tokenizer.chat_template``), or None.

        Read with ``llama_model_chat_template``: ``meta()`` has a short buffer and templates are long.
        """
        raw = llama.llama_model_chat_template(self.ptr, name.encode() if name else None)
        return raw.decode("utf-8", "replace") if raw else None

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama.llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


class Context:
    """A llama.cpp context with one sequence (seq_id 0) and its KV cache."""

    def __init__(self, model: Model, params: ContextParams = ContextParams()):
        if params.type_k not in KV_TYPES or params.type_v not in KV_TYPES:
            raise ValueError(f"unknown KV type {params.type_k}/{params.type_v}; choose from {', '.join(KV_TYPES)}")
        if params.flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}")
        self.model = model
        self.params = params
        cp = llama.llama_context_default_params()
        cp.n_ctx = params.n_ctx
        cp.n_batch = params.n_batch
        cp.n_ubatch = min(params.n_ubatch, params.n_batch)
        cp.n_seq_max = 1
        threads = params.n_threads or default_threads()
        self.n_threads = threads  # the controller's arithmetic uses as many (compute_threads)
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.flash_attn_type = FLASH_ATTN[params.flash_attn]
        cp.type_k = KV_TYPES[params.type_k]
        cp.type_v = KV_TYPES[params.type_v]
        cp.no_perf = True
        self._ptr = llama.llama_init_from_model(model.ptr, cp)
        if not self._ptr:
            quantized_v = params.type_v not in ("f16", "f32", "bf16")
            hint = (
                "a quantized V cache needs --flash-attn on"
                if quantized_v and params.flash_attn != "on"
                else "too little memory for a context this size? lower --ctx-size"
            )
            raise ModelError(
                f"llama.cpp could not create a context (n_ctx={params.n_ctx}, K {params.type_k}, V {params.type_v}, "
                f"flash attention {params.flash_attn}); {hint}"
            )
        self.memory = llama.llama_get_memory(self._ptr)
        self.n_ctx = llama.llama_n_ctx(self._ptr)
        # bumped by everything here that changes the cache's cells or their K/V (reads can be reused
        # while it stands still); code that changes them through the raw bindings bumps it too
        self.version = 0

    @property
    def ptr(self):
        if not self._ptr:
            raise ValueError("context is closed")
        return self._ptr

    # --- decoding -------------------------------------------------------------------------

    def decode(self, batch: "Batch") -> None:
        self.version += 1
        rc = llama.llama_decode(self.ptr, batch.native)
        if rc != 0:
            what = {
                1: "no free KV cells for the batch",
                2: "aborted",
                -1: "invalid batch",
                -2: "compute buffer allocation failed",
                -3: "graph compute failed",
            }.get(rc, f"error {rc}")
            raise DecodeError(f"llama_decode failed: {what}")

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of output row ``i`` of the last decode (a copy)."""
        ptr = llama.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise DecodeError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def logits_all(self, n: int) -> np.ndarray:
        """Logits of the ``n`` output rows of the last decode, [n, n_vocab] (a copy)."""
        ptr = llama.llama_get_logits(self.ptr)
        if not ptr:
            raise DecodeError("no logits for the last decode")
        return np.ctypeslib.as_array(ptr, shape=(n, self.model.n_vocab)).copy()

    # --- memory (sequence 0) --------------------------------------------------------------

    def seq_rm(self, p0: int, p1: int) -> bool:
        """Remove positions [p0, p1) of sequence 0 (p1 = -1: to the end)."""
        self.version += 1
        return bool(llama.llama_memory_seq_rm(self.memory, 0, p0, p1))

    def seq_add(self, p0: int, p1: int, delta: int) -> None:
        """Shift positions [p0, p1) of sequence 0 by ``delta`` (applied lazily at the next decode)."""
        self.version += 1
        llama.llama_memory_seq_add(self.memory, 0, p0, p1, delta)

    def seq_pos_max(self) -> int:
        return int(llama.llama_memory_seq_pos_max(self.memory, 0))

    def can_shift(self) -> bool:
        return bool(llama.llama_memory_can_shift(self.memory))

    def clear(self) -> None:
        self.version += 1
        llama.llama_memory_clear(self.memory, True)

    # --- sequence state (save / restore) ----------------------------------------------------

    def apply_pending_shift(self) -> None:
        """Re-rotate K now if a ``seq_add`` is pending (the state copy saves K as it is in memory)."""
        if ams.llama_ams_shift_pending(self.ptr):
            self.version += 1
            ams.llama_ams_apply_shift(self.ptr)

    def seq_state_get(self) -> bytes:
        """The cells of sequence 0 (positions, K and V of every layer) as llama.cpp serialises them.

        Positions may have holes; restoring puts the cells in the first free cells of the target
        context in the same order. A pending position shift is applied first.
        """
        self.apply_pending_shift()
        n = int(llama.llama_state_seq_get_size(self.ptr, 0))
        buf = (ctypes.c_uint8 * max(n, 1))()
        written = int(llama.llama_state_seq_get_data(self.ptr, buf, n, 0))
        if written != n:
            raise DecodeError(f"llama_state_seq_get_data wrote {written} of {n} bytes")
        return bytes(buf[:n])

    def seq_state_set(self, data: bytes) -> None:
        """Replace sequence 0 with ``data`` from :meth:`seq_state_get` (same model and KV types)."""
        buf = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        self.version += 1
        if int(llama.llama_state_seq_set_data(self.ptr, buf, len(data), 0)) == 0:
            raise DecodeError("llama.cpp refused the saved KV state (another model, KV type or too few cells)")

    # --- observation (the patched API) ----------------------------------------------------

    def set_obs(self, n_obs: int, flags: int) -> None:
        ams.llama_ams_set_obs(self.ptr, n_obs, flags)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama.llama_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


class Batch:
    """A reusable token batch for sequence 0."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.native = llama.llama_batch_init(capacity, 0, 1)
        self.n_tokens = 0

    def set(
        self, tokens: Sequence[int], positions: Sequence[int], logits_last: bool = True, logits_all: bool = False
    ) -> None:
        n = len(tokens)
        if n > self.capacity or n != len(positions):
            raise ValueError(f"batch of {n} tokens does not fit capacity {self.capacity}")
        b = self.native
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = int(logits_all)
        if n and logits_last:
            b.logits[n - 1] = 1
        b.n_tokens = n
        self.n_tokens = n

    def close(self) -> None:
        if getattr(self, "native", None) is not None:
            llama.llama_batch_free(self.native)
            self.native = None

    def __del__(self):
        self.close()


class _Captured:
    text = ""


@contextlib.contextmanager
def _stderr_captured():
    """Collect what native code writes to file descriptor 2 meanwhile (``.text`` afterwards)."""
    out = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.text = tmp.read().decode("utf-8", "replace")


class Sampler:
    """llama.cpp's sampler chain."""

    def __init__(self, params: SamplerParams = SamplerParams(), n_vocab: int = 0, vocab=None):
        """``n_vocab``: the model's vocabulary size (this llama.cpp's repetition penalty asks for it);
        ``vocab``: the model's vocabulary, needed for a grammar (``params.grammar``, GBNF text), which
        constrains every sampled token and is accepted token by token (llama.cpp's grammar sampler)."""
        sp = llama.llama_sampler_chain_default_params()
        sp.no_perf = True
        self._ptr = llama.llama_sampler_chain_init(sp)
        if params.grammar:
            if vocab is None:
                raise AmsError("a grammar needs the model's vocabulary")
            with _stderr_captured() as said:  # llama.cpp's grammar parser prints its reason to stderr itself
                grammar = llama.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not grammar:
                self.close()
                why = " ".join(said.text.split())[:300]
                message = "the grammar does not parse as GBNF with a 'root' rule"
                raise OptionError(message + (f" ({why})" if why else ""))
            llama.llama_sampler_chain_add(self._ptr, grammar)
        if params.temp <= 0:
            if params.repeat_penalty != 1.0:  # llama.cpp applies penalties before greedy picking too
                llama.llama_sampler_chain_add(
                    self._ptr,
                    llama.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0),
                )
            llama.llama_sampler_chain_add(self._ptr, llama.llama_sampler_init_greedy())
        else:
            if params.repeat_penalty != 1.0:
                llama.llama_sampler_chain_add(
                    self._ptr,
                    llama.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0),
                )
            if params.top_k > 0:
                llama.llama_sampler_chain_add(self._ptr, llama.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                llama.llama_sampler_chain_add(self._ptr, llama.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                llama.llama_sampler_chain_add(self._ptr, llama.llama_sampler_init_min_p(params.min_p, 1))
            llama.llama_sampler_chain_add(self._ptr, llama.llama_sampler_init_temp(params.temp))
            llama.llama_sampler_chain_add(self._ptr, llama.llama_sampler_init_dist(params.seed & 0xFFFFFFFF))

    def sample(self, ctx: Context, i: int = -1) -> int:
        return int(llama.llama_sampler_sample(self._ptr, ctx.ptr, i))

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()
