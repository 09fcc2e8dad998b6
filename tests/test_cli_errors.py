"""The CLI's contract on bad input: one ``amslocal: error:`` line on stderr, non-zero exit, no traceback.

Every case runs ``python -m amslocal`` in a subprocess, because the contract is about what a user
sees (stderr, exit code), including failures that happen while importing the native backend.
Also: generation on a tiny random model and on the default model, and the file checker in-process.
``tiny_gguf`` (a path) comes from conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_gguf import write_not_gguf, write_truncated_gguf

from amslocal.errors import ModelError
from amslocal.gguf_check import read_arch, validate_gguf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TIMEOUT_S = 120


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m amslocal ARGS`` with this process's environment plus ``env``."""
    full_env = dict(os.environ)
    # the subprocess must import this checkout even when the package is not installed
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "amslocal", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=TIMEOUT_S,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, phrase: str, code: int | None = None) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    detail = f"rc={proc.returncode} stderr={proc.stderr!r}"
    assert proc.returncode != 0, detail
    if code is not None:
        assert proc.returncode == code, detail
    assert "Traceback" not in proc.stderr, detail
    assert len(lines) == 1, detail
    assert lines[0].startswith("amslocal: error:"), detail
    assert phrase in lines[0], detail
    assert proc.stdout == "", f"stdout must stay clean: {proc.stdout!r}"


# --- bad model files -------------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    assert_one_line_error(run_cli("generate", str(missing), "-p", "hi"), f"model file not found: {missing}", 2)


def test_model_is_a_directory(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("generate", str(tmp_path), "-p", "hi"), "is a directory", 2)


def test_not_gguf(tmp_path: Path) -> None:
    bad = write_not_gguf(tmp_path / "random.gguf")
    assert_one_line_error(run_cli("generate", str(bad), "-p", "hi"), f"{bad} is not a GGUF file", 2)


def test_empty_file_is_not_gguf(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("generate", str(empty), "-p", "hi"), "is not a GGUF file", 2)


def test_truncated_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    cut = write_truncated_gguf(tiny_gguf, tmp_path / "cut.gguf")
    assert_one_line_error(run_cli("generate", str(cut), "-p", "hi"), "is damaged or truncated", 2)


def test_missing_default_model(tmp_path: Path) -> None:
    proc = run_cli("generate", "-p", "hi", env={"AMSLOCAL_MODEL": str(tmp_path / "gone.gguf")})
    assert_one_line_error(proc, "default model not found at", 2)
    assert "python models/fetch.py" in proc.stderr


# --- bad prompts and flags -------------------------------------------------------------------


def test_missing_prompt_file(tmp_path: Path, tiny_gguf: Path) -> None:
    proc = run_cli("generate", str(tiny_gguf), "--prompt-file", str(tmp_path / "none.txt"))
    assert_one_line_error(proc, "cannot read prompt file")


def test_prompt_file_is_a_directory(tmp_path: Path, tiny_gguf: Path) -> None:
    assert_one_line_error(
        run_cli("generate", str(tiny_gguf), "--prompt-file", str(tmp_path)), "cannot read prompt file"
    )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_prompt_file(tmp_path: Path, tiny_gguf: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hi")
    secret.chmod(0)
    assert_one_line_error(run_cli("generate", str(tiny_gguf), "--prompt-file", str(secret)), "Permission denied")


def test_prompt_file_not_utf8(tmp_path: Path, tiny_gguf: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    assert_one_line_error(run_cli("generate", str(tiny_gguf), "--prompt-file", str(bad)), "not UTF-8")


def test_no_prompt(tiny_gguf: Path) -> None:
    assert_one_line_error(run_cli("generate", str(tiny_gguf)), "exactly one of", 2)


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--flash-attn", "maybe"], "--flash-attn"),
        (["--cache-type-k", "q9_9"], "--cache-type-k"),
        (["--max-tokens", "many"], "--max-tokens"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flag(tiny_gguf: Path, flags: list[str], phrase: str) -> None:
    assert_one_line_error(run_cli("generate", str(tiny_gguf), "-p", "hi", *flags), phrase, 2)


def test_bench_speed_refuses_a_quantized_v_cache_without_flash_attention(tiny_gguf: Path) -> None:
    args = ["--depths", "32", "--n-gen", "1", "--rounds", "1", "--methods", "streaming", "--no-stock", "-q"]
    proc = run_cli("bench", "speed", "--model", str(tiny_gguf), *args, "-fa", "off", "-ctv", "q8_0")
    assert_one_line_error(proc, "a quantized V cache needs --flash-attn on")


def test_unknown_command() -> None:
    assert_one_line_error(run_cli("frobnicate"), "frobnicate", 2)


# --- the backend -----------------------------------------------------------------------------


def test_help_without_backend(tmp_path: Path) -> None:
    # An empty library directory: nothing native can load, yet --help must work.
    proc = run_cli("--help", env={"LLAMA_CPP_LIB_PATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout


def test_serve_without_the_server_extra(tmp_path: Path, tiny_gguf: Path) -> None:
    # a directory that shadows fastapi with a package that cannot be imported
    (tmp_path / "fastapi").mkdir()
    (tmp_path / "fastapi" / "__init__.py").write_text("raise ImportError('no fastapi', name='fastapi')\n")
    proc = run_cli("serve", str(tiny_gguf), env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{PROJECT_ROOT}"})
    assert_one_line_error(proc, "pip install 'amslocal[server]'")


def test_backend_library_missing(tmp_path: Path, tiny_gguf: Path) -> None:
    proc = run_cli("generate", str(tiny_gguf), "-p", "hi", env={"LLAMA_CPP_LIB_PATH": str(tmp_path)})
    assert_one_line_error(proc, "native/setup.sh", 3)


def _stock_lib_dir() -> str | None:
    """A stock libllama: $AMSLOCAL_STOCK_LIB_DIR, or one that `native/build.py --stock-lib` cached."""
    if os.environ.get("AMSLOCAL_STOCK_LIB_DIR"):
        return os.environ["AMSLOCAL_STOCK_LIB_DIR"]
    cache = Path(os.environ.get("AMSLOCAL_CACHE_DIR", Path.home() / ".cache" / "amslocal"))
    found = sorted(cache.glob("stock-lib/*/libllama.so"))
    return str(found[-1].parent) if found else None


def test_stock_backend() -> None:
    stock = _stock_lib_dir()
    if not stock:
        pytest.skip("no stock libllama: set AMSLOCAL_STOCK_LIB_DIR or run: python native/build.py --stock-lib DIR")
    proc = run_cli("generate", str(DEFAULT_MODEL), "-p", "hi", env={"LLAMA_CPP_LIB_PATH": stock})
    assert_one_line_error(proc, "stock build", 3)


# --- generation (needs the patched backend) --------------------------------------------------


def test_prompt_longer_than_context(tiny_gguf: Path) -> None:
    # the tiny tokenizer gives one token per ASCII character, plus BOS
    proc = run_cli("generate", str(tiny_gguf), "-p", "a" * 300, "--ctx-size", "256", "--temp", "0")
    assert_one_line_error(proc, "the prompt is 301 tokens but the context holds 256")


def test_generate_tiny(tiny_gguf: Path) -> None:
    proc = run_cli(
        "generate", str(tiny_gguf), "-p", "hello", "--max-tokens", "8", "--temp", "0", "--ignore-eos", "--verbose"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout, "eight tokens were generated, so some text must come out"
    assert "Traceback" not in proc.stderr
    assert "generated 8 tok" in proc.stderr  # the --verbose timing line


def test_generate_default_model() -> None:
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"default model missing ({DEFAULT_MODEL}); fetch it with: python models/fetch.py")
    proc = run_cli("generate", "-p", "The capital of France is", "--max-tokens", "8", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "greedy decoding of a real model should say something"
    assert proc.stderr == "", proc.stderr


# --- the file checker, in-process ------------------------------------------------------------


def test_validate_accepts_tiny_gguf(tiny_gguf: Path) -> None:
    validate_gguf(tiny_gguf)
    assert read_arch(tiny_gguf) == "llama"


def test_validate_rejects_cut_header(tmp_path: Path, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    for n in (6, 30, 2000):  # inside the version, the counts, and the metadata
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelError, match="damaged or truncated"):
            validate_gguf(cut)


def test_validate_rejects_last_bytes_missing(tmp_path: Path, tiny_gguf: Path) -> None:
    cut = tmp_path / "short.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-1])
    with pytest.raises(ModelError, match="data ends at byte"):
        validate_gguf(cut)


# --- budgets and models that cannot be compressed --------------------------------------------
# (header-only checks from amslocal.models / amslocal.info; the ones marked `wired` need cli.py to
# call models.check_request before loading, which comes with the `amslocal info` command)

import functools  # noqa: E402


@functools.lru_cache(maxsize=1)
def _wired() -> bool:
    return run_cli("info", "--help").returncode == 0


def _need_wiring() -> None:
    if not _wired():
        pytest.skip("cli.py does not call models.check_request / has no `info` command yet")


@pytest.mark.parametrize(
    "budget, phrase",
    [
        ("0", "the budget must be a positive number of tokens (got 0)"),
        ("-3", "the budget must be a positive number of tokens (got -3)"),
        ("10", "budget 10 is too small: the smallest that works is 37"),
        ("5000", "the budget 5000 is above the model's trained context (4096)"),
        ("lots", "--budget"),
    ],
)
def test_bad_budget(tiny_gguf: Path, budget: str, phrase: str) -> None:
    assert_one_line_error(run_cli("generate", str(tiny_gguf), "-p", "hi", "--budget", budget), phrase, 2)


def test_unknown_scorer(tiny_gguf: Path) -> None:
    assert_one_line_error(
        run_cli("generate", str(tiny_gguf), "-p", "hi", "--budget", "64", "--scorer", "nope"), "--scorer", 2
    )


def test_budget_on_recurrent_model(tmp_path: Path) -> None:
    _need_wiring()
    from test_info import write_header_gguf

    mamba = write_header_gguf(
        tmp_path / "mamba.gguf",
        "mamba",
        {
            "context_length": 4096,
            "embedding_length": 64,
            "block_count": 2,
            "attention.head_count": 0,
            "ssm.conv_kernel": 4,
            "ssm.inner_size": 128,
            "ssm.state_size": 16,
            "ssm.time_step_rank": 4,
        },
    )
    proc = run_cli("generate", str(mamba), "-p", "hi", "--budget", "256")
    assert_one_line_error(proc, "mamba.gguf cannot be compressed: recurrent state cannot be evicted per token", 2)


def test_compact_positions_on_mrope_model(tmp_path: Path) -> None:
    _need_wiring()
    from test_info import write_header_gguf

    vl = write_header_gguf(
        tmp_path / "vl.gguf",
        "qwen2vl",
        {
            "context_length": 4096,
            "embedding_length": 128,
            "block_count": 2,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "rope.dimension_sections": [8, 12, 12, 0],
        },
    )
    proc = run_cli("generate", str(vl), "-p", "hi", "--budget", "256", "--positions", "compact")
    assert_one_line_error(proc, "--positions compact is not possible", 2)


def test_budget_checked_before_the_backend(tmp_path: Path, tiny_gguf: Path) -> None:
    # a budget that cannot work is reported even where the native library cannot load
    _need_wiring()
    proc = run_cli("generate", str(tiny_gguf), "-p", "hi", "--budget", "10", env={"LLAMA_CPP_LIB_PATH": str(tmp_path)})
    assert_one_line_error(proc, "budget 10 is too small", 2)
