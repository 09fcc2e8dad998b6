"""Finding, checking and loading the model file, and checking what a user asks of it.

``resolve_model`` turns a user's path (or nothing) into a checked GGUF path; ``load_model`` loads it
with the patched backend and refuses models whose state is not a KV cache amslocal can compress.

The ``check_*`` functions turn every bad request into one :class:`~amslocal.errors.AmsError` line
before anything native runs: a model whose cache cannot be compressed
(:func:`check_compressible`, from the GGUF header), a budget that cannot work
(:func:`check_budget`), an unknown scorer (:func:`check_scorer`), an unreadable text file
(:func:`read_text_file`); :func:`check_request` does them all at once. None of them imports the
native backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from .config import DEFAULT_KEEP_LAST, DEFAULT_N_SINK, check_budget, check_scorer
from .errors import BudgetError, InputError, ModelError, OptionError, UnsupportedModelError
from .gguf_check import validate_gguf

if TYPE_CHECKING:  # the backend is imported lazily: it fails on a stock llama.cpp build
    from .backend import Model

__all__ = [
    "DEFAULT_MODEL_FILENAME",
    "PROJECT_ROOT",
    "BudgetError",
    "InputError",
    "OptionError",
    "DEFAULT_N_SINK",
    "DEFAULT_KEEP_LAST",
    "check_budget",
    "check_compressible",
    "check_request",
    "check_scorer",
    "default_model_path",
    "load_model",
    "locate_model",
    "read_text_file",
    "resolve_model",
]

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # same name as models/fetch.py fetches
PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_ENV = "AMSLOCAL_MODEL"


def default_model_path() -> Path:
    """``$AMSLOCAL_MODEL`` if set, else ``<project root>/models/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    env = os.environ.get(MODEL_ENV)
    return Path(env).expanduser() if env else PROJECT_ROOT / "models" / DEFAULT_MODEL_FILENAME


def locate_model(path: str | os.PathLike[str] | None = None) -> Path:
    """``path`` (user-expanded), or the default model, which must exist; the file is not checked."""
    if path is None:
        resolved = default_model_path()
        if not resolved.exists():
            source = f" (from ${MODEL_ENV})" if os.environ.get(MODEL_ENV) else ""
            raise ModelError(f"default model not found at {resolved}{source}; fetch it with: python models/fetch.py")
        return resolved
    return Path(path).expanduser()


def resolve_model(path: str | os.PathLike[str] | None = None) -> Path:
    """The model to use: ``path``, or the default model when ``path`` is None; validated as GGUF."""
    resolved = locate_model(path)
    validate_gguf(resolved)
    return resolved


# --- what can be asked of a model ---------------------------------------------------------------

ModelLike = Union[str, "os.PathLike[str]", "Model", Mapping[str, Any]]


def _info_of(model: ModelLike) -> dict:
    """The :func:`amslocal.info.model_info` facts of a path, a loaded Model, or facts already read."""
    from .info import model_info

    if isinstance(model, Mapping):
        return dict(model)
    path = getattr(model, "path", model)  # a loaded backend Model knows its file
    return model_info(locate_model(path))


def check_compressible(model: ModelLike, *, positions: Optional[str] = None) -> dict:
    """The model's facts if amslocal can keep its cache inside a budget; else UnsupportedModelError.

    ``model`` is a path, a loaded :class:`~amslocal.backend.Model`, or a ``model_info`` dict. With
    ``positions`` ("keep" or "compact") the mode is checked too: M-RoPE caches cannot be shifted.
    The reason comes from the GGUF header (recurrent, hybrid, MLA latent cache, ...), see
    :func:`amslocal.info.model_info`.
    """
    info = _info_of(model)
    name = Path(info["path"]).name
    comp = info["compression"]
    if not comp["supported"]:
        raise UnsupportedModelError(f"{name} cannot be compressed: {comp['reason']}")
    if positions is not None and positions not in comp["positions"]:
        raise UnsupportedModelError(
            f"{name}: --positions {positions} is not possible ({comp['reason']}); use --positions keep"
        )
    return info


def read_text_file(path: str | os.PathLike[str], what: str = "prompt file") -> str:
    """The UTF-8 text of ``path``; :class:`InputError` (one line) if it is missing, a directory,
    unreadable or not UTF-8. ``what`` names the file in the message."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def check_request(
    model: str | os.PathLike[str] | None = None,
    *,
    budget: Any = None,
    scorer: Optional[str] = None,
    positions: Optional[str] = None,
    n_sink: int = DEFAULT_N_SINK,
    keep_last: int = DEFAULT_KEEP_LAST,
) -> dict:
    """Every check before a run, from the header alone; returns the model's facts.

    The file must be a valid GGUF (ModelError); with a ``budget`` the cache must be compressible
    (UnsupportedModelError) and the budget must fit (BudgetError: not positive, below
    ``n_sink + keep_last + 1``, above the trained context); a ``scorer`` must exist (OptionError).
    """
    from .info import model_info

    if scorer is not None:
        check_scorer(scorer)
    if budget is not None:
        # the budget's own bounds first: they do not depend on the model
        check_budget(budget, n_sink=n_sink, keep_last=keep_last)
    info = model_info(locate_model(model))
    if budget is not None:
        check_compressible(info, positions=positions)
        check_budget(budget, info["n_ctx_train"], n_sink=n_sink, keep_last=keep_last)
    return info


# --- loading ------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    n_gpu_layers: Optional[int] = None,
    validate: bool = True,
    compress: bool = False,
    use_mmap: bool = True,
) -> "Model":
    """Resolve, validate and load a model that amslocal can serve.

    Raises :class:`ModelError` for a bad file, :class:`UnsupportedModelError` for a recurrent or
    hybrid model (its per-sequence state is not a cache of token positions that can be evicted), and
    :class:`~amslocal.errors.BackendMissingError` when the patched backend is not installed.
    ``validate=False`` skips the file check for a ``path`` that :func:`resolve_model` returned.
    ``compress=True`` (a budget will be asked for) first checks from the header that the cache can be
    compressed (:func:`check_compressible`), so the reason is given before llama.cpp loads anything.
    """
    resolved = resolve_model(path) if validate or path is None else Path(path)
    if compress:
        check_compressible(resolved)
    from .backend import Model  # lazy: importing the backend checks for the patched library

    model = Model(resolved, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
    if model.is_recurrent():
        arch = model.arch
        model.close()
        raise UnsupportedModelError(
            f"{resolved.name}: architecture '{arch}' is recurrent or hybrid; its state is not a "
            "per-token KV cache, so amslocal cannot compress it"
        )
    return model
