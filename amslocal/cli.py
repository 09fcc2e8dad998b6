"""The ``amslocal`` command line.

Only this module prints. Generated text goes to stdout and nothing else does; every failure a user
can act on ends in one stderr line ``amslocal: error: <message>`` and a non-zero exit code. The
native backend is imported inside commands, so ``amslocal --help`` works without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import click

from . import __version__
from .errors import AmsError

PROG = "amslocal"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# click >= 8.2 raises this for a bare group; older click prints the help and exits 0 itself
_NoArgsIsHelpError: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _say(message: str) -> None:
    """One line on stderr, whatever newlines ``message`` carries."""
    click.echo(f"{PROG}: {' '.join(str(message).split())}", err=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    _say(f"error: {message}")
    sys.exit(code)


class _OneLineGroup(click.Group):
    """A group whose usage errors print as one ``amslocal: error:`` line instead of click's block."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # a caller (tests, embedding) handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name or PROG, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelpError as exc:  # bare `amslocal`: the help is wanted, not an error line
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            _fail(exc.format_message() + hint, exc.exit_code)
        except (click.Abort, KeyboardInterrupt, EOFError):
            _fail("interrupted", EXIT_INTERRUPTED)
        except AmsError as exc:
            _fail(str(exc), exc.exit_code)
        except Exception as exc:
            if os.environ.get("AMSLOCAL_DEBUG"):
                raise
            _fail(f"internal error: {exc.__class__.__name__}: {exc} (set AMSLOCAL_DEBUG=1 for a traceback)")
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def main() -> None:
    """Run GGUF models locally with a KV cache that stays inside a fixed token budget."""


def _read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of -p/--prompt or --prompt-file")
    if prompt is not None:
        return prompt
    assert prompt_file is not None
    try:
        if prompt_file == "-":
            return sys.stdin.read()
        return Path(prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"prompt file {prompt_file} is not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        raise click.ClickException(f"cannot read prompt file {prompt_file}: {exc.strerror or exc}")


def _scorer_names() -> list[str]:
    # the scorer registry is pure Python (no backend): safe to import for option choices
    from .scorers import SCORERS

    return sorted(SCORERS)


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", help="Prompt text (raw; BOS is added if the model wants it).")
@click.option("--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Tokens to generate at most.")
@click.option("--budget", type=int, default=None,
              help="KV cache budget in tokens (default: full cache, no compression).")
@click.option("--interval", type=click.IntRange(min=1), default=128, show_default=True,
              help="Compress when budget + interval cells are occupied.")
@click.option("--scorer", type=click.Choice(_scorer_names()), default="tova", show_default=True)
@click.option("--no-ams", is_flag=True, help="Global top-k selection instead of AMS segments.")
@click.option("--positions", type=click.Choice(["keep", "compact"]), default="keep", show_default=True,
              help="Kept tokens keep their positions, or are shifted to dense positions.")
@click.option("--aggregation", type=click.Choice(["mean", "max", "rank"]), default="mean", show_default=True,
              help="How per-layer, per-head scores become one ranking per token.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="Sampling temperature; 0 = greedy.")
@click.option("--seed", type=click.IntRange(min=0, max=0xFFFFFFFF), default=None, help="Sampling seed (default: random).")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0 disables.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=0.95, show_default=True,
              help="1.0 disables.")
@click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Context size without --budget (llama.cpp rounds it up to a multiple of 256).")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--cache-type-k", type=click.Choice(["f16", "q8_0", "q4_0", "f32"]), default="f16", show_default=True)
@click.option("--cache-type-v", type=click.Choice(["f16", "q8_0", "q4_0", "f32"]), default="f16", show_default=True,
              help="A quantized V cache needs --flash-attn on.")
@click.option("-t", "--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0 = all cores.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("--stats-json", metavar="PATH", help="Write run statistics (tokens, speeds, cells, compressions) as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Print a timing line to stderr.")
def generate(**options: Any) -> None:
    """Generate text from MODEL (default: the bundled SmolLM2-135M) and stream it to stdout."""
    try:
        _generate(**options)
    except KeyboardInterrupt:  # here, not in click, which would print a blank line first
        _fail("interrupted", EXIT_INTERRUPTED)


def _generate(model: Optional[str], prompt: Optional[str], prompt_file: Optional[str], max_tokens: int,
              budget: Optional[int], interval: int, scorer: str, no_ams: bool, positions: str, aggregation: str,
              temp: float, seed: Optional[int], top_k: int, top_p: float, ctx_size: int, flash_attn: str,
              cache_type_k: str, cache_type_v: str, threads: int, ignore_eos: bool, stats_json: Optional[str],
              verbose: bool) -> None:
    text = _read_prompt(prompt, prompt_file)
    if budget is not None and budget <= 0:
        raise click.BadParameter(f"the budget must be a positive number of tokens (got {budget})", param_hint="--budget")
    from .models import load_model, resolve_model

    # The file is checked before the backend loads, so a bad path is reported even on a stock build.
    path = resolve_model(model)
    # Lazy: the backend import raises BackendMissingError on a stock llama.cpp build.
    from .backend import ContextParams, SamplerParams
    from .engine import TextStream
    from .session import CompressionConfig, Session

    llm = load_model(path, validate=False)
    tokens = llm.tokenize(text, add_special=True, parse_special=False)
    if not tokens:
        raise click.ClickException("the prompt is empty")
    if budget is not None and budget > llm.n_ctx_train:
        raise click.BadParameter(f"the budget {budget} is above the model's trained context ({llm.n_ctx_train})",
                                 param_hint="--budget")
    config = CompressionConfig(budget=budget, interval=interval, scorer=scorer, ams=not no_ams,
                               positions=positions, aggregation=aggregation)
    if budget is not None and scorer == "triattention":
        from .calibration import load_for_model

        config.calibration = load_for_model(path)
    ctx_params = ContextParams(n_ctx=ctx_size, n_batch=min(512, ctx_size), n_ubatch=min(512, ctx_size),
                               n_threads=threads, flash_attn=flash_attn, type_k=cache_type_k, type_v=cache_type_v)
    sampler_params = SamplerParams(temp=temp, top_k=top_k, top_p=top_p,
                                   **({"seed": seed} if seed is not None else {}))
    session = Session(llm, config, ctx_params, sampler_params)
    n_ctx = session.gen.ctx.n_ctx
    if budget is None and len(tokens) > n_ctx:
        raise click.ClickException(f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; "
                                   "raise --ctx-size or set a --budget")

    stream = TextStream(llm)
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a non-UTF-8 terminal gets "?" for what it cannot show, not a crash
        out.reconfigure(errors="replace")
    try:
        for tok in session.generate(tokens, max_tokens, ignore_eos=ignore_eos):
            piece = stream.push(tok)
            if piece:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        out.write(stream.flush())
        out.flush()
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at /dev/null so the exit flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    out.write(stream.flush())
    out.flush()

    st = session.stats
    if budget is None and st.generated_tokens < max_tokens and len(tokens) + st.generated_tokens >= n_ctx:
        _say(f"note: stopped after {st.generated_tokens} tokens at the context limit ({n_ctx}); "
             "raise --ctx-size or set a --budget")
    if stats_json:
        import json

        try:
            Path(stats_json).write_text(json.dumps(st.as_dict(), indent=2) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write --stats-json {stats_json}: {exc.strerror}") from None
    if verbose:
        _say(f"prompt {st.prompt_tokens} tok, prefill {st.prefill_tok_per_s:.1f} tok/s; "
             f"generated {st.generated_tokens} tok, decode {st.decode_tok_per_s:.1f} tok/s; "
             f"cells peak {st.kv_cells_peak}, compressions {st.compressions} ({st.compress_ms_total:.0f} ms)")


@main.command()
@click.argument("model", required=False)
@click.option("--text", "text_file", metavar="FILE", help="Calibrate on this text (default: text the model samples itself).")
@click.option("--max-tokens", type=click.IntRange(min=64), default=2048, show_default=True,
              help="Tokens of text to run at most.")
def calibrate(model: Optional[str], text_file: Optional[str], max_tokens: int) -> None:
    """Measure the query statistics TriAttention needs, once per model file."""
    text = _read_prompt(None, text_file) if text_file else None
    from .models import resolve_model

    path = resolve_model(model)
    from .calibration import calibrate as run_calibration

    def progress(done: int, total: int) -> None:
        click.echo(f"\r{PROG}: calibrating {done}/{total} tokens", err=True, nl=False)

    out = run_calibration(path, text, max_tokens=max_tokens, progress=progress)
    click.echo("", err=True)
    _say(f"calibration of {path.name} written to {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
