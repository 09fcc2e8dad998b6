"""``amslocal serve``: an OpenAI-compatible HTTP server whose conversations live in bounded caches.

Needs the ``server`` extra (FastAPI and uvicorn): ``pip install 'amslocal[server]'``.
"""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):  # FastAPI is imported only when the server is used
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
