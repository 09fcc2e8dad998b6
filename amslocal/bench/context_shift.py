"""llama.cpp's context shift, the baseline every compressor must beat at the same memory.

When the next token does not fit, llama.cpp (``llama-cli``/``llama-server`` with context shift on)
keeps the first ``n_keep`` tokens, discards half of the rest — the oldest half — and shifts the
survivors down so that positions stay dense. Here the same rule runs on this project's decode loop
with a logical limit of ``n_ctx`` cells (the real context is rounded up to 256 by llama.cpp, so the
limit is kept here rather than by the context).
"""

from __future__ import annotations

import time
from typing import Iterator, Optional, Sequence

import numpy as np

from ..backend import ContextParams, Model, SamplerParams
from ..engine import Generator
from ..errors import AmsError


class ContextShiftSession:
    """One sequence in at most ``n_ctx`` cells, shifted the way llama.cpp shifts a full context."""

    def __init__(
        self,
        model: Model,
        n_ctx: int,
        n_keep: int = 0,
        ctx_params: ContextParams = ContextParams(),
        sampler_params: SamplerParams = SamplerParams(),
    ):
        if n_ctx < 2:
            raise AmsError(f"context shift needs at least 2 cells (got {n_ctx})")
        # llama-cli keeps the BOS token on top of n_keep when the model adds one
        self.n_keep = min(max(0, n_keep) + int(model.add_bos), n_ctx - 1)
        self.n_ctx = n_ctx
        self.model = model
        params = ContextParams(
            **{
                **ctx_params.__dict__,
                "n_ctx": n_ctx,
                "n_batch": min(ctx_params.n_batch, n_ctx),
                "n_ubatch": min(ctx_params.n_ubatch, n_ctx),
            }
        )
        self.gen = Generator(model, params, sampler_params)
        if not self.gen.ctx.can_shift():
            raise AmsError(
                f"{model.arch}: this model's cache cannot shift positions, so llama.cpp's context shift "
                "cannot run on it"
            )
        self.shifts = 0
        self.evicted_tokens = 0
        self.decode_s = 0.0

    @property
    def n_occupied(self) -> int:
        return len(self.gen.tokens_at)

    def shift(self) -> None:
        """Discard the older half of the tokens after ``n_keep``; the rest move down (dense positions)."""
        pos, _ = self.gen.kept_tokens()
        n_left = len(pos) - self.n_keep
        n_discard = max(1, n_left // 2)
        gone = pos[self.n_keep : self.n_keep + n_discard]
        self.gen.evict(gone)
        self.gen.compact()
        self.shifts += 1
        self.evicted_tokens += len(gone)

    def feed(self, tokens: Sequence[int], *, logits: bool = False) -> Optional[np.ndarray]:
        """Add tokens, shifting whenever the context is full (a long prompt goes through in pieces);
        with ``logits`` returns the logits after every token, as :meth:`Session.feed`."""
        tokens = list(tokens)
        rows = []
        i = 0
        while i < len(tokens):
            room = self.n_ctx - self.n_occupied
            if room <= 0:
                self.shift()
                continue
            n = min(room, self.gen.batch.capacity, len(tokens) - i)
            rows.append(self.gen.eval(tokens[i : i + n], logits_all=logits))
            i += n
        if not logits:
            return None
        return np.concatenate(rows) if rows else np.zeros((0, self.model.n_vocab), dtype=np.float32)

    def generate(self, prompt: Sequence[int], max_tokens: int, *, ignore_eos: bool = False) -> Iterator[int]:
        """Feed ``prompt``, then yield up to ``max_tokens`` tokens, as :meth:`Session.generate`."""
        self.feed(prompt)
        for _ in range(max_tokens):
            t0 = time.perf_counter()
            tok = self.gen.sample()
            if self.model.is_eog(tok) and not ignore_eos:
                return
            if self.n_occupied >= self.n_ctx:
                self.shift()
            self.gen.eval([tok])
            self.decode_s += time.perf_counter() - t0
            yield tok
