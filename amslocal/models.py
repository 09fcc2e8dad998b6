"""Finding, checking and loading the model file.

``resolve_model`` turns a user's path (or nothing) into a checked GGUF path; ``load_model`` loads it
with the patched backend and refuses models whose state is not a KV cache amslocal can compress.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError, UnsupportedModelError
from .gguf_check import validate_gguf

if TYPE_CHECKING:  # the backend is imported lazily: it fails on a stock llama.cpp build
    from .backend import Model

__all__ = ["DEFAULT_MODEL_FILENAME", "PROJECT_ROOT", "default_model_path", "load_model", "resolve_model"]

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # same name as models/fetch.py fetches
PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_ENV = "AMSLOCAL_MODEL"


def default_model_path() -> Path:
    """``$AMSLOCAL_MODEL`` if set, else ``<project root>/models/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    env = os.environ.get(MODEL_ENV)
    return Path(env).expanduser() if env else PROJECT_ROOT / "models" / DEFAULT_MODEL_FILENAME


def resolve_model(path: str | os.PathLike[str] | None = None) -> Path:
    """The model to use: ``path``, or the default model when ``path`` is None; validated as GGUF."""
    if path is None:
        resolved = default_model_path()
        if not resolved.exists():
            source = f" (from ${MODEL_ENV})" if os.environ.get(MODEL_ENV) else ""
            raise ModelError(
                f"default model not found at {resolved}{source}; fetch it with: python models/fetch.py"
            )
    else:
        resolved = Path(path).expanduser()
    validate_gguf(resolved)
    return resolved


def load_model(path: str | os.PathLike[str] | None = None, *, n_gpu_layers: int = 0,
               validate: bool = True) -> "Model":
    """Resolve, validate and load a model that amslocal can serve.

    Raises :class:`ModelError` for a bad file, :class:`UnsupportedModelError` for a recurrent or
    hybrid model (its per-sequence state is not a cache of token positions that can be evicted), and
    :class:`~amslocal.errors.BackendMissingError` when the patched backend is not installed.
    ``validate=False`` skips the file check for a ``path`` that :func:`resolve_model` returned.
    """
    resolved = resolve_model(path) if validate or path is None else Path(path)
    from .backend import Model  # lazy: importing the backend checks for the patched library

    model = Model(resolved, n_gpu_layers=n_gpu_layers)
    if model.is_recurrent():
        arch = model.arch
        model.close()
        raise UnsupportedModelError(
            f"{resolved.name}: architecture '{arch}' is recurrent or hybrid; its state is not a "
            "per-token KV cache, so amslocal cannot compress it"
        )
    return model
