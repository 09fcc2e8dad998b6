"""Errors a user can act on.

Every exception that derives from :class:`AmsError` carries a message that fits on one line and says
what went wrong and how to fix it. The CLI prints that line and exits non-zero; library users catch
``AmsError``.
"""

from __future__ import annotations

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
EXIT_TERMINATED = 143  # 128 + SIGTERM


class AmsError(Exception):
    """Base class: a problem with the input or the installation, described in one line."""

    exit_code = 1


class BackendMissingError(AmsError):
    """The llama_cpp library loaded is not the amslocal-patched build."""

    exit_code = 3


class ModelError(AmsError):
    """The model file is missing, not GGUF, damaged, or cannot be loaded."""

    exit_code = 2


class UnsupportedModelError(ModelError):
    """The model loads, but its cache cannot be observed or compressed."""


class DecodeError(AmsError):
    """llama_decode failed (out of KV cells, allocation failure, abort)."""

    exit_code = 4


class CacheError(AmsError):
    """llama.cpp refused an operation on the KV cache (remove, shift, move or read cells)."""

    exit_code = 4


class OptionError(AmsError):
    """An option (CLI flag or API argument) that cannot work with this model."""

    exit_code = 2


class BudgetError(OptionError):
    """A budget that cannot work (not positive, too small for the protected tokens, above the
    trained context)."""


class InputError(AmsError):
    """A text file the user named cannot be read."""


class ChatError(AmsError):
    """A chat request that cannot be served (bad messages, a full context, a wrong mode)."""


class ContextFullError(ChatError):
    """A message does not fit the free cells of a session without a budget."""


class TemplateError(ChatError):
    """The chat template does not compile or refuses the conversation."""


class SaveFileError(AmsError):
    """A save file that is unreadable, damaged, of another format, or of another model."""

    exit_code = 2


class SessionBusyError(ChatError):
    """The session is serving another call (a session is used by one thread at a time)."""


class UnknownScorerError(OptionError, ChatError, ValueError):
    """A scorer name that is not registered. One type wherever the name comes from (a CLI flag, the
    API, a chat's /scorer, the scorer registry): an :class:`OptionError` (exit code 2), a
    :class:`ChatError` for chat callers and a ``ValueError`` for the registry's."""
