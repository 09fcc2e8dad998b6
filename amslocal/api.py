"""The embeddable API: load a model once, open many chat sessions under a KV budget.

```python
from amslocal.api import Engine

with Engine("models/SmolLM2-135M-Instruct.Q4_1.gguf", n_threads=2) as engine:
    chat = engine.session(budget=512, scorer="tova", system="You are concise.", temperature=0)
    for piece in chat.chat("Name three rivers."):
        print(piece, end="", flush=True)
    print(chat.stats.compressions, chat.cells_used)
```

**Thread-safety.** An :class:`Engine` holds the model weights, which are read-only: it may serve
several sessions, from several threads, and :meth:`Engine.session` may be called from any thread.
Each session has its own llama.cpp context and is used by one thread at a time (a concurrent second
call raises :class:`~amslocal.chat.SessionBusyError` instead of corrupting it); ``cancel()`` is
safe from any thread at any time. ``Engine.close()`` closes its sessions before the weights.

Errors a caller can act on derive from :class:`~amslocal.errors.AmsError` and carry a one-line
message. Nothing here prints.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Optional, Union

from .backend import ContextParams, Model, SamplerParams
from .chat import ChatSession, TurnStats
from .errors import AmsError, ChatError, SaveFileError, SessionBusyError, TemplateError
from .models import load_model
from .select.ams import AMSParams
from .session import BudgetError, CompressionConfig, SessionStats
from .templates import ChatTemplate

__all__ = [
    "AmsError",
    "BudgetError",
    "ChatError",
    "ChatSession",
    "Engine",
    "SaveFileError",
    "SessionBusyError",
    "SessionStats",
    "TemplateError",
    "TurnStats",
]

RANDOM_SEED = 0xFFFFFFFF


class Engine:
    """A loaded model. Sessions made from it share its weights; each has its own KV cache."""

    def __init__(
        self,
        model_path: Union[str, os.PathLike, None] = None,
        *,
        n_threads: int = 0,
        n_gpu_layers: Optional[int] = None,
        flash_attn: str = "auto",
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        use_mmap: bool = True,
    ):
        """Load ``model_path`` (None: the default model), after checking the GGUF file.

        ``n_batch``/``n_ubatch``: the logical and physical batch of prompt decoding (llama.cpp's
        ``-b``/``-ub``; the micro-batch defaults to the batch); ``use_mmap`` False reads the weights
        into memory instead of mapping the file.

        ``n_threads`` 0 uses every core but one. ``n_gpu_layers``: layers offloaded to the GPU (-1 = all; None:
        $AMSLOCAL_N_GPU_LAYERS, else all on a GPU build). ``flash_attn`` is auto | on | off; a quantized V cache
        (``cache_type_v`` q8_0 / q4_0) needs it on. Raises :class:`AmsError` for a missing, damaged
        or unsupported model.
        """
        self.model: Model = load_model(model_path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
        self.n_threads = n_threads
        self.flash_attn = flash_attn
        self.cache_type_k = cache_type_k
        self.cache_type_v = cache_type_v
        self.n_batch = n_batch
        self.n_ubatch = n_batch if n_ubatch is None else min(n_ubatch, n_batch)
        self._lock = threading.Lock()
        self._closed = False
        self._sessions: "weakref.WeakSet[ChatSession]" = weakref.WeakSet()

    @property
    def model_path(self) -> str:
        return str(self.model.path)

    def session(
        self,
        *,
        budget: Optional[int] = 1024,
        interval: int = 128,
        scorer: str = "rkv",
        ams: Optional[bool] = None,
        ams_variant: str = "vote",
        question_aware: bool = True,
        positions: str = "keep",
        granularity: str = "auto",
        aggregation: str = "mean",
        system: Optional[str] = None,
        keep: int = 0,
        chat_template: Optional[str] = None,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        grammar: Optional[str] = None,
        seed: Optional[int] = None,
        max_tokens: int = 512,
        ctx_size: int = 2048,
        ams_params: Optional[AMSParams] = None,
    ) -> ChatSession:
        """A new chat session.

        ``budget``: KV cells kept after each compression (None: no compression, a ``ctx_size``
        cache). ``interval``: tokens between compressions. ``scorer``: tova, snapkv, h2o, streaming,
        keydiff, expected-attention, rkv or triattention (needs ``amslocal calibrate``). ``ams``:
        Adaptive Mass-Segmented selection (False: global top-k; None: AMS when the budget leaves
        at least 128 cells beyond the sinks and the recent window, else top-k); ``ams_variant``: mean (one mass
        curve), peaked (rows weighted by how peaked they are) or vote (per-row AMS with voting).
        ``question_aware``: a message compressed before its end is read is scored by the attention
        of its last tokens (decoded ahead, then removed).
        ``positions``: keep | compact. ``granularity``: token (one token set for every layer and
        head), layer, head (each (layer, KV head) keeps its own tokens in the same cells), or auto
        (head where the model and scorer allow it, else token).
        ``system``: the system prompt (never evicted). ``keep``: as llama.cpp's ``--keep``, the
        first tokens of the conversation's first message are never evicted either (-1: all of
        it; the system prompt counts apart). ``chat_template``: jinja text or "chatml"
        instead of the model's own. ``temperature`` 0 is greedy; with a ``seed`` every reply is
        reproducible, also after ``load``. ``grammar``: GBNF text (a ``root`` rule) that every reply
        must follow (:mod:`amslocal.grammar` turns a JSON schema into one). ``max_tokens``: the
        default reply length.

        The returned :class:`~amslocal.chat.ChatSession` offers ``chat(messages_or_text)``,
        ``generate(prompt)``, ``cancel()``, ``save(path)``, ``load(path)``, ``clear()``,
        ``set_budget(n)``, ``set_scorer(name)``, ``stats``, ``last_turn`` and ``messages``.
        """
        if self._closed:
            raise AmsError("the engine is closed")
        config = CompressionConfig(
            budget=budget,
            interval=interval,
            scorer=scorer,
            ams=ams,
            ams_variant=ams_variant,
            question_aware=question_aware,
            positions=positions,
            granularity=granularity,
            aggregation=aggregation,
            ams_params=ams_params or AMSParams(),
        ).validate()
        n_ctx = ctx_size
        ctx_params = ContextParams(
            n_ctx=n_ctx,
            n_batch=min(self.n_batch, n_ctx),
            n_ubatch=min(self.n_ubatch, n_ctx),
            n_threads=self.n_threads,
            flash_attn=self.flash_attn,
            type_k=self.cache_type_k,
            type_v=self.cache_type_v,
        )
        sampler_params = SamplerParams(
            temp=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            grammar=grammar or None,
            seed=RANDOM_SEED if seed is None else int(seed) & 0xFFFFFFFF,
        )
        template = ChatTemplate.for_model(self.model, chat_template)
        with self._lock:  # contexts are made one at a time; decoding in them runs in parallel
            session = ChatSession(
                self.model,
                config,
                ctx_params,
                sampler_params,
                system=system,
                template=template,
                max_tokens=max_tokens,
                keep=keep,
            )
            self._sessions.add(session)
            return session

    def close(self) -> None:
        """Close every session made here, then free the model weights. Replies in progress in other
        threads are cancelled and waited for (see :meth:`ChatSession.close`); a session used after
        this raises :class:`ChatError`."""
        with self._lock:
            self._closed = True
            for session in list(self._sessions):
                session.close()
            self.model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
