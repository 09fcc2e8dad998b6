"""One-off per-model calibration for TriAttention: statistics of pre-RoPE queries.

``amslocal calibrate MODEL [--text FILE]`` runs the model over some text with the observed-queries
side branch on for every token, un-rotates the queries to their pre-RoPE form and stores, per
layer, query head and frequency pair, the complex mean E[z_f] and E|z_f|. The file lives in the
user cache directory, keyed by the model file's sha256, so generation finds it by itself.
Without ``--text`` the model calibrates on text it samples itself from a neutral prompt.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import AmsError

CALIBRATION_VERSION = 1
SELF_TEXT_PROMPT = "Here is a long, detailed article covering several different topics.\n\n"


def cache_dir() -> Path:
    root = os.environ.get("AMSLOCAL_CACHE_DIR") or Path.home() / ".cache" / "amslocal"
    return Path(root) / "calibration"


def model_sha256(path: str | os.PathLike) -> str:
    """sha256 of the model file, remembered next to the calibrations by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = cache_dir() / "hashes.txt"
    key = f"{p}\t{st.st_size}\t{st.st_mtime_ns}"
    if memo.exists():
        for line in memo.read_text().splitlines():
            if line.rsplit("\t", 1)[0] == key:
                return line.rsplit("\t", 1)[1]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    with open(memo, "a") as f:
        f.write(f"{key}\t{digest}\n")
    return digest


def calibration_path(model_path: str | os.PathLike) -> Path:
    return cache_dir() / f"{model_sha256(model_path)}.npz"


def load_for_model(model_path: str | os.PathLike) -> dict:
    """The stored calibration of this model file, or a one-line error saying how to make it."""
    from .scorers.triattention import load_calibration

    path = calibration_path(model_path)
    if not path.exists():
        raise AmsError(
            f"the triattention scorer needs a calibration of {Path(model_path).name}; "
            f"run once: amslocal calibrate {model_path}"
        )
    try:
        return load_calibration(path)
    except Exception as exc:
        raise AmsError(
            f"calibration file {path} is unreadable ({exc}); run again: amslocal calibrate {model_path}"
        ) from None


def calibrate(
    model_path: str | os.PathLike,
    text: Optional[str] = None,
    *,
    max_tokens: int = 2048,
    self_tokens: int = 1024,
    progress: Optional[Callable[[int, int], None]] = None,
    sampling: Optional[Callable[[int, int], None]] = None,
    n_threads: int = 0,
) -> Path:
    """Measure and store the query statistics of a model; returns the file written.

    ``sampling(done, total)`` follows the self-generated text (when no ``text`` is given),
    ``progress(done, total)`` the measuring pass; ``n_threads`` 0 uses every core but one."""
    from .backend import ContextParams, Model, SamplerParams
    from .engine import Generator
    from .scorers.rope import rope_rotate
    from .scorers.triattention import calibration_stats, save_calibration

    model = Model(model_path)
    n_batch = 256
    if text is None:
        # self-generated text: no data file to ship, and it is the model's own distribution
        g = Generator(
            model, ContextParams(n_ctx=self_tokens + 256, n_threads=n_threads), SamplerParams(temp=1.0, seed=1234)
        )
        tokens = model.tokenize(SELF_TEXT_PROMPT)
        if sampling is not None:
            sampling(0, self_tokens)
        sampled: list[int] = []
        for tok in g.generate(tokens, self_tokens, ignore_eos=True):
            sampled.append(tok)
            if sampling is not None and len(sampled) % 32 == 0:
                sampling(len(sampled), self_tokens)
        tokens = tokens + sampled
    else:
        tokens = model.tokenize(text)
    tokens = tokens[:max_tokens]
    if len(tokens) < 64:
        raise AmsError(f"calibration text is too short ({len(tokens)} tokens); give at least a few paragraphs")

    g = Generator(
        model,
        ContextParams(n_ctx=len(tokens) + 16, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads),
        SamplerParams(temp=0),
    )
    view = g.view
    layers = [il for il in view.kv_layers if view.layers[il].cache == 0]
    per_layer: list[list[np.ndarray]] = [[] for _ in layers]
    view.observe(n_batch, attn=False, queries=True)
    for i in range(0, len(tokens), n_batch):
        chunk = tokens[i : i + n_batch]
        pos = np.arange(i, i + len(chunk))
        g.eval(chunk, positions=list(pos))
        for j, il in enumerate(layers):
            q = view.last_queries(il)  # [n, n_head, d], post-RoPE
            per_layer[j].append(rope_rotate(q, pos[-q.shape[0] :], view.layers[il], inverse=True))
        if progress:
            progress(min(i + n_batch, len(tokens)), len(tokens))
    stats = calibration_stats([np.concatenate(q) for q in per_layer], [view.layers[il] for il in layers])
    out = calibration_path(model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_calibration(
        out,
        stats,
        {
            "version": CALIBRATION_VERSION,
            "layers": layers,
            "tokens": len(tokens),
            "model": Path(model_path).name,
            "source": "text" if text is not None else "self",
        },
    )
    return out
