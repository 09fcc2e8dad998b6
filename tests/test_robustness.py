"""Everyday robustness (issue 13): interrupted runs keep their results, bad input lines and a closed
stdin cost one line, piped chat reports failures in its exit status, and a busy session says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
from conftest import ROOT
from test_cli_errors import assert_one_line_error, run_cli


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_generate_interrupted_keeps_stats_and_ends_the_line(tiny_gguf, tmp_path, sig, code):
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amslocal",
            "generate",
            str(tiny_gguf),
            "-p",
            "Once upon a time",
            "-n",
            "1000000",
            "--ignore-eos",
            "--budget",
            "64",
            "--interval",
            "16",
            "-t",
            "1",
            "--stats-json",
            str(stats),
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=ROOT,
    )
    first = proc.stdout.read(20)  # generating now
    assert first
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == code, err
    assert (first + out).endswith(b"\n")
    assert "Traceback" not in err
    data = json.loads(stats.read_text())
    assert data["interrupted"] == signal.Signals(sig).name and data["generated_tokens"] > 0
    assert f"interrupted ({signal.Signals(sig).name})" in err  # the -v line
    assert "amslocal: error: interrupted" in err.splitlines()  # (-v also shows llama.cpp's own lines)


def test_generate_output_ends_with_a_newline(tiny_gguf):
    proc = run_cli("generate", str(tiny_gguf), "-p", "Hello", "-n", "5", "--ignore-eos", "-t", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")


def test_a_non_utf8_line_in_piped_chat_keeps_the_session(tiny_gguf):
    stdin = b"hello \xff\xfe there\n/stats\nand again\n"
    proc = subprocess.run(
        [sys.executable, "-m", "amslocal", "chat", str(tiny_gguf), "-n", "4", "-t", "1", "--temp", "0", "-q"],
        input=stdin,
        capture_output=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "internal error" not in err and "Traceback" not in err
    assert "messages" in proc.stdout.decode()  # /stats ran after the bad line: the session went on


def _closed_stdin():
    os.close(0)


@pytest.mark.parametrize("args", [["chat"], ["generate", "--prompt-file", "-"]])
def test_closed_stdin_is_one_line(tiny_gguf, args):
    cmd, *rest = args
    proc = subprocess.run(
        [sys.executable, "-m", "amslocal", cmd, str(tiny_gguf), *rest],
        stdin=None,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
        preexec_fn=_closed_stdin,
    )
    assert_one_line_error(proc, "standard input is closed", 2)


def test_piped_chat_exits_1_after_a_failed_command(tiny_gguf, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "amslocal", "chat", str(tiny_gguf), "-n", "4", "-t", "1", "-q"],
        input=f"/load {tmp_path / 'missing.chat'}\nhello\n",
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "amslocal: 1 message or command failed"


def test_status_line_counts_in_words():
    from amslocal.repl import ChatUI

    lines = []
    ui = ChatUI.__new__(ChatUI)
    ui.quiet = False
    stats = types.SimpleNamespace(compressions=1)
    turn = types.SimpleNamespace(reply_tokens=3, decode_tok_per_s=10.0, stop="eog")
    cfg = types.SimpleNamespace(budget=64, interval=16)
    ui.session = types.SimpleNamespace(last_turn=turn, stats=stats, config=cfg, cells_used=40)
    import amslocal.repl as repl

    saved = repl.say
    repl.say = lines.append
    try:
        ui.status()
        stats.compressions = 2
        ui.status()
    finally:
        repl.say = saved
    assert "1 compression" in lines[0] and "1 compressions" not in lines[0]
    assert "2 compressions" in lines[1]


def test_generate_on_a_busy_session_is_busy(tiny_model):
    from amslocal.api import Engine
    from amslocal.errors import SessionBusyError

    engine = Engine(tiny_model.path, n_threads=1)
    s = engine.session(budget=64, interval=16, max_tokens=100000, temperature=0.0)
    started = threading.Event()

    def work():
        for _ in s.chat("tell me everything", ignore_eos=True):
            started.set()

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(60)
    try:
        with pytest.raises(SessionBusyError):
            s.generate("more text", stream=False)
    finally:
        s.cancel()
        t.join(60)
        engine.close()


def test_a_save_file_without_its_kv_state_is_refused_by_name(tmp_path):
    import hashlib
    import io

    from amslocal import savefile
    from amslocal.errors import SaveFileError

    buf = io.BytesIO()
    doc = json.dumps({"format": savefile.FORMAT, "version": savefile.SAVE_VERSION}).encode()
    np.savez(buf, doc=np.frombuffer(doc, dtype=np.uint8))
    payload = buf.getvalue()
    data = (
        savefile._HEADER.pack(
            savefile.SAVE_MAGIC, savefile.SAVE_VERSION, len(payload), hashlib.sha256(payload).digest()
        )
        + payload
    )
    with pytest.raises(SaveFileError, match="holds no KV cache state"):
        savefile.unpack(data, "x.chat")


def test_gpu_offload_is_an_option_not_a_model_name(tiny_gguf):
    """-ngl N (llama.cpp's spelling) is parsed as an option; on a CPU build any N runs on the CPU."""
    proc = run_cli("generate", "-ngl", "99", str(tiny_gguf), "-p", "Hi", "-n", "2", "-t", "1")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("generate", str(tiny_gguf), "-ngl", "-2", "-p", "Hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


GEMMA3 = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.mark.skipif(not GEMMA3.exists(), reason="gemma3 missing (models/fetch.py --model gemma3)")
def test_llama_cpp_log_lines_only_with_verbose():
    """gemma3 makes llama.cpp log its SWA cache and a control-looking token: hidden unless -v."""
    quiet = run_cli("generate", str(GEMMA3), "-p", "Hi", "-n", "1", "-t", "1")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    loud = run_cli("generate", str(GEMMA3), "-p", "Hi", "-n", "1", "-t", "1", "-v")
    assert loud.returncode == 0 and "llama_kv_cache" in loud.stderr


def test_bounds_and_hints(tiny_gguf):
    """-t above the core count is clamped with a note; a context that cannot fit in memory is refused
    before anything is allocated; an interval past the trained context is refused in user terms."""
    proc = run_cli("generate", str(tiny_gguf), "-p", "Hi", "-n", "2", "-t", "999")
    assert proc.returncode == 0, proc.stderr
    assert f"note: -t 999 is more than this machine's {os.cpu_count()} cores" in proc.stderr
    big = run_cli("generate", str(tiny_gguf), "-p", "Hi", "-n", "1", "-c", str(10**12))
    assert_one_line_error(big, "GiB of KV cache", 2)
    assert "flash-attn" not in big.stderr
    far = run_cli("generate", str(tiny_gguf), "-p", "Hi", "--budget", "1000", "--interval", "100000")
    assert_one_line_error(far, "above the model's trained context (4096); lower --interval", 2)


def test_model_as_an_option(tiny_gguf):
    """-m/--model as llama.cpp users type it; two different models are a usage error."""
    proc = run_cli("generate", "-m", str(tiny_gguf), "-p", "Hi", "-n", "2", "-t", "1")
    assert proc.returncode == 0, proc.stderr
    assert run_cli("info", "--model", str(tiny_gguf)).returncode == 0
    both = run_cli("generate", str(tiny_gguf), "-m", str(tiny_gguf) + "x", "-p", "Hi")
    assert_one_line_error(both, "two models given", 2)


def test_calibrate_shows_progress_from_the_start_and_takes_threads(tiny_gguf, tmp_path):
    proc = run_cli("calibrate", str(tiny_gguf), "-t", "1", env={"AMSLOCAL_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "sampling calibration text 0/1024 tokens" in proc.stderr  # before the first sampled token
    assert "calibrating" in proc.stderr and "written to" in proc.stderr


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_soak_3000_tokens_at_budget_64_keeps_memory_flat(smollm2_model):
    """Unbounded generation stays bounded: 3,000 tokens at budget 64 after a warm-up, RSS growth
    under 5 MB and never more than budget + interval cells (per-head sets, the default)."""
    from amslocal.backend import ContextParams, SamplerParams
    from amslocal.session import CompressionConfig, Session

    s = Session(
        smollm2_model,
        CompressionConfig(budget=64, interval=16),
        ContextParams(n_threads=1),  # 2 threads collapse when another process shares the 2 cores
        SamplerParams(temp=0.8, seed=3),
    )
    for _ in s.generate(smollm2_model.tokenize("Once upon a time"), 400, ignore_eos=True):
        pass
    before = _rss_bytes()
    n = sum(1 for _ in s.generate([], 3000, ignore_eos=True))
    grown = _rss_bytes() - before
    assert n == 3000
    assert s.stats.kv_cells_peak <= 64 + 16 and s.stats.compressions >= 3000 // 16
    assert grown < 5 * 2**20, f"RSS grew {grown / 2**20:.1f} MB over 3,000 tokens"
    s.close()


def test_llama_cpp_spellings_and_samplers(tiny_gguf):
    """-fa/-ctk/-ctv/--min-p/--repeat-penalty as llama.cpp users type them; the penalty changes what
    greedy decoding picks (the tiny model repeats itself without it)."""
    base = ["generate", str(tiny_gguf), "-p", "abab", "-n", "40", "--temp", "0", "--ignore-eos", "-t", "1"]
    plain = run_cli(*base)
    penalised = run_cli(*base, "--repeat-penalty", "3.0")
    assert plain.returncode == 0 and penalised.returncode == 0, plain.stderr + penalised.stderr
    assert plain.stdout != penalised.stdout
    assert len(set(penalised.stdout)) >= len(set(plain.stdout))
    quant = run_cli(*base, "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "--min-p", "0.1")
    assert quant.returncode == 0, quant.stderr
    assert_one_line_error(run_cli(*base, "--repeat-penalty", "0"), "repeat-penalty", 2)


def test_batch_sizes_and_no_mmap(tiny_gguf, tiny_model):
    """-b/-ub/--no-mmap reach llama.cpp: the CLI runs with them, and the API passes them through."""
    proc = run_cli(
        "generate", str(tiny_gguf), "-p", "Hello there", "-n", "3", "-t", "1", "-b", "64", "-ub", "16", "--no-mmap"
    )
    assert proc.returncode == 0, proc.stderr
    from amslocal.api import Engine

    engine = Engine(tiny_model.path, n_threads=1, n_batch=64, n_ubatch=16, use_mmap=False)
    s = engine.session(budget=64, interval=16)
    params = s.session.gen.ctx.params
    assert (params.n_batch, params.n_ubatch) == (64, 16)
    engine.close()
