"""The save format alone (amslocal.savefile): round trip, and one clear error per kind of damage."""

from __future__ import annotations

import numpy as np
import pytest

from amslocal import savefile
from amslocal.errors import SaveFileError

MODEL = {"name": "m.gguf", "sha256": "ab" * 32, "size": 1, "arch": "llama", "n_vocab": 10}


def _file() -> bytes:
    return savefile.pack({"model": MODEL, "chat": {"messages": []}}, {"tokens_pos": np.arange(5)}, b"\x01\x02kv")


def test_round_trip(tmp_path):
    path = savefile.write_atomic(tmp_path / "s.chat", _file())
    doc, arrays, kv = savefile.unpack(savefile.read(path), str(path), MODEL)
    assert doc["format"] == savefile.FORMAT and doc["chat"] == {"messages": []}
    np.testing.assert_array_equal(arrays["tokens_pos"], np.arange(5))
    assert kv == b"\x01\x02kv" and "kv" not in arrays and "doc" not in arrays
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file is gone


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda d: b"NOTCHAT\x00" + d[8:], "is not an amslocal session file"),
        (lambda d: d[:20], "the header is cut short"),
        (lambda d: d[:-10], "damaged or truncated"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),
        (lambda d: d[:8] + (7).to_bytes(4, "little") + d[12:], "session format 7"),
    ],
)
def test_damage_is_one_clear_error(damage, phrase):
    with pytest.raises(SaveFileError, match=phrase):
        savefile.unpack(damage(_file()), "s.chat", MODEL)


def test_another_models_file_is_refused():
    other = dict(MODEL, sha256="cd" * 32, name="other.gguf")
    with pytest.raises(SaveFileError, match="was saved with model m.gguf"):
        savefile.unpack(_file(), "s.chat", other)


def test_unreadable_paths(tmp_path):
    with pytest.raises(SaveFileError, match="cannot read"):
        savefile.read(tmp_path / "missing.chat")
    with pytest.raises(SaveFileError, match="cannot write"):
        savefile.write_atomic(tmp_path / "no" / "such" / "dir.chat", b"x")
