"""The ``amslocal`` command line.

Only this module prints. Generated text goes to stdout and nothing else does; every failure a user
can act on ends in one stderr line ``amslocal: error: <message>`` and a non-zero exit code. The
native backend is imported inside commands, so ``amslocal --help`` works without it.
"""

from __future__ import annotations

import os
import sys
import time
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


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", help="Prompt text (raw; BOS is added if the model wants it).")
@click.option("--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Most tokens to generate.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="Sampling temperature; 0 = greedy.")
@click.option("--seed", type=click.IntRange(min=0, max=0xFFFFFFFF), default=None, help="Sampling seed (default: random).")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0 disables.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=0.95, show_default=True,
              help="1.0 disables.")
@click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Context size in tokens (llama.cpp rounds it up to a multiple of 256).")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--cache-type-k", type=click.Choice(["f16", "q8_0", "q4_0", "f32"]), default="f16", show_default=True)
@click.option("--cache-type-v", type=click.Choice(["f16", "q8_0", "q4_0", "f32"]), default="f16", show_default=True,
              help="A quantized V cache needs --flash-attn on.")
@click.option("-t", "--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0 = all cores.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("-v", "--verbose", is_flag=True, help="Print a timing line to stderr.")
def generate(**options: Any) -> None:
    """Generate text from MODEL (default: the bundled SmolLM2-135M) and stream it to stdout."""
    try:
        _generate(**options)
    except KeyboardInterrupt:  # here, not in click, which would print a blank line first
        _fail("interrupted", EXIT_INTERRUPTED)


def _generate(model: Optional[str], prompt: Optional[str], prompt_file: Optional[str], max_tokens: int,
              temp: float, seed: Optional[int], top_k: int, top_p: float, ctx_size: int, flash_attn: str,
              cache_type_k: str, cache_type_v: str, threads: int, ignore_eos: bool, verbose: bool) -> None:
    text = _read_prompt(prompt, prompt_file)
    from .models import load_model, resolve_model

    # The file is checked before the backend loads, so a bad path is reported even on a stock build.
    path = resolve_model(model)
    # Lazy: the backend import raises BackendMissingError on a stock llama.cpp build.
    from .backend import ContextParams, SamplerParams
    from .engine import Generator, TextStream

    llm = load_model(path, validate=False)
    tokens = llm.tokenize(text, add_special=True, parse_special=False)
    if not tokens:
        raise click.ClickException("the prompt is empty")
    ctx_params = ContextParams(n_ctx=ctx_size, n_batch=min(512, ctx_size), n_ubatch=min(512, ctx_size),
                               n_threads=threads, flash_attn=flash_attn, type_k=cache_type_k, type_v=cache_type_v)
    sampler_params = SamplerParams(temp=temp, top_k=top_k, top_p=top_p,
                                   **({"seed": seed} if seed is not None else {}))
    gen = Generator(llm, ctx_params, sampler_params)
    n_ctx = gen.ctx.n_ctx
    if len(tokens) > n_ctx:
        raise click.ClickException(f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; raise --ctx-size")
    # Without compression the cache cannot outgrow n_ctx; stop there rather than fail in llama_decode.
    budget = min(max_tokens, n_ctx - len(tokens))

    stream = TextStream(llm)
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a non-UTF-8 terminal gets "?" for what it cannot show, not a crash
        out.reconfigure(errors="replace")
    n_gen = 0
    t0 = time.perf_counter()
    t1 = t0
    try:
        gen.eval(tokens)
        t1 = time.perf_counter()
        for tok in gen.generate([], budget, ignore_eos=ignore_eos):  # [] : the prompt is already in
            n_gen += 1
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
    t2 = time.perf_counter()

    if budget < max_tokens and n_gen == budget:
        _say(f"note: stopped after {n_gen} tokens at the context limit ({n_ctx}); raise --ctx-size")
    if verbose:
        prefill, decode = t1 - t0, t2 - t1
        _say(f"prompt {len(tokens)} tok, prefill {len(tokens) / max(prefill, 1e-9):.1f} tok/s; "
             f"generated {n_gen} tok, decode {n_gen / decode if n_gen and decode > 0 else 0.0:.1f} tok/s")


if __name__ == "__main__":  # pragma: no cover
    main()
