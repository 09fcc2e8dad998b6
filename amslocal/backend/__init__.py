"""The bridge to the patched llama.cpp: raw ``llama_ams_*`` bindings and owned handles.

Importing this package checks, once, that the loaded library is the amslocal-patched build.
"""

from . import _ams_raw as ams
from ._ams_raw import LLAMA_AMS_OBS_ATTN, LLAMA_AMS_OBS_QUERIES
from .handles import (
    FLASH_ATTN,
    KV_TYPES,
    Batch,
    Context,
    ContextParams,
    Model,
    Sampler,
    SamplerParams,
    library_info,
    set_llama_log,
)

__all__ = [
    "ams",
    "LLAMA_AMS_OBS_ATTN",
    "LLAMA_AMS_OBS_QUERIES",
    "FLASH_ATTN",
    "KV_TYPES",
    "Batch",
    "Context",
    "ContextParams",
    "Model",
    "Sampler",
    "SamplerParams",
    "library_info",
    "set_llama_log",
]
