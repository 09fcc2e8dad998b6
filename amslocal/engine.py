"""The decode loop: tokens in, tokens out, on sequence 0 of a llama.cpp context.

llama-cpp-python's high-level ``Llama`` assumes dense positions; this loop does not. It asks
llama.cpp where the sequence ends (``pos_max + 1``) before every batch, so it keeps working after
positions were removed (:meth:`Generator.evict`) or shifted (:meth:`Generator.compact`). It also
remembers which token sits at each live position, so a caller can rebuild the kept text.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Iterator, Sequence

import numpy as np

from .backend import Batch, Context, ContextParams, Model, Sampler, SamplerParams
from .cache import CacheView
from .errors import CacheError


def position_runs(positions: Iterable[int]) -> list[tuple[int, int]]:
    """Merge positions into maximal half-open runs [p0, p1), sorted."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(int(p) for p in positions)):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def compaction_shifts(positions: Sequence[int], start: int = 0) -> list[tuple[int, int, int]]:
    """Shifts (p0, p1, delta) that move sorted ``positions`` onto start, start+1, ...

    Positions that need the same delta and are adjacent share one shift. Applied in order, no
    shifted range can land inside a later one, because every delta is <= 0 and ranges ascend.
    """
    shifts: list[tuple[int, int, int]] = []
    for i, p in enumerate(sorted(int(p) for p in positions)):
        delta = start + i - p
        if shifts and shifts[-1][1] == p and shifts[-1][2] == delta:
            shifts[-1] = (shifts[-1][0], p + 1, delta)
        else:
            shifts.append((p, p + 1, delta))
    return [s for s in shifts if s[2] != 0]


class TextStream:
    """Turns token bytes into text without splitting UTF-8 sequences across tokens."""

    def __init__(self, model: Model):
        self.model = model
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self.model.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class Generator:
    """Own decode loop over one context; the truth about the cache comes from llama.cpp."""

    def __init__(
        self, model: Model, ctx_params: ContextParams = ContextParams(), sampler_params: SamplerParams = SamplerParams()
    ):
        self.model = model
        self.ctx = Context(model, ctx_params)
        self.view = CacheView(self.ctx)
        self.batch = Batch(ctx_params.n_batch)
        self.sampler = Sampler(sampler_params, model.n_vocab, model.vocab)
        self.tokens_at: dict[int, int] = {}  # live position -> token id

    # --- state ----------------------------------------------------------------------------

    @property
    def next_pos(self) -> int:
        """Where the next token goes: one past the largest live position."""
        return self.ctx.seq_pos_max() + 1

    def kept_tokens(self) -> tuple[list[int], list[int]]:
        """(positions, tokens) of the live tokens, in position order."""
        pos = sorted(self.tokens_at)
        return pos, [self.tokens_at[p] for p in pos]

    def reset(self) -> None:
        self.ctx.clear()
        self.tokens_at.clear()
        self.view.reset_evidence()

    # --- decoding ---------------------------------------------------------------------------

    def eval(
        self, tokens: Sequence[int], positions: Sequence[int] | None = None, *, logits_all: bool = False
    ) -> np.ndarray | None:
        """Decode ``tokens`` at ``positions`` (default: after the last live position).

        The batch is cut into chunks of ``n_batch``; logits are kept for the last token only, or,
        with ``logits_all``, for every token and returned as [len(tokens), n_vocab] (teacher
        forcing: one batch instead of one decode per token).
        When the cache view observes, evidence is collected after every chunk.
        """
        if not tokens:
            return np.zeros((0, self.model.n_vocab), dtype=np.float32) if logits_all else None
        rows: list[np.ndarray] = []
        if positions is None:
            start = self.next_pos
            positions = range(start, start + len(tokens))
        n_batch = self.batch.capacity
        for i in range(0, len(tokens), n_batch):
            chunk = list(tokens[i : i + n_batch])
            pchunk = list(positions[i : i + n_batch])
            self.batch.set(chunk, pchunk, logits_last=True, logits_all=logits_all)
            self.ctx.decode(self.batch)
            if logits_all:
                rows.append(self.ctx.logits_all(len(chunk)))
            for p, t in zip(pchunk, chunk):
                self.tokens_at[p] = t
            if self.view.n_obs:
                self.view.collect(pchunk)
            else:
                self.view.unobserved_decode()
        return np.concatenate(rows) if logits_all else None

    def sample(self) -> int:
        return self.sampler.sample(self.ctx, -1)

    def generate(self, prompt: Sequence[int], max_tokens: int, *, ignore_eos: bool = False) -> Iterator[int]:
        """Prefill ``prompt`` then yield up to ``max_tokens`` sampled tokens."""
        self.eval(prompt)
        for _ in range(max_tokens):
            tok = self.sample()
            if self.model.is_eog(tok) and not ignore_eos:
                return
            yield tok
            self.eval([tok])

    # --- eviction and compaction ------------------------------------------------------------

    def evict(self, positions: Iterable[int]) -> int:
        """Remove ``positions`` from the cache (adjacent ones in one ``seq_rm``); returns runs."""
        self.view.settle()  # logged queries saw these cells (event-mode evidence)
        runs = position_runs(positions)
        for p0, p1 in runs:
            if not self.ctx.seq_rm(p0, p1):
                raise CacheError(f"llama_memory_seq_rm refused [{p0}, {p1})")
            for p in range(p0, p1):
                self.tokens_at.pop(p, None)
        return len(runs)

    def compact(self, start: int = 0) -> int:
        """Shift the live positions onto start, start+1, ... (dense); returns the shifts issued.

        All shifts are issued before the next decode, which re-rotates K once for all of them.
        """
        if not self.ctx.can_shift():
            raise CacheError("this model's cache cannot shift positions")
        self.view.settle()  # logged queries saw the old positions (event-mode evidence)
        pos, toks = self.kept_tokens()
        shifts = compaction_shifts(pos, start)
        for p0, p1, delta in shifts:
            self.ctx.seq_add(p0, p1, delta)
        self.tokens_at = {start + i: t for i, t in enumerate(toks)}
        self.view.positions_shifted()  # same tokens in the same cells: their evidence stays
        return len(shifts)
