"""``amslocal chat`` as a user meets it: a pseudo-terminal, piped input, Ctrl-C, bad input.

The pty tests drive the real command with pexpect. Exact save/load continuity is checked on the
next-token logits, which the hidden ``AMSLOCAL_DEBUG_LOGITS=DIR`` makes the chat write after each
message is read (``turn-NNN.npy``, NNN = user messages in the conversation).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEFAULT_MODEL, ROOT, needs_model
from test_cli_errors import assert_one_line_error, run_cli

pexpect = pytest.importorskip("pexpect")


SYSTEM = "You are a terse assistant who answers in one sentence."
# budget 96 + interval 32 on SmolLM2: three turns force several compressions
COMPRESSING = ["--budget", "96", "--interval", "32", "--temp", "0", "-t", "1", "-n", "40"]
STATUS = re.compile(r"amslocal: (\d+) tokens, [\d.]+ tok/s, cells (\d+)/(\d+)\+(\d+), (\d+) compressions?([^\r\n]*)")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _spawn(*args: str, **env: str):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "amslocal", "chat", str(DEFAULT_MODEL), *args],
        cwd=str(ROOT),
        env=_env(**env),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 250),
    )
    child.expect_exact(">>> ")
    return child


def _say(child, message: str) -> tuple[str, re.Match]:
    """Send a message; return (reply text, status match) once the next prompt is shown."""
    child.sendline(message)
    child.expect_exact(message + "\r\n")  # the terminal's echo
    child.expect(STATUS)
    reply, status = child.before.strip(), child.match
    child.expect_exact(">>> ")
    return reply, status


@needs_model
def test_pty_two_turns_stats_save_then_load_in_a_new_process(tmp_path: Path) -> None:
    save = tmp_path / "chat.ams"
    dir_a, dir_b = tmp_path / "logits-a", tmp_path / "logits-b"
    questions = [
        "Hello! Please tell me about the moon and its phases.",
        "Now tell me about the sun and why it shines so brightly.",
        "Which of the two did I ask about first?",
    ]

    a = _spawn(*COMPRESSING, "--system", SYSTEM, AMSLOCAL_DEBUG_LOGITS=str(dir_a))
    for q in questions[:2]:
        reply, status = _say(a, q)
        assert reply, "a greedy reply from SmolLM2 is never empty"
        assert int(status.group(2)) <= 128  # cells never above budget + interval
    a.sendline("/stats")
    a.expect(r"compressions\s+(\d+)")
    compressions = int(a.match.group(1))
    a.expect(r"system prompt\s+(\d+)/(\d+) tokens in cache")
    kept, total = int(a.match.group(1)), int(a.match.group(2))
    a.expect_exact(">>> ")
    assert compressions >= 1, "budget 96 + interval 32 must have compressed within two turns"
    assert total > 0 and kept == total, "the system prompt must survive compression"
    a.sendline(f"/save {save}")
    a.expect(r"saved \d+ messages")
    a.expect_exact(">>> ")
    reply_a, _ = _say(a, questions[2])
    _say(a, "Thank you. Say goodbye.")  # after compressions that happened since the save
    a.sendline("/exit")
    a.expect(pexpect.EOF)
    a.close()
    assert a.exitstatus == 0

    # a fresh process with other settings: asking first (control), then /load and asking again
    b = _spawn("-t", "1", AMSLOCAL_DEBUG_LOGITS=str(dir_b))
    _say(b, questions[2])
    b.sendline(f"/load {save}")
    b.expect(r"loaded .*: 5 messages, \d+ cells, budget 96, scorer rkv")
    b.expect_exact(">>> ")
    reply_b, _ = _say(b, questions[2])
    _say(b, "Thank you. Say goodbye.")
    b.sendline("/exit")
    b.expect(pexpect.EOF)
    b.close()
    assert b.exitstatus == 0

    after_a = np.load(dir_a / "turn-003.npy")
    after_b = np.load(dir_b / "turn-003.npy")
    control = np.load(dir_b / "turn-001.npy")
    assert after_a.dtype == np.float32 and after_a.shape == after_b.shape
    assert not np.array_equal(control, after_a), "without /load the logits must differ (the check can fail)"
    assert np.array_equal(after_a, after_b), f"max |diff| {np.abs(after_a - after_b).max()}"
    assert reply_a == reply_b
    assert np.array_equal(np.load(dir_a / "turn-004.npy"), np.load(dir_b / "turn-004.npy"))


@needs_model
def test_pty_ctrl_c_stops_a_reply_and_keeps_the_session() -> None:
    child = _spawn("--budget", "96", "--interval", "32", "--temp", "0", "-t", "1", "-n", "100000", "--ignore-eos")
    for message in ("Tell me a very long story about a lighthouse.", "Go on with the story, please."):
        child.sendline(message)
        child.expect_exact(message + "\r\n")
        child.expect(r"\w")  # the reply is streaming
        time.sleep(0.3)
        t0 = time.monotonic()
        child.sendintr()
        child.expect(STATUS, timeout=10)
        assert time.monotonic() - t0 < 5, "Ctrl-C must stop the reply promptly"
        assert "stopped" in child.match.group(6)
        assert 0 < int(child.match.group(1)) < 100000
        child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"messages\s+4 \(2 replies\)")  # both interrupted replies stayed in the conversation
    child.expect_exact(">>> ")
    child.sendintr()  # Ctrl-C at the prompt quits with 130
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


# --- piped input -----------------------------------------------------------------------------


def _chat_piped(stdin: str, *args: str, model: Path = DEFAULT_MODEL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amslocal", "chat", str(model), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=120,
    )


@needs_model
@needs_model
def test_pty_a_pasted_block_is_one_message() -> None:
    """A multi-line paste (the terminal marks it: bracketed paste, which the chat turns on) is one
    message and one reply, not one per line; `\\` continuation still works."""
    child = _spawn("--budget", "96", "--interval", "32", "--temp", "0", "-t", "1", "-n", "8")
    child.send("\x1b[200~First line of the paste.\rSecond line.\rThird line.\x1b[201~\r")
    child.expect(STATUS)
    child.expect_exact(">>> ")
    child.sendline("Two lines \\")
    child.sendline("joined by a backslash.")
    child.expect(STATUS)
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"messages\s+4 \(2 replies\)")  # two messages, two replies: the paste was one
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@needs_model
def test_pty_progress_of_a_long_message_moves() -> None:
    """Reading a long message under a small budget shows a progress line that advances chunk by
    chunk to the message's length (it used to stay at its first value)."""
    child = _spawn("--budget", "96", "--interval", "32", "--temp", "0", "-t", "1", "-n", "4")
    child.sendline(" ".join(f"The quick brown fox jumps over the lazy dog number {i}." for i in range(60)))
    child.expect(STATUS)
    frames = [(int(a), int(b)) for a, b in re.findall(r"reading \[[#.]+\] (\d+)/(\d+) tokens", child.before)]
    assert len(frames) >= 5, frames
    done = [a for a, _ in frames]
    assert done == sorted(done) and done[-1] == frames[-1][1] > done[0]
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()


def test_piped_chat_runs_to_the_end() -> None:
    proc = _chat_piped("What is the capital of France?\n/stats\nAnd of Italy?\n", *COMPRESSING, "--system", SYSTEM)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(STATUS.findall(proc.stderr)) == 2, proc.stderr  # one status line per reply
    assert "Paris" in proc.stdout
    assert re.search(r"messages\s+3 \(1 reply\)", proc.stdout)
    assert ">>>" not in proc.stdout  # no prompts without a terminal


@needs_model
def test_piped_keep_too_long_for_the_budget_is_one_line_and_the_chat_goes_on() -> None:
    """--keep -1 with a first message longer than the budget can protect: that message is refused in
    one line, nothing else is lost, and the next (short) message is kept and answered."""
    proc = _chat_piped("word " * 300 + "\nWhat is the capital of France?\n", *COMPRESSING, "--keep", "-1")
    assert proc.returncode == 1, proc.stderr  # a message failed
    assert "Traceback" not in proc.stderr
    assert re.search(r"--keep -1 \(with the system prompt\) keeps \d+ prompt tokens", proc.stderr), proc.stderr
    assert len(STATUS.findall(proc.stderr)) == 1, proc.stderr  # the second message was answered
    assert proc.stdout.strip()


@needs_model
def test_piped_bad_input_keeps_the_session(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.ams"
    damaged.write_bytes(b"AMSCHAT\x00" + os.urandom(200))
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is pineapple.")
    lines = [
        "/frobnicate",
        "/budget lots",
        "/budget 5",
        f"/load {damaged}",
        f"/load {tmp_path / 'none.ams'}",
        f"/read {tmp_path / 'missing.txt'}",
        "/scorer nope",
        "/save",
        f"/read {notes}",
        "What is the secret word?",
    ]
    proc = _chat_piped("\n".join(lines) + "\n", *COMPRESSING)
    # the session goes on after every failure, and the exit status tells a script that some failed
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "amslocal: 8 messages or commands failed"
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("amslocal: error:")]
    expected = [
        "unknown command /frobnicate",
        "bad /budget value 'lots'",
        "budget 5 is too small",
        "damaged",
        "cannot read",
        "cannot read",
        "unknown scorer nope",
        "/save needs a FILE",
    ]
    assert len(errors) == len(expected), proc.stderr
    for line, phrase in zip(errors, expected):
        assert phrase in line, (phrase, line)
    assert "goes into your next message" in proc.stderr
    assert len(STATUS.findall(proc.stderr)) == 1  # the message after all that still got a reply
    assert "pineapple" in proc.stdout.lower()


def test_piped_chat_on_a_model_without_template(tiny_gguf: Path) -> None:
    # no chat template in the tiny GGUF: ChatML, stopping at the text <|im_end|>
    proc = _chat_piped(
        "hello\nagain\n", "--budget", "256", "--interval", "32", "--temp", "0", "-t", "1", "-n", "20", model=tiny_gguf
    )
    assert proc.returncode == 0, proc.stderr
    assert len(STATUS.findall(proc.stderr)) == 2, proc.stderr


# --- startup errors: one line, non-zero exit -------------------------------------------------


@pytest.mark.parametrize(
    "flags, phrase, code",
    [
        (["--budget", "0"], "the budget must be a positive number of tokens", 2),
        (["--budget", "lots"], "--budget", 2),
        (["--budget", "5000"], "above the model's trained context (4096)", 2),
        (["--budget", "20"], "budget 20 is too small", 2),
        (["--scorer", "nope"], "--scorer", 2),
        (["--chat-template", "{% for %}"], "chat template (custom): syntax error", 1),
        (["--chat-template", "no-such-file.jinja"], "neither a file nor template text", 2),
        (["--chat-template", "{{ raise_exception('no chatting here') }}"], "no chatting here", 1),
        (["--keep", "-2"], "--keep", 2),
    ],
)
def test_chat_startup_errors(tiny_gguf: Path, flags: list[str], phrase: str, code: int) -> None:
    assert_one_line_error(run_cli("chat", str(tiny_gguf), *flags), phrase, code)


def test_chat_missing_model(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("chat", str(tmp_path / "nope.gguf")), "model file not found", 2)


def test_chat_system_prompt_too_long_for_budget(tiny_gguf: Path) -> None:
    proc = run_cli("chat", str(tiny_gguf), "--budget", "64", "--interval", "16", "--system", "x" * 200)
    assert_one_line_error(proc, "the system prompt and its template take", 2)
