"""The interactive chat loop of ``amslocal chat``: reads lines, runs slash commands, streams replies.

Only this module and the CLI print; the :class:`~amslocal.chat.ChatSession` underneath never does.
Piped input is read line by line (one message per line); a line ending in ``\\`` continues on the next.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import click

from .errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED

PROG = "amslocal"
BRACKETED_PASTE_ON, BRACKETED_PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"

CHAT_HELP = """\
commands:
  /help            this list
  /clear           forget the conversation (the system prompt stays) and start a fresh cache
  /stats           cache, compression and speed statistics
  /budget N        keep N cells from the next message on; a smaller budget cuts the cache then,
                   a larger one moves the session into a larger context (the cache is kept)
  /scorer NAME     score with NAME from the next compression on (the cache is first cut to
                   the budget with the current scorer)
  /save FILE       save the session (conversation, compressed cache, controller state)
  /load FILE       replace the session with a saved one (same model file; its settings return)
  /read FILE       put FILE's text into your next message
  /exit            quit (also Ctrl-D)
A line ending in \\ continues on the next line; start a message with // to send a leading /.
Ctrl-C stops a reply and keeps the session; Ctrl-C at the prompt quits with exit code 130."""


def say(message: str) -> None:
    """One line on stderr, whatever newlines ``message`` carries."""
    click.echo(f"{PROG}: {' '.join(str(message).split())}", err=True)


def _clean(line: str) -> str:
    """A line as valid text: bytes that are not UTF-8 (kept by Python as surrogates) become U+FFFD,
    so one bad line costs that line's odd characters, not the session."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return line.encode("utf-8", "replace").decode("utf-8")


def scorer_names() -> list[str]:
    from .scorers import SCORERS  # pure Python (no backend)

    return sorted(SCORERS)


class ChatUI:
    """The chat loop: reads lines, runs slash commands, streams replies; only the CLI prints."""

    def __init__(self, session: Any, *, quiet: bool, ignore_eos: bool):
        self.session = session
        self.quiet = quiet
        self.ignore_eos = ignore_eos
        self.interactive = sys.stdin.isatty()
        self.progress_tty = sys.stderr.isatty()
        self.pending: list[str] = []  # texts from /read, for the next message
        self.failures = 0  # messages and commands that failed (piped chat exits 1 if any did)
        self.out = sys.stdout
        if hasattr(self.out, "reconfigure"):
            self.out.reconfigure(errors="replace")
        debug_dir = os.environ.get("AMSLOCAL_DEBUG_LOGITS")
        if debug_dir:  # hidden: the next-token logits of every turn, for exact comparisons in tests
            session.logits_hook = self._dump_logits_to(Path(debug_dir))

    def _dump_logits_to(self, folder: Path):
        import numpy as np

        folder.mkdir(parents=True, exist_ok=True)

        def dump(logits: Any) -> None:
            turn = sum(1 for m in self.session.messages if m["role"] == "user")
            np.save(folder / f"turn-{turn:03d}.npy", logits)

        return dump

    def error(self, message: str) -> None:
        self.failures += 1
        say(f"error: {message}")

    def info(self, message: str) -> None:
        click.echo(message, err=True)

    # --- the loop ---------------------------------------------------------------------------

    def read_line(self) -> Optional[str]:
        """One message or command (None at the end of input); a trailing backslash continues, and
        a bracketed paste (the terminal marks it) is one message however many lines it has."""
        try:
            line = _clean(input(">>> " if self.interactive else ""))
            if PASTE_START in line:  # the line editor passed the paste markers through: read to the end
                while PASTE_END not in line:
                    line += "\n" + _clean(input(""))
                line = line.replace(PASTE_START, "").replace(PASTE_END, "")
            while line.endswith("\\"):
                line = line[:-1] + "\n" + _clean(input("... " if self.interactive else ""))
        except EOFError:
            if self.interactive:
                click.echo("")
            return None
        return line

    def run(self) -> int:
        if self.interactive and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # started with Ctrl-C ignored (by a launcher without job control): at a terminal the
            # chat still stops a reply and quits at the prompt on Ctrl-C, as documented
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.interactive and sys.stdout.isatty():
            # ask the terminal to mark pastes, so that a pasted block is one message (GNU readline
            # then returns it as one line; otherwise read_line joins the marked lines)
            sys.stdout.write(BRACKETED_PASTE_ON)
            sys.stdout.flush()
        try:
            return self._loop()
        finally:
            if self.interactive and sys.stdout.isatty():
                sys.stdout.write(BRACKETED_PASTE_OFF)
                sys.stdout.flush()

    def _loop(self) -> int:
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:  # Ctrl-C at the prompt quits
                click.echo("")
                return EXIT_INTERRUPTED
            if line is None:
                return self.finish()
            text = line.strip()
            if text.startswith("/") and not text.startswith("//"):
                if self.command(text) == "exit":
                    return self.finish()
                continue
            if text.startswith("//"):
                line = line.lstrip()[1:]
            message = "\n\n".join(self.pending + ([line] if line.strip() else []))
            if not message.strip():
                continue
            self.pending = []
            self.reply(message)

    def finish(self) -> int:
        """The exit status at the end of input or /exit: piped input that had a failing message or
        command exits 1 (and says so), so a script sees it."""
        if self.failures and not self.interactive:
            say(
                f"{self.failures} message{'s' if self.failures != 1 else ''} or command"
                f"{'s' if self.failures != 1 else ''} failed"
            )
            return 1
        return 0

    # --- a reply ----------------------------------------------------------------------------

    def reply(self, message: str) -> None:
        import signal

        from .errors import AmsError

        s = self.session
        shown = [False]

        def progress(done: int, total: int) -> None:
            if self.progress_tty and total >= 256:
                width = 30
                filled = width * done // total
                click.echo(
                    f"\r{PROG}: reading [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tokens",
                    err=True,
                    nl=False,
                )
                shown[0] = True

        previous = signal.signal(signal.SIGINT, lambda signum, frame: s.cancel())
        wrote = False
        try:
            for piece in s.chat(message, on_progress=progress, ignore_eos=self.ignore_eos):
                if shown[0]:
                    click.echo("\r\x1b[K", err=True, nl=False)
                    shown[0] = False
                self.out.write(piece)
                self.out.flush()
                wrote = True
        except AmsError as exc:
            if wrote:
                self.out.write("\n")
            self.error(str(exc))
            return
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        finally:
            signal.signal(signal.SIGINT, previous)
            if shown[0]:
                click.echo("\r\x1b[K", err=True, nl=False)
        self.out.write("\n")
        self.out.flush()
        self.status()

    def status(self) -> None:
        if self.quiet:
            return
        s = self.session
        t = s.last_turn
        st = s.stats
        cfg = s.config
        cells = (
            f"cells {s.cells_used}/{cfg.budget}+{cfg.interval}"
            if cfg.budget is not None
            else f"cells {s.cells_used}/{s.session.n_ctx} (no budget)"
        )
        note = {
            "cancelled": ", stopped",
            "max_tokens": ", max tokens reached",
            "context_full": ", context full",
            "cancelled_reading": ", stopped while reading (the message was cut to what was read)",
        }.get(t.stop, "")
        n = st.compressions
        events = f"{n} compression{'s' if n != 1 else ''}"
        say(f"{t.reply_tokens} tokens, {t.decode_tok_per_s:.1f} tok/s, {cells}, {events}{note}")

    # --- slash commands ---------------------------------------------------------------------

    def command(self, text: str) -> Optional[str]:
        from .errors import AmsError

        name, _, arg = text.partition(" ")
        arg = arg.strip()
        handlers = {
            "/help": self.cmd_help,
            "/clear": self.cmd_clear,
            "/stats": self.cmd_stats,
            "/budget": self.cmd_budget,
            "/scorer": self.cmd_scorer,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/read": self.cmd_read,
        }
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        handler = handlers.get(name)
        if handler is None:
            self.error(f"unknown command {name} (type /help)")
            return None
        try:
            handler(arg)
        except AmsError as exc:
            self.error(str(exc))
        return None

    def _need(self, arg: str, command: str, what: str) -> bool:
        if not arg:
            self.error(f"{command} needs {what}")
            return False
        return True

    def cmd_help(self, arg: str) -> None:
        click.echo(CHAT_HELP)

    def cmd_clear(self, arg: str) -> None:
        self.session.clear()
        self.pending = []
        self.info("conversation cleared")

    def cmd_stats(self, arg: str) -> None:
        s = self.session
        st = s.stats
        cfg = s.config
        replies = sum(1 for m in s.messages if m["role"] == "assistant")
        kept, total = s.system_tokens_in_cache()
        n_ctx = s.session.n_ctx
        budget = f"budget {cfg.budget} (+{cfg.interval} interval)" if cfg.budget is not None else "no budget"
        rows = [
            ("messages", f"{len(s.messages)} ({replies} {'reply' if replies == 1 else 'replies'})"),
            ("cells", f"{s.cells_used} used, {budget}, context {n_ctx}, peak {st.kv_cells_peak}"),
            (
                "compressions",
                f"{st.compressions} (compactions {st.compactions}, evicted {st.evicted_tokens} tokens, "
                f"{st.compress_ms_total:.0f} ms)",
            ),
            ("system prompt", f"{kept}/{total} tokens in cache"),
            ("protected", f"{len(s.session.protected_positions)} positions"),
            ("prompt", f"{st.prompt_tokens} tokens, {st.prefill_tok_per_s:.1f} tok/s"),
            ("generated", f"{st.generated_tokens} tokens, {st.decode_tok_per_s:.1f} tok/s"),
            ("scorer", f"{cfg.scorer}, {'AMS' if cfg.ams else 'top-k'}, positions {cfg.positions}"),
            ("template", f"{s.template.kind}; full re-reads {s.refeeds}"),
        ]
        for key, value in rows:
            click.echo(f"{key:<15}{value}")

    def cmd_budget(self, arg: str) -> None:
        if not self._need(arg, "/budget", "a number of tokens"):
            return
        try:
            budget = int(arg)
        except ValueError:
            self.error(f"bad /budget value {arg!r}: give a number of tokens")
            return
        if budget <= 0:
            self.error(f"bad /budget value {budget}: the budget must be positive")
            return
        self.session.set_budget(budget)
        self.info(f"budget {budget} (+{self.session.config.interval}): takes effect from the next message")

    def cmd_scorer(self, arg: str) -> None:
        if not self._need(arg, "/scorer", "a scorer name (" + ", ".join(scorer_names()) + ")"):
            return
        self.session.set_scorer(arg)
        self.info(f"scorer {arg}: takes effect from the next compression")

    def cmd_save(self, arg: str) -> None:
        if not self._need(arg, "/save", "a FILE"):
            return
        n = self.session.save(Path(arg).expanduser())
        s = self.session
        self.info(f"saved {len(s.messages)} messages and {s.cells_used} cells to {arg} ({n / 1024:.0f} KiB)")

    def cmd_load(self, arg: str) -> None:
        if not self._need(arg, "/load", "a FILE"):
            return
        s = self.session
        s.load(Path(arg).expanduser())
        cfg = s.config
        budget = f"budget {cfg.budget}" if cfg.budget is not None else "no budget"
        self.info(f"loaded {arg}: {len(s.messages)} messages, {s.cells_used} cells, {budget}, scorer {cfg.scorer}")

    def cmd_read(self, arg: str) -> None:
        if not self._need(arg, "/read", "a FILE"):
            return
        try:
            text = Path(arg).expanduser().read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            self.error(f"{arg} is not UTF-8 text ({exc.reason} at byte {exc.start})")
            return
        except OSError as exc:
            self.error(f"cannot read {arg}: {exc.strerror or exc}")
            return
        self.pending.append(text)
        self.info(f"read {arg} ({len(text)} characters); it goes into your next message")
