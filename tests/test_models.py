"""The model-level checks of bad input (``amslocal.models``): bad files, the default model, budgets,
scorers and text files, all before anything native loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import pytest
from tiny_gguf import write_header_gguf, write_not_gguf, write_tiny_llama_gguf, write_truncated_gguf

from amslocal.errors import AmsError, ModelError
from amslocal.info import model_info
from amslocal.models import (
    DEFAULT_KEEP_LAST,
    DEFAULT_N_SINK,
    BudgetError,
    InputError,
    OptionError,
    check_budget,
    check_request,
    check_scorer,
    locate_model,
    read_text_file,
)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    # 3 layers, 6 query heads over 2 KV heads of 32, a 2048-token trained context
    return write_tiny_llama_gguf(
        tmp_path_factory.mktemp("models") / "tiny.gguf",
        seed=3,
        n_layer=3,
        n_head=6,
        n_head_kv=2,
        head_dim=32,
        n_ff=64,
        n_ctx_train=2048,
        rope_theta=500000.0,
    )


def _backend():
    try:
        import amslocal.backend as backend
    except AmsError as exc:
        pytest.skip(f"patched backend not available: {exc}")
    return backend


# --- bad files ----------------------------------------------------------------------------------


def test_bad_files(tmp_path: Path, tiny_path: Path) -> None:
    noarch = tmp_path / "noarch.gguf"  # a valid GGUF without general.architecture
    w = gguf.GGUFWriter(str(noarch), "llama")
    w.kv_data[0].pop("general.architecture")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases = {
        tmp_path / "missing.gguf": f"model file not found: {tmp_path / 'missing.gguf'}",
        tmp_path: "is a directory, not a GGUF model file",
        write_not_gguf(tmp_path / "noise.gguf"): "is not a GGUF file",
        write_truncated_gguf(tiny_path, tmp_path / "cut.gguf"): "is damaged or truncated",
        noarch: "has no general.architecture key; it is not a model file",
        # a well-formed file whose values make no sense: a word where the layer count belongs
        write_header_gguf(
            tmp_path / "words.gguf", "llama", {"block_count": "three"}
        ): "has inconsistent metadata (ValueError: invalid literal for int()",
    }
    for path, phrase in cases.items():
        with pytest.raises(ModelError) as exc:
            model_info(path)
        assert phrase in str(exc.value) and "\n" not in str(exc.value), (path, exc.value)
        with pytest.raises(ModelError):
            check_request(path, budget=256)


def test_missing_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMSLOCAL_MODEL", str(tmp_path / "gone.gguf"))
    with pytest.raises(
        ModelError,
        match=r"default model not found at .*gone.gguf \(from \$AMSLOCAL_MODEL\); "
        r"fetch it with: python models/fetch.py",
    ):
        model_info(locate_model(None))


# --- budgets, scorers, text files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, n_ctx_train, message",
    [
        (0, None, "the budget must be a positive number of tokens (got 0)"),
        (-5, None, "the budget must be a positive number of tokens (got -5)"),
        (
            36,
            None,
            "budget 36 is too small: the smallest that works is 37 (the first 4 and the last 32 tokens always "
            "stay, and one more must be chosen)",
        ),
        (9000, 8192, "the budget 9000 is above the model's trained context (8192)"),
        ("abc", None, "the budget must be a whole number of tokens (got 'abc')"),
        (1.5, None, "the budget must be a whole number of tokens (got 1.5)"),
        (True, None, "the budget must be a whole number of tokens (got True)"),
        (None, None, "the budget must be a whole number of tokens (got None)"),
    ],
)
def test_bad_budgets(budget: Any, n_ctx_train: int | None, message: str) -> None:
    with pytest.raises(BudgetError) as exc:
        check_budget(budget, n_ctx_train)
    assert str(exc.value) == message
    assert exc.value.exit_code == 2


def test_good_budgets() -> None:
    assert check_budget(37) == 37  # the floor itself
    assert check_budget(8192, 8192) == 8192  # the trained context itself
    assert check_budget("512", 8192) == 512 and check_budget(512.0) == 512
    assert check_budget(10, n_sink=2, keep_last=4) == 10
    with pytest.raises(BudgetError, match="the smallest that works is 7 \\(the first 2 and the last 4 tokens"):
        check_budget(6, n_sink=2, keep_last=4)


def test_budget_defaults_match_compression_config() -> None:
    _backend()
    from amslocal.session import CompressionConfig

    cfg = CompressionConfig()
    assert (cfg.n_sink, cfg.keep_last) == (DEFAULT_N_SINK, DEFAULT_KEEP_LAST)


def test_check_request(tiny_path: Path) -> None:
    info = check_request(tiny_path, budget=256, scorer="tova", positions="compact")
    assert info["n_ctx_train"] == 2048
    with pytest.raises(BudgetError, match="above the model's trained context \\(2048\\)"):
        check_request(tiny_path, budget=4096)
    with pytest.raises(BudgetError, match="too small"):
        check_request(tiny_path, budget=8)
    with pytest.raises(OptionError, match="unknown scorer 'nope'"):
        check_request(tiny_path, budget=256, scorer="nope")


def test_scorers() -> None:
    assert check_scorer("tova") == "tova"
    with pytest.raises(OptionError) as exc:
        check_scorer("tovaa")
    assert str(exc.value).startswith("unknown scorer 'tovaa'; choose one of: ")
    assert "h2o" in str(exc.value) and "snapkv" in str(exc.value) and exc.value.exit_code == 2


def test_text_files(tmp_path: Path) -> None:
    good = tmp_path / "p.txt"
    good.write_text("héllo", encoding="utf-8")
    assert read_text_file(good) == "héllo"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    cases = {
        tmp_path / "none.txt": f"cannot read prompt file {tmp_path / 'none.txt'}: No such file or directory",
        tmp_path: f"cannot read prompt file {tmp_path}: Is a directory",
        bad: f"prompt file {bad} is not UTF-8 text (unexpected end of data at byte 3)",
    }
    for path, message in cases.items():
        with pytest.raises(InputError) as exc:
            read_text_file(path)
        assert str(exc.value) == message
    with pytest.raises(InputError, match="^cannot read file for /read"):
        read_text_file(tmp_path / "none.txt", what="file for /read")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_text_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hi")
    secret.chmod(0)
    with pytest.raises(InputError, match="Permission denied"):
        read_text_file(secret)
