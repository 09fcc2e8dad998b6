"""Raw ctypes bindings for the ``llama_ams_*`` symbols added by ``patches/``.

One-to-one with the declarations in the patched ``llama.h``; no logic lives here. The symbols are
looked up once, at import, in the library that ``llama_cpp`` loaded; a stock build lacks them and
importing this module raises :class:`~amslocal.errors.BackendMissingError`.
"""

from __future__ import annotations

import ctypes

from ..errors import BackendMissingError

try:
    import llama_cpp.llama_cpp as _llama
except Exception as exc:  # an import failure inside llama_cpp is reported the same way
    raise BackendMissingError(
        f"llama-cpp-python could not be imported ({exc.__class__.__name__}: {exc}); "
        "build the patched backend with: bash native/setup.sh"
    ) from None

_lib = _llama._lib

LLAMA_AMS_OBS_ATTN = 1 << 0
LLAMA_AMS_OBS_QUERIES = 1 << 1


class llama_ams_layer_info_t(ctypes.Structure):
    _fields_ = [
        ("cache", ctypes.c_int32),
        ("n_head", ctypes.c_int32),
        ("n_head_kv", ctypes.c_int32),
        ("n_embd_head_k", ctypes.c_int32),
        ("n_embd_head_v", ctypes.c_int32),
        ("n_rot", ctypes.c_int32),
        ("rope_type", ctypes.c_int32),
        ("n_swa", ctypes.c_int32),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("kq_scale", ctypes.c_float),
    ]


_ctx_p = ctypes.c_void_p
_f32_p = ctypes.POINTER(ctypes.c_float)
_i32_p = ctypes.POINTER(ctypes.c_int32)

# name -> (argtypes, restype)
_SIGNATURES = {
    "llama_ams_set_obs": ([_ctx_p, ctypes.c_int32, ctypes.c_uint32], None),
    "llama_ams_obs_n_tokens": ([_ctx_p], ctypes.c_int32),
    "llama_ams_obs_n_kv": ([_ctx_p, ctypes.c_int32], ctypes.c_int32),
    "llama_ams_get_attn": ([_ctx_p, ctypes.c_int32, _f32_p, ctypes.c_int64], ctypes.c_int64),
    # the destination is a void pointer so that the per-step capture can pass a plain address into
    # a preallocated buffer (a float pointer object costs more to build than the call itself)
    "llama_ams_get_queries": ([_ctx_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64),
    "llama_ams_get_queries_all": ([_ctx_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32),
    "llama_ams_get_layer_info": ([_ctx_p, ctypes.c_int32, ctypes.POINTER(llama_ams_layer_info_t)], ctypes.c_int32),
    "llama_ams_n_caches": ([_ctx_p], ctypes.c_int32),
    "llama_ams_cache_size": ([_ctx_p, ctypes.c_int32], ctypes.c_int32),
    "llama_ams_cell_pos": ([_ctx_p, ctypes.c_int32, ctypes.c_int32, _i32_p, ctypes.c_int32], ctypes.c_int32),
    "llama_ams_shift_pending": ([_ctx_p], ctypes.c_bool),
    "llama_ams_apply_shift": ([_ctx_p], ctypes.c_bool),
    "llama_ams_read_k": ([_ctx_p, ctypes.c_int32, _i32_p, ctypes.c_int32, _f32_p, ctypes.c_int64], ctypes.c_int64),
    "llama_ams_read_v": ([_ctx_p, ctypes.c_int32, _i32_p, ctypes.c_int32, _f32_p, ctypes.c_int64], ctypes.c_int64),
    # patch 0002: per-(layer, KV head) row moves
    "llama_ams_move_rows": ([_ctx_p, ctypes.c_int32, _i32_p, ctypes.c_int32, _i32_p, ctypes.c_int32], ctypes.c_int32),
    "llama_ams_shift_rows": ([_ctx_p, ctypes.c_int32, _i32_p, ctypes.c_int32], ctypes.c_int32),
    # patch 0004: whole-cell moves
    "llama_ams_move_cells": ([_ctx_p, ctypes.c_int32, _i32_p, _i32_p, ctypes.c_int32], ctypes.c_int32),
}

_missing = [name for name in _SIGNATURES if not hasattr(_lib, name)]
if _missing:
    raise BackendMissingError(
        f"the llama.cpp library loaded from {getattr(_lib, '_name', '?')} is a stock build "
        f"(missing {_missing[0]}); build the amslocal-patched backend with: bash native/setup.sh"
    )

for _name, (_args, _res) in _SIGNATURES.items():
    _fn = getattr(_lib, _name)
    _fn.argtypes = _args
    _fn.restype = _res

llama_ams_set_obs = _lib.llama_ams_set_obs
llama_ams_obs_n_tokens = _lib.llama_ams_obs_n_tokens
llama_ams_obs_n_kv = _lib.llama_ams_obs_n_kv
llama_ams_get_attn = _lib.llama_ams_get_attn
llama_ams_get_queries = _lib.llama_ams_get_queries
llama_ams_get_queries_all = _lib.llama_ams_get_queries_all
llama_ams_get_layer_info = _lib.llama_ams_get_layer_info
llama_ams_n_caches = _lib.llama_ams_n_caches
llama_ams_cache_size = _lib.llama_ams_cache_size
llama_ams_cell_pos = _lib.llama_ams_cell_pos
llama_ams_shift_pending = _lib.llama_ams_shift_pending
llama_ams_apply_shift = _lib.llama_ams_apply_shift
llama_ams_read_k = _lib.llama_ams_read_k
llama_ams_read_v = _lib.llama_ams_read_v
llama_ams_move_rows = _lib.llama_ams_move_rows
llama_ams_shift_rows = _lib.llama_ams_shift_rows
llama_ams_move_cells = _lib.llama_ams_move_cells
