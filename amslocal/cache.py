"""The cache view: what the KV cache holds, read from llama.cpp, and the evidence gathered on it.

llama.cpp owns the truth: its cells never move by themselves, a freed cell is reused, and a cell
holds one token for every layer and KV head. This view reads the cell -> position map straight from
the patched library, keeps per-cell attention evidence accumulated over the observed decode steps
(zeroed when a cell changes hands), keeps the last observed queries, and reads K/V rows. Scorers
and selectors work on what this view gives them; they never call llama.cpp themselves. The view
also moves what the patches let it move, carrying the evidence along: K/V rows between cells
(:meth:`CacheView.move_rows`, per-row token sets) and whole cells (:meth:`CacheView.move_cells`,
token sets packing their kept tokens).

Evidence comes one of two ways (:attr:`CacheView.evidence_mode`):

- ``"event"`` (the default where it is exact): an observed decode step only captures its queries
  (post-RoPE, one copy per layer); the attention they paid is computed on the host when someone
  reads the evidence (:meth:`CacheView.settle`), usually once per compression event. Between events
  no cell leaves the cache and new tokens only arrive at larger positions, so the keys and the
  causal mask are still the ones each query saw. Everything that removes or moves cells settles
  first (the engine's evict/compact, row moves and shifts).
- ``"step"``: the patch's side branch computes every observed step's attention inside the graph.
  Kept for models whose attention the host does not rebuild (logit soft-capping, attention sinks,
  ALiBi, chunked or symmetric windows) and as the reference the event path is tested against.
"""

from __future__ import annotations

import ctypes
import time
from typing import Sequence

import numpy as np

from .backend import LLAMA_AMS_OBS_ATTN, LLAMA_AMS_OBS_QUERIES, Context, ams
from .errors import CacheError
from .evidence import add_block_sums, carry_columns, layer_query_sums
from .layers import LayerInfo

EVIDENCE_MODES = ("event", "step")

# Architectures whose attention is more than softmax(scale * q.k) under a causal (or standard
# sliding-window) mask, per llama.cpp's graph: logit soft-capping (gemma2), attention sinks
# (gpt-oss and others), chunked or symmetric windows. They keep the in-graph side branch.
_STEP_ONLY_ARCHS = frozenset(
    {
        "gemma2",
        "grok",
        "llama4",
        "gemma-embedding",
        "modern-bert",
        "gpt-oss",
        "openai-moe",
        "mimo2",
        "deepseek4",
        "hunyuan-v4",
        "hy-v4",
        "granite-swa",
        "dflash",
    }
)

# the query log settles on its own past this many queries (bounded memory without events)
_LOG_LIMIT = 1024


def _row_tables(addr: np.ndarray, n_rows: int, row_floats: np.ndarray, rows: np.ndarray | None = None) -> tuple:
    """For buffers at ``addr`` [n_layer] (0 = none) of ``rows`` rows each (default ``n_rows``) and
    ``row_floats`` floats per row: [n_rows, n_layer] tables of where row r of each starts and how
    many floats fit from there (0 where there is no buffer), as llama_ams_get_queries_all takes them."""
    r = np.arange(n_rows, dtype=np.int64)[:, None]
    rows = np.full(addr.shape, n_rows, dtype=np.int64) if rows is None else rows
    dst = np.where(addr > 0, addr + r * 4 * row_floats, 0).astype(np.int64)
    room = np.where(addr > 0, (rows - r) * row_floats, 0).astype(np.int64)
    return np.ascontiguousarray(dst), np.ascontiguousarray(room)


def _table_addresses(tables: tuple) -> tuple[int, int, int]:
    """(address of the destinations, of the rooms, bytes from one row of them to the next)."""
    dst, room = tables
    return dst.ctypes.data, room.ctypes.data, dst.strides[0]


def _put_tail(buf: np.ndarray, at: int, positions, n: int) -> None:
    """buf[at : at + n] = the last ``n`` of ``positions`` (one decoded token: one item set)."""
    if n == 1:
        buf[at] = positions[-1]
    else:
        buf[at : at + n] = np.asarray(positions)[len(positions) - n :]


class CacheView:
    """Cells, positions, evidence and K/V reads of sequence 0 of a context."""

    def __init__(self, ctx: Context, evidence_mode: str | None = None):
        self.ctx = ctx
        self.n_layer = ctx.model.n_layer
        self.n_caches = int(ams.llama_ams_n_caches(ctx.ptr))
        self.cache_sizes = [int(ams.llama_ams_cache_size(ctx.ptr, c)) for c in range(self.n_caches)]
        self.layers = [self._layer_info(il) for il in range(self.n_layer)]
        self.kv_layers = [il for il, li in enumerate(self.layers) if li.cache >= 0]
        self._head_stride = max(li.n_head_kv for li in self.layers)  # row moves/shifts index heads by it
        # floats of one token's queries per layer (0 for layers without KV)
        self._q_row_floats = np.array(
            [li.n_head * li.n_embd_head_k if li.cache >= 0 else 0 for li in self.layers], dtype=np.int64
        )
        self._pos_buf = [np.empty(size, dtype=np.int32) for size in self.cache_sizes]
        self._read_memo: dict[tuple[bool, int], tuple[int, np.ndarray, np.ndarray]] = {}
        self.n_obs = 0
        self.obs_flags = 0
        self.q_window = 1  # the query ring keeps the last q_window observed queries
        # controller overhead: reading evidence back or capturing queries after observed decodes
        # (and settling the log when it fills up there); settling on demand, mostly inside events
        self.collect_s = 0.0
        self.settle_s = 0.0
        self.tracked = list(self.kv_layers)  # layers whose evidence is kept (event mode computes only these)
        self.evidence_mode = "step"
        self._alloc_ring()
        self.reset_evidence()
        self.set_evidence_mode(evidence_mode or self.default_evidence_mode())

    def default_evidence_mode(self) -> str:
        """``"event"`` where the host rebuilds llama.cpp's attention exactly, else ``"step"``."""
        arch = self.ctx.model.arch
        if arch in _STEP_ONLY_ARCHS or any(self.layers[il].n_rot == 0 for il in self.kv_layers):
            return "step"  # no RoPE: possibly ALiBi, whose bias the host does not add
        return "event"

    def set_evidence_mode(self, mode: str) -> None:
        """Switch how evidence is gathered (``"event"`` or ``"step"``); what was gathered stays."""
        if mode not in EVIDENCE_MODES:
            raise ValueError(f"evidence mode must be one of {', '.join(EVIDENCE_MODES)} (got {mode!r})")
        self.settle()
        self.evidence_mode = mode
        if self.n_obs:
            self.ctx.set_obs(self.n_obs, self._native_flags())

    def track(self, layers: list[int]) -> None:
        """Keep evidence for ``layers`` only (a session scores the full-attention cache's layers).

        In event mode untracked layers cost nothing; a tracked layer of a sliding-window cache is
        settled after every observed decode, because that cache reuses cells within a window."""
        self.settle()
        self.tracked = [il for il in self.kv_layers if il in set(layers)]

    def _layer_info(self, il: int) -> LayerInfo:
        info = ams.llama_ams_layer_info_t()
        if ams.llama_ams_get_layer_info(self.ctx.ptr, il, ctypes.byref(info)) != 0:
            raise ValueError(f"no layer {il}")
        return LayerInfo(
            info.cache,
            info.n_head,
            info.n_head_kv,
            info.n_embd_head_k,
            info.n_embd_head_v,
            info.n_rot,
            info.rope_type,
            info.n_swa,
            info.rope_freq_base,
            info.rope_freq_scale,
        )

    def kq_scale(self, il: int) -> float:
        """The softmax scale llama.cpp used for layer ``il`` in the last observed graph."""
        info = ams.llama_ams_layer_info_t()
        ams.llama_ams_get_layer_info(self.ctx.ptr, il, ctypes.byref(info))
        return float(info.kq_scale)

    # --- cells and positions ----------------------------------------------------------------

    def cell_pos(self, cache: int = 0) -> np.ndarray:
        """Position held in each cell of ``cache`` (-1 = empty). A fresh array."""
        buf = self._pos_buf[cache]
        n = ams.llama_ams_cell_pos(self.ctx.ptr, cache, 0, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), buf.size)
        if n != buf.size:
            raise CacheError("llama_ams_cell_pos failed")
        return buf.copy()

    def occupied(self, cache: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(cells, positions) of the occupied cells, sorted by position."""
        pos = self.cell_pos(cache)
        cells = np.flatnonzero(pos >= 0).astype(np.int32)
        order = np.argsort(pos[cells], kind="stable")
        return cells[order], pos[cells[order]]

    def n_occupied(self, cache: int = 0) -> int:
        return int(np.count_nonzero(self.cell_pos(cache) >= 0))

    # --- K / V reads ------------------------------------------------------------------------

    def _apply_pending_shift(self) -> None:
        """K reads and row moves/shifts need the keys rotated as the cells say: apply a pending
        ``seq_add`` shift now, as the next decode would."""
        self.ctx.apply_pending_shift()

    def _read(self, fn, il: int, cells: np.ndarray, head_dim: int, out: np.ndarray | None = None) -> np.ndarray:
        li = self.layers[il]
        cells = np.ascontiguousarray(cells, dtype=np.int32)
        self._apply_pending_shift()
        # one event reads a layer's keys twice at most (the evidence, then a scorer): the second
        # time they come from here, as long as nothing changed the cache in between
        key = (fn is ams.llama_ams_read_k, il)
        hit = self._read_memo.get(key)
        if hit is not None and hit[0] == self.ctx.version and np.array_equal(hit[1], cells):
            if out is None:
                return hit[2]
            out[...] = hit[2]
            return out
        if out is None:
            out = np.empty((cells.size, li.n_head_kv, head_dim), dtype=np.float32)
        n = fn(
            self.ctx.ptr,
            il,
            cells.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            cells.size,
            out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            out.size,
        )
        if n != out.size:
            raise CacheError(f"reading layer {il} of the KV cache failed (code {n})")
        out.flags.writeable = False  # shared with the next reader of the same rows
        self._read_memo[key] = (self.ctx.version, cells, out)
        return out

    def read_k(self, il: int, cells: np.ndarray) -> np.ndarray:
        """Keys of layer ``il`` at ``cells``: [n, n_head_kv, head_dim] f32, post-RoPE, un-rotated."""
        return self._read(ams.llama_ams_read_k, il, cells, self.layers[il].n_embd_head_k)

    def read_k_layers(self, layers: Sequence[int], cells: np.ndarray) -> np.ndarray:
        """Keys of ``layers`` (one KV shape) at ``cells`` in one array: [len(layers), n, n_head_kv,
        head_dim] f32. Each layer's slice also answers a later :meth:`read_k` of the same cells."""
        li = self.layers[layers[0]]
        cells = np.ascontiguousarray(cells, dtype=np.int32)
        out = np.empty((len(layers), cells.size, li.n_head_kv, li.n_embd_head_k), dtype=np.float32)
        for j, il in enumerate(layers):
            self._read(ams.llama_ams_read_k, il, cells, li.n_embd_head_k, out[j])
        return out

    def read_v(self, il: int, cells: np.ndarray) -> np.ndarray:
        """Values of layer ``il`` at ``cells``: [n, n_head_kv, head_dim] f32."""
        return self._read(ams.llama_ams_read_v, il, cells, self.layers[il].n_embd_head_v)

    # --- per-row token sets (patch 0002) -------------------------------------------------------
    # In per-head or per-layer mode a cell keeps one position (its label: what the mask and
    # seq_rm see) while each (layer, KV head) row of it may hold another token's K/V, moved there
    # by :meth:`move_rows`. The row map says which: row_pos[l, h, cell] is the position of the
    # token whose K/V row (l, h) of the cell holds. A cell whose label changed since the map last
    # saw it got a new token in every row (llama.cpp wrote it), so its rows read as the label.

    def _row_map(self, layers: list[int]) -> np.ndarray:
        h = self.layers[layers[0]].n_head_kv
        if any(self.layers[il].n_head_kv != h or self.layers[il].cache != 0 for il in layers):
            raise ValueError("per-row token sets need one KV head count on layers of the base cache")
        if self._rows_layers != layers:
            self._rows_layers = list(layers)
            self._row_pos = np.full((len(layers), h, self.cache_sizes[0]), -1, dtype=np.int64)
            self._row_label = np.full(self.cache_sizes[0], -1, dtype=np.int64)
        pos = self.cell_pos(0).astype(np.int64)
        fresh = pos != self._row_label
        if fresh.any():
            self._row_pos[:, :, fresh] = pos[fresh]
            self._row_label[fresh] = pos[fresh]
        return self._row_pos

    def row_positions(self, layers: list[int], cells: np.ndarray) -> np.ndarray:
        """[L, H_kv, len(cells)] int64: the position of the token each row of each cell holds."""
        return self._row_map(layers)[:, :, cells].copy()

    def set_row_positions(self, layers: list[int], cells: np.ndarray, rows: np.ndarray) -> None:
        """Restore a row map (a loaded save file): ``rows`` [L, H_kv, len(cells)]."""
        m = self._row_map(layers)
        if rows.shape != (m.shape[0], m.shape[1], len(cells)):
            raise ValueError(f"row map must be [{m.shape[0]}, {m.shape[1]}, {len(cells)}], got {rows.shape}")
        m[:, :, cells] = rows

    def shift_rows(self, layers: list[int], cells: np.ndarray, delta: np.ndarray) -> None:
        """Re-rotate the K row (l, h) of ``cells[j]`` by ``delta[l, h, j]`` positions (RoPE, in
        llama.cpp) and move the row map along. Cell labels stay; a pending shift is applied first."""
        self.settle()
        cells = np.asarray(cells, dtype=np.int64)
        delta = np.asarray(delta, dtype=np.int64)
        rows = self._row_map(layers)
        if delta.shape != (rows.shape[0], rows.shape[1], cells.size):
            raise ValueError(f"delta must be [{rows.shape[0]}, {rows.shape[1]}, {cells.size}], got {delta.shape}")
        stride = self._head_stride
        full = np.zeros((self.n_layer, stride, self.cache_sizes[0]), dtype=np.int32)
        full[np.ix_(layers, range(rows.shape[1]), cells)] = delta
        self._apply_pending_shift()
        self.ctx.version += 1
        rc = ams.llama_ams_shift_rows(self.ctx.ptr, 0, full.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), stride)
        if rc != 0:
            raise CacheError(f"shifting KV rows failed (code {rc})")
        rows[:, :, cells] += delta

    def relabel_rows(self, cells: np.ndarray, labels: np.ndarray) -> None:
        """``seq_add`` moved ``cells`` to the new ``labels``, and rotated every row of a cell by that
        delta: the rows keep their tokens, at positions moved by the same delta. Call it right after
        the shift is issued, before anything reads the map (which would take the cells for new)."""
        cells = np.asarray(cells, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        self._row_pos[:, :, cells] += labels - self._row_label[cells]
        self._row_label[cells] = labels

    def move_rows(self, layers: list[int], dst: np.ndarray, src: np.ndarray) -> None:
        """Row (l, h) of cell ``dst[j]`` takes what row (l, h) of cell ``src[l, h, j]`` held (-1 =
        stays): K and V bytes in llama.cpp, and here the row map and the accumulated evidence.

        ``layers`` are the model layers that ``src``'s first axis indexes (all of the base cache).
        The cell labels do not change; the caller evicts the cells no row keeps.
        """
        self.settle()
        dst = np.ascontiguousarray(dst, dtype=np.int32)
        src = np.asarray(src, dtype=np.int32)
        rows = self._row_map(layers)
        L, H, n = src.shape
        if L != len(layers) or n != dst.size or H != rows.shape[1]:
            raise ValueError(f"src must be [{len(layers)}, {rows.shape[1]}, {dst.size}], got {src.shape}")
        stride = self._head_stride
        full = np.full((self.n_layer, stride, n), -1, dtype=np.int32)
        full[layers, :H] = src
        self._apply_pending_shift()
        self.ctx.version += 1
        rc = ams.llama_ams_move_rows(
            self.ctx.ptr,
            0,
            dst.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            n,
            full.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            stride,
        )
        if rc != 0:
            raise CacheError(f"moving KV rows between cells failed (code {rc})")
        moving = src >= 0
        l_idx, h_idx, j_idx = np.nonzero(moving)
        from_cells = src[moving]
        to_cells = dst[j_idx]
        rows[l_idx, h_idx, to_cells] = rows[l_idx, h_idx, from_cells]
        # the evidence a row gathered goes with its token (H2O's totals; the window restarts
        # anyway): one fancy index per accumulator group, not per layer (~0.4 ms of SmolLM2's event)
        group, row = np.array([self._group_of[il] for il in layers], dtype=np.int64).T
        for g in np.unique(group[l_idx]):
            sel = group[l_idx] == g
            j, h, to, fr = row[l_idx[sel]], h_idx[sel], to_cells[sel], from_cells[sel]
            for acc in (self._groups[g][2], self._window_base_groups[g]):
                acc[j, h, to] = acc[j, h, fr]

    # --- whole-cell moves (patch 0004) ----------------------------------------------------------

    def move_cells(self, cache: int, dst: np.ndarray, src: np.ndarray) -> None:
        """The empty cell ``dst[j]`` takes the token of the occupied cell ``src[j]``: K/V of every
        layer and its position in llama.cpp, and here its accumulated evidence (and row map).
        The cache holds the same tokens at the same positions afterwards, in other cells."""
        self.settle()
        dst = np.ascontiguousarray(dst, dtype=np.int32)
        src = np.ascontiguousarray(src, dtype=np.int32)
        if dst.shape != src.shape or dst.ndim != 1:
            raise ValueError(f"dst and src must be two [n] arrays, got {dst.shape} and {src.shape}")
        if dst.size == 0:
            return
        self._apply_pending_shift()
        self.ctx.version += 1
        i32 = ctypes.POINTER(ctypes.c_int32)
        rc = ams.llama_ams_move_cells(self.ctx.ptr, cache, dst.ctypes.data_as(i32), src.ctypes.data_as(i32), dst.size)
        if rc != 0:
            raise CacheError(f"moving KV cells failed (code {rc})")

        def carry(a: np.ndarray, empty: float | int) -> None:  # a[..., cell]: the token's column moves
            if not a.flags.c_contiguous:  # a reshape would copy, and the move would be lost
                raise RuntimeError("an evidence array to carry is not contiguous")
            carry_columns(a.reshape(-1, a.shape[-1]), dst, src, empty)

        carry(self.evidence_pos[cache], -1)
        for g, ((gc, _, total, _, _), base) in enumerate(zip(self._groups, self._window_base_groups)):
            if gc == cache:
                carry(total, 0.0)
                carry(base, 0.0)
                for snapshots, _ in self._marks.values():
                    if snapshots is not None:
                        carry(snapshots[g], 0.0)
                if g < len(self._last_groups):  # the last decode's attention (event mode)
                    carry(self._last_groups[g], 0.0)
        if cache == 0 and self._rows_layers is not None:
            carry(self._row_pos, -1)
            carry(self._row_label, -1)

    # --- evidence -----------------------------------------------------------------------------

    def observe(self, n_obs: int, *, attn: bool = True, queries: bool = False) -> None:
        """Observe the last ``n_obs`` queries of every following decode (0 = off, zero cost).

        Observed queries go into a ring of the last :attr:`q_window` (see :meth:`set_query_window`;
        a call that observes queries grows the ring to ``n_obs`` if it is smaller).
        """
        flags = (LLAMA_AMS_OBS_ATTN if attn else 0) | (LLAMA_AMS_OBS_QUERIES if queries else 0)
        self.n_obs = n_obs if flags else 0
        self.obs_flags = flags if n_obs > 0 else 0
        if self.obs_flags & LLAMA_AMS_OBS_QUERIES and self.q_window < self.n_obs:
            self.set_query_window(self.n_obs)
        self.ctx.set_obs(self.n_obs, self._native_flags())

    def _native_flags(self) -> int:
        """What the graph must output: in event mode queries stand in for attention."""
        if self.evidence_mode == "event" and self.obs_flags & LLAMA_AMS_OBS_ATTN:
            return (self.obs_flags & ~LLAMA_AMS_OBS_ATTN) | LLAMA_AMS_OBS_QUERIES
        return self.obs_flags

    def set_query_window(self, w: int) -> None:
        """Keep the last ``w`` observed queries (across compression events); the newest that fit stay."""
        w = max(int(w), 1)
        if w != self.q_window:
            self.q_window = w
            self._resize_ring()

    def reset_evidence(self) -> None:
        """Forget all accumulated evidence (windowed and total) and queries."""
        # evidence_total[il]: [n_head_kv, cache_size] attention probability summed over every
        # observed query since the cell's token entered (what H2O needs); zeroed on cell reuse.
        # Layers of one cache with the same KV head count share one stacked array (evidence_total[il]
        # is a view into it), so that collect() adds a whole step with one numpy operation.
        # (cache, layers, total [L, H, size] f64, read buffer [L, H*size] f32, its row pointers)
        self._groups: list[tuple[int, list[int], np.ndarray, np.ndarray, list]] = []
        self._group_of: dict[int, tuple[int, int]] = {}  # layer -> (group, row in it)
        self._evidence_total: list[np.ndarray | None] = [None] * self.n_layer
        for c in range(self.n_caches):
            for h in sorted({self.layers[il].n_head_kv for il in self.kv_layers if self.layers[il].cache == c}):
                members = [il for il in self.kv_layers if self.layers[il].cache == c and self.layers[il].n_head_kv == h]
                total = np.zeros((len(members), h, self.cache_sizes[c]), dtype=np.float64)
                buf = np.empty((len(members), h * self.cache_sizes[c]), dtype=np.float32)
                ptrs = [row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for row in buf]
                self._groups.append((c, members, total, buf, ptrs))
                for j, il in enumerate(members):
                    self._evidence_total[il] = total[j]
                    self._group_of[il] = (len(self._groups) - 1, j)
        self.evidence_pos = [np.full(size, -1, dtype=np.int32) for size in self.cache_sizes]
        self._rows_layers = None  # the per-row map starts over with the evidence (a cleared cache)
        self._q_count = 0
        self._q_end = 0
        # event mode: the observed decodes not yet settled, oldest first: their positions (one
        # growing buffer) and their queries in one growing buffer per logged layer ([capacity,
        # n_head, head_dim], the first _qlog_n rows in use), written in place by the patch; and
        # the attention of the last observed decode
        self._qlog_pos = np.zeros(32, dtype=np.int64)
        self._qlog_n = 0
        self._qlog_layers: list[int] = []  # the layers logged since the last settle
        self._qlog_bad: set[int] = set()  # logged layers whose queries could not be read once
        self._qlog_buf: dict[int, np.ndarray] = {}
        self._qlog_stacks: list[tuple[list[int], np.ndarray]] = []  # (layers, their stacked buffers)
        # per layer: where its log buffer starts and how many rows it holds (0 = not logged)
        self._qlog_addr = np.zeros(self.n_layer, dtype=np.int64)
        self._qlog_rows = np.zeros(self.n_layer, dtype=np.int64)
        self._qlog_cap = 0  # rows every logged layer's buffer has
        # the log's destination tables and their addresses (made by _reserve_log, see _row_tables)
        self._qlog_tables: tuple = ()
        self._qlog_tab = (0, 0, 0)
        self._last_n = 0  # queries of the last decode if it was observed (0: it was not)
        self._last_attn: dict[int, np.ndarray] = {}  # per layer, a view into _last_groups
        self._last_groups: list[np.ndarray] = []  # per accumulator group, as the totals
        self.reset_window()

    @property
    def evidence_total(self) -> list[np.ndarray | None]:
        """Per layer [n_head_kv, cache_size] float64: attention probability summed over every
        observed query since the cell's token entered (what H2O needs)."""
        self.settle()
        return self._evidence_total

    def reset_window(self) -> None:
        """Start a new observation window: windowed evidence and queries restart, totals go on."""
        self.settle()
        # the windowed evidence is total minus this snapshot: one accumulator per step, not two
        self._window_base = [None] * self.n_layer
        self._window_base_groups = []
        for _, members, total, _, _ in self._groups:
            base = total.copy()
            self._window_base_groups.append(base)
            for j, il in enumerate(members):
                self._window_base[il] = base[j]
        self.n_queries = 0  # query tokens whose attention was accumulated since the window started
        # marks: snapshots of the totals taken inside the window (evidence of the last W queries
        # alone, for several W at one event): key -> (per-group snapshot, n_queries at the mark);
        # in event mode a mark waits as (None, n_queries) until the log settles past it
        self._marks: dict[int, tuple[list[np.ndarray] | None, int]] = {}

    def mark(self, key: int) -> None:
        """Remember the evidence so far under ``key``: :meth:`evidence_since` is what comes after."""
        if self._qlog_n:
            self._marks[key] = (None, self.n_queries)  # taken when the log settles
        else:
            self._marks[key] = ([total.copy() for _, _, total, _, _ in self._groups], self.n_queries)

    def queries_since(self, key: int) -> int:
        """Observed query tokens since :meth:`mark` ``key`` (since the window started if unmarked)."""
        return self.n_queries - self._marks[key][1] if key in self._marks else self.n_queries

    def evidence_since(self, key: int, il: int, cells: np.ndarray) -> np.ndarray:
        """Evidence of layer ``il`` at ``cells`` since :meth:`mark` ``key``: [n_head_kv, len(cells)]
        (since the window started if ``key`` was not marked)."""
        if key not in self._marks:
            return self.evidence_at(il, cells)
        self.settle()
        g, j = self._group_of[il]
        return self._evidence_total[il][:, cells] - self._marks[key][0][g][j][:, cells]

    def evidence_since_layers(self, key: int, layers: list[int], cells: np.ndarray) -> np.ndarray:
        """:meth:`evidence_since` of each of ``layers``, stacked: [len(layers), n_head_kv, len(cells)].

        Layers that share one accumulator (one cache, one KV head count: every layer of most
        models) are gathered with one fancy index instead of one per layer (SmolLM2: 30 gathers
        of ~12 us an event per window)."""
        self.settle()
        where = [self._group_of[il] for il in layers]
        g = where[0][0]
        if any(gi != g for gi, _ in where) or not self._window_base_groups:
            return np.stack([self.evidence_since(key, il, cells) for il in layers])
        rows = [j for _, j in where]
        total = self._groups[g][2]
        base = self._marks[key][0][g] if key in self._marks else self._window_base_groups[g]
        if rows == list(range(total.shape[0])):
            return total[:, :, cells] - base[:, :, cells]
        return total[rows][:, :, cells] - base[rows][:, :, cells]

    def _alloc_ring(self) -> None:
        """Buffers for the last q_window observed queries of every layer. Each is twice the window
        long and filled forward; when it runs out, the newest window is moved to the front once
        (amortised O(1) per query, where shifting a ring by one step would copy it all)."""
        w = self.q_window
        self._q_ring = [
            np.zeros((2 * w, li.n_head, li.n_embd_head_k), dtype=np.float32) if li.cache >= 0 else None
            for li in self.layers
        ]
        # where each layer's ring starts ([n_layer] addresses, 0 = no ring), for the bulk capture
        self._q_pos_ring = np.full(2 * w, -1, dtype=np.int32)  # the queries' positions, alongside
        addr = np.array([0 if r is None else r.ctypes.data for r in self._q_ring], dtype=np.int64)
        self._q_ring_tables = _row_tables(addr, 2 * w, self._q_row_floats)
        self._q_ring_tab = _table_addresses(self._q_ring_tables)
        self._q_end = 0  # one past the newest query (the same in every layer)

    def _ring_reserve(self, n_tok: int) -> int:
        """Where one decode's newest queries go in every layer's buffer (the same offset in all);
        when they would run past the end, the newest window first moves to the front of each."""
        w = self.q_window
        take = min(n_tok, w)
        end = self._q_end
        if end + take > 2 * w:
            keep = min(self._q_count, w - take)
            for ring in self._q_ring:
                if ring is not None:
                    ring[:keep] = ring[end - keep : end]
            self._q_pos_ring[:keep] = self._q_pos_ring[end - keep : end]
            end = keep
        self._q_end = end + take
        self._q_count = min(self._q_count + n_tok, w)
        return end

    def _resize_ring(self) -> None:
        """A new window size: keep the newest queries that fit."""
        old, old_pos = self.queries, self.query_pos
        n = min(self._q_count, self.q_window)
        self._alloc_ring()
        self._q_count = n
        self._q_end = n
        for r, o in zip(self._q_ring, old):
            if r is not None and o is not None and n:
                r[:n] = o[o.shape[0] - n :]
        self._q_pos_ring[:n] = old_pos[len(old_pos) - n :]

    @property
    def queries(self) -> list[np.ndarray | None]:
        """Per layer the window's observed queries [t, n_head, head_dim] (t <= n_obs), oldest first."""
        n, end = self._q_count, self._q_end
        return [None if r is None or n == 0 else r[end - n : end] for r in self._q_ring]

    @property
    def query_pos(self) -> np.ndarray:
        """The positions of the window's observed queries [t] int32, oldest first."""
        return self._q_pos_ring[self._q_end - self._q_count : self._q_end]

    @property
    def evidence(self) -> list[np.ndarray | None]:
        """Per layer [n_head_kv, cache_size]: attention summed over the window's observed queries."""
        self.settle()
        return [None if t is None else t - b for t, b in zip(self._evidence_total, self._window_base)]

    def positions_shifted(self) -> None:
        """The cells' positions were shifted (``seq_add``), not reassigned: keep their evidence.

        Without this, the next :meth:`collect` would take the new positions for new occupants and
        zero what the tokens had accumulated (H2O's totals, the window's evidence). In event mode
        the log must have been settled before the shift (:meth:`settle`; the engine does).
        """
        if self._qlog_n:
            raise RuntimeError("positions shifted under unsettled queries: settle() before seq_add")
        for c in range(self.n_caches):
            pos = self.cell_pos(c)
            occupied = pos >= 0
            # only cells that still hold the token they accumulated for: freed cells keep their
            # old mark, so that a new occupant is still seen as one
            same = occupied & (self.evidence_pos[c] >= 0)
            self.evidence_pos[c][same] = pos[same]

    def collect(self, positions_of_batch: Sequence[int] | None = None) -> int:
        """Add the evidence of the last decode to the accumulators; returns observed query tokens.

        Columns of cells whose position changed since they were last accumulated (evicted, reused)
        are zeroed first, so evidence never leaks from one token to the next occupant of a cell.
        """
        t0 = time.perf_counter()
        try:
            return self._collect(positions_of_batch)
        finally:
            self.collect_s += time.perf_counter() - t0

    def _collect(self, positions_of_batch: Sequence[int] | None) -> int:
        ptr = self.ctx.ptr
        n_tok = int(ams.llama_ams_obs_n_tokens(ptr))
        if n_tok == 0:
            return 0
        event = self.evidence_mode == "event"
        if not event:
            self._zero_moved()
        if self.obs_flags & LLAMA_AMS_OBS_ATTN and not event:
            for _, members, total, buf, ptrs in self._groups:
                n_kv = int(ams.llama_ams_obs_n_kv(ptr, members[0]))  # one graph: one n_kv per cache
                h = total.shape[1]
                size = h * n_kv
                if n_kv == 0:
                    continue
                ok = True
                for il, row_ptr in zip(members, ptrs):
                    ok &= ams.llama_ams_get_attn(ptr, il, row_ptr, size) == size
                if ok:
                    acc = total[:, :, :n_kv]
                    np.add(acc, buf[:, :size].reshape(len(members), h, n_kv), out=acc)
        log_queries = event and bool(self.obs_flags & LLAMA_AMS_OBS_ATTN) and bool(self.tracked)
        ring_queries = bool(self.obs_flags & LLAMA_AMS_OBS_QUERIES)
        if log_queries or ring_queries:
            self._capture_queries(n_tok, log_queries, ring_queries, positions_of_batch)
        self._last_n = 0
        if self.obs_flags & LLAMA_AMS_OBS_ATTN:
            self.n_queries += n_tok  # the divisor of the attention sums
            self._last_n = n_tok
            if log_queries:
                # a sliding-window cache reuses cells inside a window: settle before the next decode
                if self._qlog_n >= _LOG_LIMIT or any(self.layers[il].cache != 0 for il in self._qlog_layers):
                    self._settle()
        return n_tok

    def _capture_queries(self, n_tok: int, log: bool, ring: bool, positions_of_batch: Sequence[int] | None) -> None:
        """Copy the last decode's observed queries into the event log (tracked layers) and the
        window ring, straight from the patch into preallocated rows. This runs on every observed
        step, so it allocates nothing per layer and calls the patch once per destination for all
        layers (a Python loop over the layers costs more than the copies)."""
        # Right after a decode the interpreter's and numpy's state is cold in the CPU caches, and
        # each numpy operation costs ~10 us: the destinations come from tables made when the
        # buffers were (row r of every layer at dst0 + r * stride), indexed with Python integers
        ptr = self.ctx.ptr
        if log:
            if positions_of_batch is None:
                raise ValueError("event-mode evidence needs the positions of the decoded batch")
            if not self._qlog_n:
                self._start_log()
            self._reserve_log(self._qlog_n + n_tok)
            at = self._qlog_n
            dst0, room0, stride = self._qlog_tab
            if ams.llama_ams_get_queries_all(ptr, dst0 + at * stride, room0 + at * stride, self.n_layer) != len(
                self._qlog_layers
            ):
                dst = self._qlog_tables[0][at]
                for il in self._qlog_layers:  # find the layers that could not be read
                    size = n_tok * int(self._q_row_floats[il])
                    if ams.llama_ams_get_queries(ptr, il, int(dst[il]), size) != size:
                        self._qlog_bad.add(il)
            _put_tail(self._qlog_pos, at, positions_of_batch, n_tok)
            self._qlog_n += n_tok
        if ring:
            take = min(n_tok, self.q_window)
            start = self._ring_reserve(n_tok)
            if take == n_tok:  # the whole decode fits the ring: straight into it
                dst0, room0, stride = self._q_ring_tab
                ams.llama_ams_get_queries_all(ptr, dst0 + start * stride, room0 + start * stride, self.n_layer)
            else:  # more observed queries than the window keeps: the newest
                for il in self.kv_layers:
                    li = self.layers[il]
                    q = np.empty((n_tok, li.n_head, li.n_embd_head_k), dtype=np.float32)
                    if ams.llama_ams_get_queries(ptr, il, q.ctypes.data, q.size) == q.size:
                        self._q_ring[il][start : start + take] = q[n_tok - take :]
            if positions_of_batch is None:
                self._q_pos_ring[start : start + take] = -1
            else:
                _put_tail(self._q_pos_ring, start, positions_of_batch, take)

    def _start_log(self) -> None:
        """A new log: the layers tracked now are the ones it holds until it settles."""
        self._qlog_layers = list(self.tracked)
        self._qlog_bad = set()
        self._qlog_addr[:] = 0
        self._qlog_rows[:] = 0
        for il in self._qlog_layers:
            buf = self._qlog_buf.get(il)
            if buf is not None:
                self._qlog_addr[il] = buf.ctypes.data
                self._qlog_rows[il] = buf.shape[0]
        self._qlog_cap = 0  # the next _reserve_log measures the buffers found here (and makes the tables)

    def _reserve_log(self, n: int) -> None:
        """Room for ``n`` logged queries in every logged layer's buffer (grown by doubling)."""
        if n <= self._qlog_cap:
            return
        if self._qlog_pos.shape[0] < n:
            pos = np.zeros(max(n, 2 * self._qlog_pos.shape[0]), dtype=np.int64)
            pos[: self._qlog_n] = self._qlog_pos[: self._qlog_n]
            self._qlog_pos = pos
        held = [self._qlog_buf[il].shape[0] if il in self._qlog_buf else 0 for il in self._qlog_layers]
        if held and min(held) < n:
            # every logged layer's buffer anew, one stacked array per set of layers that settles
            # together ([layers, rows, n_head, head_dim]): an event reads each set's queries as one
            # array, in one kernel (_settle)
            cap = max(n, 32 if min(held) == 0 else 2 * min(held))
            self._qlog_stacks = []
            for members in self._log_sets(self._qlog_layers):
                li = self.layers[members[0]]
                stack = np.empty((len(members), cap, li.n_head, li.n_embd_head_k), dtype=np.float32)
                for j, il in enumerate(members):
                    old = self._qlog_buf.get(il)
                    if old is not None and self._qlog_n:
                        stack[j, : self._qlog_n] = old[: self._qlog_n]
                    self._qlog_buf[il] = stack[j]
                    self._qlog_addr[il] = stack[j].ctypes.data
                    self._qlog_rows[il] = cap
                self._qlog_stacks.append((members, stack))
        self._qlog_cap = int(self._qlog_rows[self._qlog_layers].min()) if self._qlog_layers else n
        self._qlog_cap = min(self._qlog_cap, self._qlog_pos.shape[0])
        # destinations of every row a capture may start at (a layer's room: its own rows)
        self._qlog_tables = _row_tables(self._qlog_addr, self._qlog_cap, self._q_row_floats, self._qlog_rows)
        self._qlog_tab = _table_addresses(self._qlog_tables)

    def unobserved_decode(self) -> None:
        """A decode ran without observation: there is no last observed decode any more."""
        self._last_n = 0

    def _zero_moved(self) -> None:
        """Zero the evidence columns of cells whose token changed since they were last accumulated
        (evicted, reused), so evidence never leaks from one token to the next occupant of a cell."""
        for c in range(self.n_caches):
            pos = self.cell_pos(c)
            moved = pos != self.evidence_pos[c]
            if moved.any():
                for g, ((gc, _, total, _, _), base) in enumerate(zip(self._groups, self._window_base_groups)):
                    if gc == c:
                        total[:, :, moved] = 0.0
                        base[:, :, moved] = 0.0
                        for snapshots, _ in self._marks.values():
                            if snapshots is not None:
                                snapshots[g][:, :, moved] = 0.0
                self.evidence_pos[c] = pos

    def settle(self) -> None:
        """Event mode: compute the attention of every logged query now and add it to the evidence,
        exactly as the per-step side branch would have, step by step (marks included).

        Its time goes to :attr:`settle_s`, not :attr:`collect_s`: a compression event settles
        inside its own timing, and counting it twice would inflate the controller's share."""
        if self._qlog_n:
            t0 = time.perf_counter()
            try:
                self._settle()
            finally:
                self.settle_s += time.perf_counter() - t0

    def _settle(self) -> None:
        n_total = self._qlog_n
        q_pos = self._qlog_pos[:n_total].copy()
        layers = [il for il in self._qlog_layers if il not in self._qlog_bad]
        self._qlog_n = 0
        self._zero_moved()
        first = self.n_queries - n_total  # n_queries before the first logged query
        # pending marks: the log's queries before the mark (n - first) went into the totals
        # before the snapshot, the rest after it
        pending = {key: min(max(n - first, 0), n_total) for key, (snap, n) in self._marks.items() if snap is None}
        last_from = n_total - self._last_n if self._last_n else n_total
        if last_from < n_total:
            self._last_attn = {}
            self._last_groups = [np.zeros(total.shape, dtype=np.float32) for _, _, total, _, _ in self._groups]
        # the runs of queries each layer's attention is summed over, each once: all of them (the
        # totals), those after each pending mark, those of the last decode
        runs = [(0, n_total)] + [(m, n_total) for m in pending.values()] + [(last_from, n_total)]
        ranges = np.array(sorted(set(runs), key=runs.index), dtype=np.int64)
        run_of = {run: i for i, run in enumerate(map(tuple, ranges.tolist()))}
        cells_of = [self.occupied(c) for c in range(self.n_caches)]
        settled = []
        for members in self._log_sets(layers):
            g = self._group_of[members[0]][0]
            rows = np.array([self._group_of[il][1] for il in members], dtype=np.int64)
            cells, pos = cells_of[self.layers[members[0]].cache]
            sums = layer_query_sums(
                self._log_stack(members, n_total),  # read before the next capture overwrites it
                self.read_k_layers(members, cells),
                np.array([self.kq_scale(il) for il in members]),
                np.array([self.layers[il].n_swa for il in members]),
                q_pos,
                pos,
                ranges,
            )
            add_block_sums(sums, 0, rows, cells, self._groups[g][2], 1.0)
            if last_from < n_total:
                add_block_sums(sums, run_of[last_from, n_total], rows, cells, self._last_groups[g], 1.0)
                for il, j in zip(members, rows):
                    self._last_attn[il] = self._last_groups[g][j]
            settled.append((g, rows, cells, sums))
        # a mark's snapshot: the totals now, less what came after the mark (one run of the
        # queries, not two: TOVA's mark sits one query before the end)
        for key, m in pending.items():
            snap = [total.copy() for _, _, total, _, _ in self._groups]
            for g, rows, cells, sums in settled:
                add_block_sums(sums, run_of[m, n_total], rows, cells, snap[g], -1.0)
            self._marks[key] = (snap, self._marks[key][1])

    def _log_sets(self, layers: Sequence[int]) -> list[list[int]]:
        """``layers`` cut into the sets that settle together: one accumulator group (one cache,
        one KV head count) and one query shape."""
        sets: dict[tuple, list[int]] = {}
        for il in layers:
            li = self.layers[il]
            sets.setdefault((self._group_of[il][0], li.n_head, li.n_embd_head_k), []).append(il)
        return list(sets.values())

    def _log_stack(self, members: list[int], n: int) -> np.ndarray:
        """The first ``n`` logged queries of ``members``: [layers, n, n_head, head_dim], a view of
        their stacked buffer where they have one, else a copy."""
        for layers, stack in self._qlog_stacks:
            if layers == members:
                return stack[:, :n]
            if set(members) <= set(layers):  # (a layer whose queries could not be read is left out)
                return stack[[layers.index(il) for il in members], :n]
        return np.stack([self._qlog_buf[il][:n] for il in members])

    # --- save / restore -----------------------------------------------------------------------

    def export_evidence(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Accumulated evidence and observed queries, keyed by position rather than by cell
        (a restore puts the tokens in other cells). Evidence a cell still carries from a previous
        occupant (zeroed at the next observation) is saved as 0."""
        self.settle()  # first: settling also brings evidence_pos up to date
        arrays: dict[str, np.ndarray] = {"query_pos": np.asarray(self.query_pos, dtype=np.int64)}
        for c in range(self.n_caches):
            cur = self.cell_pos(c)
            cells = np.flatnonzero(cur >= 0)
            valid = self.evidence_pos[c][cells] == cur[cells]
            arrays[f"ev_pos_{c}"] = cur[cells].astype(np.int64)
            for il in self.kv_layers:
                if self.layers[il].cache == c:
                    arrays[f"evt_{il}"] = np.where(valid, self.evidence_total[il][:, cells], 0.0)
                    arrays[f"evb_{il}"] = np.where(valid, self._window_base[il][:, cells], 0.0)
        if self._q_count:
            queries = self.queries
            for il in self.kv_layers:
                arrays[f"q_{il}"] = queries[il].copy()
        meta = {
            "n_obs": self.n_obs,
            "obs_flags": self.obs_flags,
            "q_window": self.q_window,
            "n_queries": self.n_queries,
            "q_count": self._q_count,
            "collect_s": self.collect_s,
            "n_caches": self.n_caches,
        }
        return meta, arrays

    def import_evidence(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`export_evidence` output onto the cells that now hold the same positions."""
        if int(meta["n_caches"]) != self.n_caches:
            raise ValueError("the saved evidence was made with another cache layout")
        self.observe(0)
        self.reset_evidence()
        n_obs, flags = int(meta["n_obs"]), int(meta["obs_flags"])
        self.set_query_window(int(meta.get("q_window", max(n_obs, 1))))
        if n_obs > 0 and flags:
            self.observe(n_obs, attn=bool(flags & LLAMA_AMS_OBS_ATTN), queries=bool(flags & LLAMA_AMS_OBS_QUERIES))
        for c in range(self.n_caches):
            cur = self.cell_pos(c)
            self.evidence_pos[c] = cur
            saved = arrays[f"ev_pos_{c}"]
            cells = np.flatnonzero(cur >= 0)
            if len(cells) == 0:
                continue
            order = np.argsort(saved, kind="stable")
            j = np.minimum(np.searchsorted(saved[order], cur[cells]), max(len(saved) - 1, 0))
            if len(saved) == 0 or not np.array_equal(saved[order][j], cur[cells]):
                raise ValueError("the saved evidence does not match the restored cells")
            src = order[j]
            for il in self.kv_layers:
                if self.layers[il].cache == c:
                    self.evidence_total[il][:, cells] = arrays[f"evt_{il}"][:, src]
                    self._window_base[il][:, cells] = arrays[f"evb_{il}"][:, src]
        q_count = int(meta["q_count"])
        if q_count > self.q_window:
            raise ValueError("the saved queries do not fit the observation window")
        if q_count:
            for il in self.kv_layers:
                self._q_ring[il][:q_count] = arrays[f"q_{il}"]
        self._q_count, self._q_end = q_count, q_count
        self.n_queries = int(meta["n_queries"])
        saved_pos = arrays["query_pos"]
        self._q_pos_ring[:q_count] = -1
        n_pos = min(q_count, len(saved_pos))
        if n_pos:
            self._q_pos_ring[q_count - n_pos : q_count] = saved_pos[len(saved_pos) - n_pos :]
        self.collect_s = float(meta["collect_s"])

    def last_attn(self, il: int) -> np.ndarray | None:
        """Evidence of the last decode alone for layer ``il``: [n_head_kv, n_kv], or None."""
        if self.evidence_mode == "event":
            self.settle()
            return self._last_attn.get(il) if self._last_n else None
        n_kv = int(ams.llama_ams_obs_n_kv(self.ctx.ptr, il))
        if n_kv == 0:
            return None
        li = self.layers[il]
        buf = np.empty(li.n_head_kv * n_kv, dtype=np.float32)
        if (
            ams.llama_ams_get_attn(self.ctx.ptr, il, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size)
            != buf.size
        ):
            return None
        return buf.reshape(li.n_head_kv, n_kv)

    def last_queries(self, il: int) -> np.ndarray | None:
        """Observed queries of the last decode for layer ``il``: [n_obs, n_head, head_dim], or None."""
        n_tok = int(ams.llama_ams_obs_n_tokens(self.ctx.ptr))
        if n_tok == 0:
            return None
        li = self.layers[il]
        buf = np.empty(n_tok * li.n_head * li.n_embd_head_k, dtype=np.float32)
        if (
            ams.llama_ams_get_queries(self.ctx.ptr, il, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size)
            != buf.size
        ):
            return None
        return buf.reshape(n_tok, li.n_head, li.n_embd_head_k)

    def evidence_at(self, il: int, cells: np.ndarray) -> np.ndarray:
        """Accumulated evidence of layer ``il`` at ``cells``: [n_head_kv, len(cells)]."""
        return self.evidence_total[il][:, cells] - self._window_base[il][:, cells]
