"""The chat save format: write, read and verify (no backend import).

A save file is a header (magic, format version, payload length, sha256 of the payload) followed by
the payload, an uncompressed ``.npz`` read with ``allow_pickle=False``: a JSON document (``doc``:
messages, configuration, statistics, the model's identity) plus the controller's arrays and
llama.cpp's sequence state (``kv``). Reading checks everything that can be checked without the
model loaded: magic, version, length, checksum, the document's format and the arrays it needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Union

import numpy as np

from .errors import SaveFileError

__all__ = ["FORMAT", "SAVE_MAGIC", "SAVE_VERSION", "model_identity", "pack", "read", "unpack", "write_atomic"]

SAVE_MAGIC = b"AMSCHAT\x00"
SAVE_VERSION = 1
FORMAT = "amslocal-chat"
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256(payload)


def model_identity(model) -> dict:
    """What a save file records about its model (a loaded Model: its file, arch and vocabulary)."""
    from .calibration import model_sha256

    path = Path(model.path)
    return {
        "name": path.name,
        "size": path.stat().st_size,
        "sha256": model_sha256(path),
        "arch": model.arch,
        "n_vocab": model.n_vocab,
    }


def pack(doc: dict, arrays: dict[str, np.ndarray], kv: bytes) -> bytes:
    """The bytes of a save file holding ``doc`` (JSON-able), ``arrays`` and the KV state ``kv``."""
    arrays = dict(arrays)
    arrays["kv"] = np.frombuffer(kv, dtype=np.uint8)
    arrays["doc"] = np.frombuffer(
        json.dumps({"format": FORMAT, "version": SAVE_VERSION, **doc}).encode("utf-8"), dtype=np.uint8
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    return _HEADER.pack(SAVE_MAGIC, SAVE_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def write_atomic(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SaveFileError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def read(path: Union[str, os.PathLike]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SaveFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def unpack(data: bytes, name: str, model: dict | None = None) -> tuple[dict, dict[str, np.ndarray], bytes]:
    """(doc, arrays, kv) of a save file's bytes; :class:`SaveFileError` in one line for anything
    wrong. ``model``: the identity (:func:`model_identity`) the file must have been saved with."""
    if len(data) < len(SAVE_MAGIC) or data[: len(SAVE_MAGIC)] != SAVE_MAGIC:
        raise SaveFileError(f"{name} is not an amslocal session file")
    if len(data) < _HEADER.size:
        raise SaveFileError(f"{name} is damaged or truncated (the header is cut short)")
    _, version, length, digest = _HEADER.unpack_from(data)
    if version != SAVE_VERSION:
        raise SaveFileError(f"{name} is session format {version}; this amslocal reads format {SAVE_VERSION}")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise SaveFileError(f"{name} is damaged or truncated ({len(payload)} of {length} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise SaveFileError(f"{name} is damaged (checksum mismatch)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        doc = json.loads(arrays.pop("doc").tobytes().decode("utf-8"))
    except Exception as exc:
        raise SaveFileError(f"{name} is damaged ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SaveFileError(f"{name} is not an amslocal session file")
    if "kv" not in arrays:
        raise SaveFileError(f"{name} is incomplete: it holds no KV cache state")
    kv = arrays.pop("kv").tobytes()
    if model is not None:
        theirs = doc.get("model") if isinstance(doc.get("model"), dict) else {}
        if theirs.get("sha256") != model["sha256"]:
            raise SaveFileError(
                f"{name} was saved with model {theirs.get('name', '?')} "
                f"(sha256 {str(theirs.get('sha256', '?'))[:12]}), not {model['name']} "
                f"(sha256 {model['sha256'][:12]})"
            )
    return doc, arrays, kv
