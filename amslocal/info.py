"""What a GGUF model is, read from its header alone: ``amslocal info MODEL``.

:func:`model_info` walks the file with :mod:`amslocal.gguf_check` (tens of milliseconds, the
weights are never read, the native backend is never imported) and derives what llama.cpp would:
head counts and sizes with llama.cpp's defaults, the RoPE type of the architecture, the interleaved
sliding-window pattern, the KV cache's bytes per token at each cache type, and whether amslocal can
compress this model's cache, and why not. :func:`format_info` renders the result as aligned text.

The architecture tables below follow the vendored llama.cpp (llama-cpp-python 0.3.36):
``llm_arch_is_recurrent`` / ``llm_arch_is_hybrid`` / ``llm_arch_is_diffusion`` (src/llama-arch.cpp),
``llama_model_rope_type`` (src/llama-model.cpp) and each architecture's ``load_arch_hparams``
(src/models/*.cpp) for sliding-window defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .errors import ModelError

if TYPE_CHECKING:
    from .gguf_check import GGUFInfo

__all__ = ["KV_TYPES", "format_info", "kv_cache_bytes", "model_info"]

# the cache types shown; any ggml type name works in kv_cache_bytes()
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")

# --- architecture tables (from the vendored llama.cpp) ------------------------------------------

RECURRENT = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID = frozenset(
    {
        "jamba",
        "falcon-h1",
        "plamo2",
        "granitehybrid",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "qwen3next",
        "kimi-linear",
        "bailingmoe3",
        "kimi-k3",
        "glm5-next",
        "qwen35",
        "qwen35moe",
        "qwen4exp",
        "deepseek4",
        "minimax-01",
    }
)
DIFFUSION = frozenset({"dream", "llada", "llada-moe", "rnd1"})
ENCODER = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "eurobert",
        "t5encoder",
        "gemma-embedding",
        "llama-embed",
    }
)
NOT_A_CHAT_MODEL = {
    "clip": "a multimodal projector (mmproj) file, not a language model",
    "wavtokenizer-dec": "an audio decoder, not a language model",
    "t5": "an encoder-decoder model: amslocal drives decoder-only models (and T5's relative-position "
    "bias is not observed)",
    "eagle3": "a speculative-decoding draft head; it runs only beside its target model",
    "dflash": "a speculative-decoding draft model; it runs only beside its target model",
}

# llama_model_rope_type(): architecture -> RoPE type
_ROPE_NONE = (
    "clip gpt2 gptj mpt refact bloom mamba mamba2 jamba jina-bert-v2 t5 t5encoder jais rwkv6 rwkv6qwen2 "
    "rwkv7 arwkv7 wavtokenizer-dec nemotron_h nemotron_h_moe kimi-linear kimi-k3 glm5-next"
)
_ROPE_NORM = (
    "llama llada llama4 deci baichuan starcoder internlm2 minicpm xverse command-r cohere2 cohere2moe olmo "
    "arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 muse-glimmer plm chatglm granite "
    "granitemoe granitehybrid graniteswitch granite_swa chameleon bailingmoe neo-bert smollm3 arcee "
    "ernie4_5 ernie4_5-moe mistral3 eagle3 mistral4 llama-embed maincoder glm-dsa dots3note nanbeige "
    "pockettts hy_v4"
)
_ROPE_NEOX = (
    "falcon falcon-h1 grok dbrx bert jina-bert-v3 modern-bert nomic-bert nomic-bert-moe eurobert stablelm "
    "bitnet qwen qwen2 dream qwen2moe qwen3 qwen3moe llada-moe rnd1 olmo2 olmoe phi2 phi3 phimoe plamo "
    "plamo2 plamo3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2 openelm "
    "gptneox codeshell orion nemotron exaone exaone4 exaone-moe minicpm3 bailingmoe2 dots1 hunyuan-moe "
    "jais2 gpt-oss hunyuan-dense hy_v3 lfm2 lfm2moe smallthinker seed_oss grovemoe apertus minimax-01 "
    "minimax-m2 minimax-m3 cogvlm pangu-embedded afmoe laguna qwen3next mimo2 step35 spark2_5 talkie "
    "mellum maple hrm_text"
)
_ROPE_MROPE = "qwen2vl paddleocr"
_ROPE_IMROPE = "qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp qwen3tts"
ROPE_TYPE: dict[str, str] = {
    arch: kind
    for names, kind in (
        (_ROPE_NONE, "none"),
        (_ROPE_NORM, "norm"),
        (_ROPE_NEOX, "neox"),
        (_ROPE_MROPE, "mrope"),
        (_ROPE_IMROPE, "imrope"),
    )
    for arch in names.split()
}
# M-RoPE when the file carries rope.dimension_sections, else this type
ROPE_MROPE_IF_SECTIONS = {
    "bailingmoe3": "norm",
    "glm4": "norm",
    "glm4moe": "neox",
    "hunyuan_vl": "neox",
    "dflash": "neox",
}
KNOWN_ARCHS = frozenset(ROPE_TYPE) | frozenset(ROPE_MROPE_IF_SECTIONS)

# Interleaved sliding-window attention: (default n_swa or None, default period, dense first,
# needs a positive sliding_window key). A file's sliding_window_pattern (a period, or one flag per
# layer) overrides the period, as llama_model_base::load_swa_pattern does.
_SWA: dict[str, tuple[Optional[int], int, bool, bool]] = {
    "gemma2": (4096, 2, False, False),
    "gemma3": (None, 6, False, True),
    "gemma3n": (None, 5, False, False),
    "cohere2": (None, 4, False, False),
    "cohere2moe": (None, 4, True, False),
    "gpt-oss": (None, 2, False, False),
    "exaone4": (4096, 4, False, False),  # only the 64-layer (32B) model, see _swa_layers
    "exaone-moe": (128, 4, False, False),
    "olmo2": (None, 4, False, True),
    "smallthinker": (4096, 4, True, True),  # llama.cpp forces 4096
    "llama4": (8192, 4, False, False),  # chunked attention (3 chunked, 1 full), chunks of 8192 forced
    "afmoe": (None, 4, False, True),
    "laguna": (None, 4, True, True),
    "mellum": (None, 4, False, True),
    "plamo3": (None, 8, False, True),
    "muse-glimmer": (None, 4, False, False),
}
# architectures that read a per-layer sliding_window_pattern array and nothing else
_SWA_ARRAY_ONLY = frozenset(
    {"gemma4", "gemma4-assistant", "granite_swa", "maple", "mimo2", "spark2_5", "step35", "dots3note", "dflash"}
)
# llama_kv_cache::get_can_shift(): false for step35 and for M-RoPE (several positions per token)
_NO_SHIFT_ARCHS = frozenset({"step35"})
# gemma3n: llama.cpp hard-codes the first 20 layers as the ones with a KV cache
_KV_FROM_START = {"gemma3n": 20}


# --- small helpers ------------------------------------------------------------------------------


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    """A scalar-or-array hparam as one value per layer (llama.cpp's get_key_or_arr)."""
    if value is None:
        return [default] * n_layer
    if isinstance(value, tuple):
        vals = [int(v) for v in value[:n_layer]]
        return vals + [0] * (n_layer - len(vals))
    return [int(value)] * n_layer


def _row_bytes(kv_type: str, n_heads: int, head_dim: int) -> Optional[int]:
    """Bytes of one token's row of ``n_heads`` heads, or None when the type's block does not divide a
    head (llama.cpp then refuses the cache type)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]]
    if head_dim % block:
        return None
    return n_heads * head_dim // block * size


def _file_type_name(value: Any) -> Optional[str]:
    if value is None:
        return None
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"unknown ({value})"
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _swa_layers(arch: str, md: Mapping[str, Any], n_layer: int) -> tuple[list[bool], Optional[int], str]:
    """(is-SWA flag per layer, n_swa, kind) as llama.cpp sets them up; kind is '', 'swa' or 'chunked'."""
    window = md.get(f"{arch}.attention.sliding_window")
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    none = ([False] * n_layer, None, "")
    if arch in _SWA:
        default_swa, period, dense_first, needs_key = _SWA[arch]
        if needs_key and not window:
            return none
        if arch == "llama4" and window == 0:
            return none
        if arch == "exaone4" and n_layer != 64:
            return none
        n_swa = int(window) if window else default_swa
        if arch in ("smallthinker", "llama4"):  # the file's value is overridden
            n_swa = default_swa
    elif arch in _SWA_ARRAY_ONLY or isinstance(pattern, tuple):
        if not isinstance(pattern, tuple):
            return none
        n_swa, period, dense_first = (int(window) if window else None), 0, False
    else:
        return none  # llama.cpp ignores a sliding_window key for this architecture
    if isinstance(pattern, tuple):
        flags = [bool(v) for v in pattern[:n_layer]]
        flags += [False] * (n_layer - len(flags))
    else:
        if isinstance(pattern, int) and not isinstance(pattern, bool):
            period = pattern
        if dense_first:
            flags = [period == 0 or il % period != 0 for il in range(n_layer)]
        else:
            flags = [period == 0 or il % period < period - 1 for il in range(n_layer)]
    if not any(flags) or not n_swa:
        return none
    return flags, n_swa, "chunked" if arch == "llama4" else "swa"


def _pattern_text(flags: list[bool]) -> str:
    """'5 sliding-window : 1 full, repeating', or one letter per layer (S sliding-window, F full)."""
    n = len(flags)
    for period in range(1, n + 1):
        if all(flags[i] == flags[i % period] for i in range(n)):
            break
    unit = flags[:period]
    if period < n:
        n_s = sum(unit)
        if unit == [True] * (period - 1) + [False]:
            return f"{n_s} sliding-window : 1 full, repeating"
        if unit == [False] + [True] * (period - 1):
            return f"1 full : {n_s} sliding-window, repeating"
    return "".join("S" if f else "F" for f in flags) + " (S sliding-window, F full)"


# --- the facts ----------------------------------------------------------------------------------


def model_info(path: str | os.PathLike[str]) -> dict:
    """Facts about the GGUF model at ``path`` (resolved by the caller, e.g. with
    :func:`amslocal.models.locate_model`), from its header.

    Raises :class:`~amslocal.errors.ModelError` (one line) for a missing, foreign, truncated or
    damaged file. The result is JSON-serialisable; sizes are bytes, KV sizes are per token:

    ``path, file_size, gguf_version, name, architecture, size_label, n_params, file_type,
    tensor_types, n_layer, n_head, n_head_kv, n_head_kv_per_layer, head_dim_k, head_dim_v,
    n_rot, n_embd, n_ff, n_ctx_train, rope_type, rope_freq_base, rope_freq_base_swa,
    rope_scaling, sliding_window, sliding_window_kind, sliding_window_pattern,
    sliding_window_layers, n_layer_kv,
    n_layer_swa, kv_lora_rank, mla_latent_cache, causal, chat_template, chat_template_chars,
    vocab_size, kv_bytes_per_token, kv_bytes_per_token_full, kv_bytes_per_token_swa, kv_split,
    compression``.

    ``kv_bytes_per_token[t]`` counts K and V of every KV layer at cache type ``t`` (None where the
    type's 32-element block does not divide a head); ``..._swa`` is the sliding-window layers' share,
    which stops growing at ``sliding_window`` tokens, ``..._full`` the rest. ``compression`` is
    ``{"supported", "reason", "positions"}``, positions being the ``--positions`` modes that work.
    """
    from .gguf_check import inspect_gguf

    resolved = Path(path).expanduser()
    g = inspect_gguf(resolved)
    if not g.arch:
        raise ModelError(f"{resolved} has no general.architecture key; it is not a model file")
    try:
        return _facts(resolved, g)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, ZeroDivisionError) as exc:
        # a value of the wrong type or shape (a string where a count belongs, ...)
        raise ModelError(f"{resolved} has inconsistent metadata ({exc.__class__.__name__}: {exc})") from None


def _facts(resolved: Path, g: "GGUFInfo") -> dict:
    arch = g.arch
    md = g.metadata

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    n_layer = int(key("block_count", 0) or 0)
    n_embd = int(key("embedding_length", 0) or 0)
    # head counts may be one per layer; n_head_kv defaults to n_head (llama_model::load_hparams)
    heads = _per_layer(key("attention.head_count"), n_layer, 0)
    heads_kv_raw = key("attention.head_count_kv")
    heads_kv = heads if heads_kv_raw is None else _per_layer(heads_kv_raw, n_layer, 0)
    n_head = heads[0] if heads else 0
    n_head_kv = heads_kv[0] if heads_kv else 0
    if n_head > 0:
        head_k = int(key("attention.key_length", n_embd // n_head))
        head_v = int(key("attention.value_length", n_embd // n_head))
        n_rot = int(key("rope.dimension_count", head_k))
    else:
        head_k = head_v = n_rot = 0
    n_ff = key("feed_forward_length")
    if isinstance(n_ff, tuple):
        n_ff = max(n_ff, default=0)

    # RoPE
    sections = key("rope.dimension_sections")
    if arch in ROPE_MROPE_IF_SECTIONS:
        has_sections = isinstance(sections, tuple) and any(sections)
        rope_type: Optional[str] = "mrope" if has_sections else ROPE_MROPE_IF_SECTIONS[arch]
    else:
        rope_type = ROPE_TYPE.get(arch)
    rope_base = key("rope.freq_base", 10000.0 if rope_type not in (None, "none") else None)
    rope_scaling = None
    scaling_type = key("rope.scaling.type")
    if (scaling_type and scaling_type not in ("none", "linear")) or key("rope.scaling.factor"):
        rope_scaling = {
            "type": scaling_type or "linear",
            "factor": key("rope.scaling.factor"),
            "original_context": key("rope.scaling.original_context_length"),
        }

    # which layers hold K/V, which of them use a sliding window
    swa_flags, n_swa, swa_kind = _swa_layers(arch, md, n_layer)
    kv_from_start = _KV_FROM_START.get(arch)
    shared = key("attention.shared_kv_layers")
    if kv_from_start is None and shared:
        kv_from_start = n_layer - int(shared)
    has_kv = [heads_kv[il] > 0 and (kv_from_start is None or il < kv_from_start) for il in range(n_layer)]
    if arch in RECURRENT:
        has_kv = [False] * n_layer

    # MLA: with key_length_mla in the file llama.cpp keeps one latent row per token (no V cache)
    kv_lora_rank = key("attention.kv_lora_rank")
    mla_latent = kv_lora_rank is not None and key("attention.key_length_mla") is not None

    # bytes per token of K and of V at each type, split into full-attention and sliding-window layers
    kv_split: dict[str, dict[str, Optional[list[int]]]] = {"k": {}, "v": {}}
    for t in KV_TYPES:
        for part, head_dim in (("k", head_k), ("v", head_v)):
            full = swa = 0
            ok = True
            for il in range(n_layer):
                if not has_kv[il] or (part == "v" and mla_latent):
                    continue
                row = _row_bytes(t, heads_kv[il], head_dim)
                if row is None:
                    ok = False
                    break
                if swa_flags[il]:
                    swa += row
                else:
                    full += row
            kv_split[part][t] = [full, swa] if ok else None

    def kv_sum(t: str, idx: Optional[int]) -> Optional[int]:
        k, v = kv_split["k"][t], kv_split["v"][t]
        if k is None or v is None:
            return None
        return sum(k) + sum(v) if idx is None else k[idx] + v[idx]

    kv_total = {t: kv_sum(t, None) for t in KV_TYPES}
    kv_full = {t: kv_sum(t, 0) for t in KV_TYPES}
    kv_swa = {t: kv_sum(t, 1) for t in KV_TYPES}

    n_layer_kv = sum(has_kv)
    n_layer_swa = sum(1 for il in range(n_layer) if has_kv[il] and swa_flags[il])
    template = md.get("tokenizer.chat_template")
    vocab = key("vocab_size") or g.array_lengths.get("tokenizer.ggml.tokens")
    causal = key("attention.causal", True)

    info: dict[str, Any] = {
        "path": str(resolved),
        "file_size": g.size,
        "gguf_version": g.version,
        "name": md.get("general.name"),
        "architecture": arch,
        "size_label": md.get("general.size_label"),
        "n_params": g.n_params,
        "file_type": _file_type_name(md.get("general.file_type")),
        "tensor_types": dict(sorted(g.tensor_types.items(), key=lambda kv: -kv[1])),
        "n_layer": n_layer,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "n_head_kv_per_layer": heads_kv if len(set(heads_kv)) > 1 else None,  # only when it varies
        "head_dim_k": head_k,
        "head_dim_v": head_v,
        "n_rot": n_rot,
        "n_embd": n_embd,
        "n_ff": n_ff,
        "n_ctx_train": int(key("context_length", 0) or 0),
        "rope_type": rope_type,
        "rope_freq_base": rope_base,
        "rope_freq_base_swa": key("rope.freq_base_swa") if swa_kind else None,
        "rope_scaling": rope_scaling,
        "sliding_window": n_swa,
        "sliding_window_kind": swa_kind or None,
        "sliding_window_pattern": _pattern_text(swa_flags) if swa_kind else None,
        "sliding_window_layers": [il for il in range(n_layer) if has_kv[il] and swa_flags[il]] if swa_kind else None,
        "n_layer_kv": n_layer_kv,
        "n_layer_swa": n_layer_swa,
        "kv_lora_rank": kv_lora_rank,
        "mla_latent_cache": mla_latent,
        "causal": bool(causal),
        "chat_template": isinstance(template, str) and bool(template.strip()),
        "chat_template_chars": len(template) if isinstance(template, str) else 0,
        "vocab_size": int(vocab) if vocab else None,
        "kv_bytes_per_token": kv_total,
        "kv_bytes_per_token_full": kv_full,
        "kv_bytes_per_token_swa": kv_swa,
        # {"k"|"v": {type: [full-attention bytes, sliding-window bytes] per token, or None}}
        "kv_split": kv_split,
    }
    info["compression"] = _compression(info)
    return info


def _compression(info: Mapping[str, Any]) -> dict:
    """Whether amslocal can keep this model's cache inside a budget, and why (not)."""
    arch = info["architecture"]
    both = ["keep", "compact"]

    def no(reason: str) -> dict:
        return {"supported": False, "reason": reason, "positions": []}

    if arch in NOT_A_CHAT_MODEL:
        return no(NOT_A_CHAT_MODEL[arch])
    if arch in RECURRENT:
        return no(
            f"recurrent state cannot be evicted per token: '{arch}' is a recurrent (SSM/RWKV) "
            "architecture whose memory is one fixed-size state, not a per-token KV cache"
        )
    if arch in HYBRID:
        return no(
            f"'{arch}' is a hybrid architecture: its recurrent layers keep a fixed-size state that "
            "cannot be evicted per token, so the cache cannot be cut back consistently"
        )
    if arch in DIFFUSION:
        return no(f"'{arch}' is a diffusion model: it denoises whole blocks instead of decoding token by token")
    if arch in ENCODER or not info["causal"]:
        return no(f"'{arch}' is a non-causal (embedding/encoder) model; it does not generate text token by token")
    if arch not in KNOWN_ARCHS:
        return no(f"architecture '{arch}' is unknown to the llama.cpp that amslocal was built with")
    if info["n_layer_kv"] == 0:
        return no(f"'{arch}' has no attention layer with a KV cache")
    if info["mla_latent_cache"]:
        return no(
            "MLA (DeepSeek-style) latent cache: each token is one compressed row shared by all heads "
            "and there is no V cache, which amslocal's per-head K/V reads and scorers do not handle"
        )
    n_full = info["n_layer_kv"] - info["n_layer_swa"]
    if info["n_layer_swa"] and n_full == 0:
        return no(
            f"every attention layer uses a sliding window of {info['sliding_window']} tokens: the cache "
            "already forgets by itself and there is no full-attention cache to score"
        )

    positions = both
    notes = []
    if info["rope_type"] in ("mrope", "imrope") or arch in _NO_SHIFT_ARCHS:
        positions = ["keep"]
        why = "M-RoPE" if info["rope_type"] in ("mrope", "imrope") else "per-layer RoPE dimensions"
        notes.append(f"positions cannot be shifted ({why}): --positions keep only")
    if info["n_layer_swa"]:
        kind = "chunked" if info["sliding_window_kind"] == "chunked" else "sliding-window"
        n_swa_layers = info["n_layer_swa"]
        reason = (
            f"interleaved {kind} attention: the {_plural(n_full, 'full-attention layer')} "
            f"{'is' if n_full == 1 else 'are'} scored and evicted; the {_plural(n_swa_layers, kind + ' layer')} "
            f"forget{'s' if n_swa_layers == 1 else ''} by {'itself' if n_swa_layers == 1 else 'themselves'} "
            f"(at most {info['sliding_window']} tokens)"
        )
    else:
        reason = (
            f"every one of the {info['n_layer_kv']} attention layers keeps a per-token KV cache"
            if info["n_layer_kv"] > 1
            else "its attention layer keeps a per-token KV cache"
        )
    return {"supported": True, "reason": "; ".join([reason, *notes]), "positions": positions}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def kv_cache_bytes(
    info: Mapping[str, Any], n_cells: int, type_k: str = "f16", type_v: Optional[str] = None, *, n_ubatch: int = 512
) -> Optional[int]:
    """Bytes of K and V that llama.cpp allocates for a cache of ``n_cells`` cells.

    ``type_k``/``type_v`` are among :data:`KV_TYPES` (``type_v`` defaults to ``type_k``); None when
    a type cannot be used with this model's head size. Sliding-window layers get
    ``min(n_cells, pad256(sliding_window + n_ubatch))`` cells, as llama_kv_cache_iswa sizes them.
    """
    k = info["kv_split"]["k"].get(type_k)
    v = info["kv_split"]["v"].get(type_v or type_k)
    if k is None or v is None:
        return None
    swa_cells = n_cells
    if info.get("sliding_window"):
        swa_cells = min(n_cells, -(-(info["sliding_window"] + n_ubatch) // 256) * 256)
    return (k[0] + v[0]) * n_cells + (k[1] + v[1]) * swa_cells


# --- the text -----------------------------------------------------------------------------------


def _bytes(n: Optional[int | float]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_info(info: Mapping[str, Any], extra: Sequence[tuple[str, str]] = ()) -> str:
    """The facts of :func:`model_info` as an aligned text block (no trailing newline); ``extra``
    (label, text) rows go at the end."""
    rows: list[tuple[str, str]] = []
    add = rows.append
    name = os.path.basename(info["path"])
    add(("model", name + (f"  ({info['name']})" if info.get("name") else "")))
    add(("architecture", info["architecture"]))
    params = _count(info["n_params"]) if info["n_params"] else "unknown"
    if info.get("size_label"):
        params += f" (labelled {info['size_label']})"
    add(("parameters", params))
    types = ", ".join(f"{t} x{n}" for t, n in info["tensor_types"].items())
    add(
        (
            "file",
            f"{_bytes(info['file_size'])}, GGUF v{info['gguf_version']}, "
            f"type {info['file_type'] or 'unknown'}" + (f"  [tensors: {types}]" if types else ""),
        )
    )
    add(
        (
            "layers",
            f"{info['n_layer']}"
            + (f" ({info['n_layer_kv']} with a KV cache)" if info["n_layer_kv"] != info["n_layer"] else ""),
        )
    )
    if info["n_head"]:
        kv = info["n_head_kv"]
        if info.get("n_head_kv_per_layer"):
            per = info["n_head_kv_per_layer"]
            kv_text = f"{min(per)}-{max(per)} KV (varies per layer)"
        elif info["mla_latent_cache"]:
            kv_text = f"{kv} KV (MLA: one latent row per token shared by all heads)"
        else:
            kv_text = f"{kv} KV" + (
                f" (GQA, {info['n_head'] // kv} query heads per KV head)"
                if kv and info["n_head"] % kv == 0 and info["n_head"] != kv
                else ""
            )
        add(("heads", f"{info['n_head']} query, {kv_text}"))
        add(("head dims", f"key {info['head_dim_k']}, value {info['head_dim_v']}, rotary {info['n_rot']}"))
    else:
        add(("heads", "none (no attention)"))
    add(("embedding", f"{info['n_embd']}" + (f", feed-forward {info['n_ff']}" if info.get("n_ff") else "")))
    add(("context", f"{info['n_ctx_train']} tokens (trained)"))
    if info["rope_type"] in (None, "none"):
        add(("rope", "none" if info["rope_type"] else "unknown"))
    else:
        rope = f"{info['rope_type']}, base {info['rope_freq_base']:g}"
        if info.get("rope_freq_base_swa"):
            rope += f" (sliding-window layers {info['rope_freq_base_swa']:g})"
        if info.get("rope_scaling"):
            sc = info["rope_scaling"]
            rope += f", scaling {sc['type']}" + (f" x{sc['factor']:g}" if sc.get("factor") else "")
        add(("rope", rope))
    if info["sliding_window"]:
        kind = "chunked attention" if info["sliding_window_kind"] == "chunked" else "sliding window"
        add(
            (
                "sliding window",
                f"{info['sliding_window']} tokens ({kind}) on {info['n_layer_swa']} of "
                f"{info['n_layer_kv']} layers: {info['sliding_window_pattern']}",
            )
        )
    else:
        add(("sliding window", "none"))
    if info["kv_lora_rank"] is not None:
        add(
            (
                "MLA",
                f"kv_lora_rank {info['kv_lora_rank']}, "
                + ("latent cache (K only)" if info["mla_latent_cache"] else "per-head cache"),
            )
        )
    add(("vocabulary", f"{info['vocab_size']} tokens" if info["vocab_size"] else "unknown"))
    add(("chat template", f"yes ({info['chat_template_chars']} characters)" if info["chat_template"] else "no"))

    if info["n_layer_kv"]:
        swa = info["n_layer_swa"]
        what = "K+V" if not info["mla_latent_cache"] else "latent K"
        head = f"KV per token ({what}, {info['n_layer_kv']} layers)"
        add((head, ""))
        for t in KV_TYPES:
            total = info["kv_bytes_per_token"][t]
            if total is None:
                line = "n/a (head size is not a multiple of the 32-element block)"
            elif swa:
                full, part = info["kv_bytes_per_token_full"][t], info["kv_bytes_per_token_swa"][t]
                line = (
                    f"{full:>9,} B full-attention + {part:,} B sliding-window "
                    f"(stops growing at {info['sliding_window']} tokens)"
                )
            else:
                per_1k = _bytes(total * 1024)
                line = f"{total:>9,} B  ({per_1k} per 1024 tokens)"
            add((f"  {t}", line))
    else:
        add(
            (
                "KV per token",
                "none (a fixed-size recurrent state instead)"
                if info["architecture"] in RECURRENT
                else "none (no per-token KV cache)",
            )
        )

    comp = info["compression"]
    if comp["supported"]:
        add(("compression", f"supported: {comp['reason']}"))
    else:
        add(("compression", f"not supported: {comp['reason']}"))
    rows.extend(extra)

    width = max(len(k) for k, v in rows if v) + 2
    return "\n".join(f"{k}" if not v else f"{k:<{width}}{v}" for k, v in rows)
