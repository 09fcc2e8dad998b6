"""The ``amslocal`` command line.

Only this module prints. Generated text goes to stdout and nothing else does; every failure a user
can act on ends in one stderr line ``amslocal: error: <message>`` and a non-zero exit code. The
native backend is imported inside commands, so ``amslocal --help`` works without it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

import click

from . import __version__
from .config import DEFAULT_KEEP_LAST, DEFAULT_N_SINK
from .errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED, AmsError

PROG = "amslocal"
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

    def main(
        self,
        args: Optional[Sequence[str]] = None,
        prog_name: Optional[str] = None,
        complete_var: Optional[str] = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
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


def _clamp_threads(value: int) -> int:
    """More threads than cores only slows llama.cpp down (its threads spin-wait on each other)."""
    cores = os.cpu_count() or 1
    if value > cores:
        _say(f"note: -t {value} is more than this machine's {cores} cores; using {cores}")
        return cores
    return value


# -t as generate, chat and calibrate take it: 0 = the default, more than the cores is clamped
_threads_option = click.option(
    "-t",
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="0 = every core but one (a busy core makes more threads collapse).",
    callback=lambda ctx, param, value: _clamp_threads(value),
)


def _check_kv_memory(facts: dict, n_ctx: int, type_k: str, type_v: str) -> None:
    """Refuse a context whose KV cache cannot fit in this machine's memory, before allocating it."""
    sizes = facts.get("kv_bytes_per_token") or {}
    known = [sizes.get(t) for t in (type_k, type_v) if sizes.get(t)]  # K and V both at the larger type: an upper bound
    per_token = max(known) if known else None
    cache_type = type_k if type_k == type_v else f"{type_k}/{type_v}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return
    if per_token and per_token * n_ctx > 0.9 * total:
        raise click.BadParameter(
            f"a context of {n_ctx} cells needs {per_token * n_ctx / 2**30:.1f} GiB of KV cache ({cache_type}); "
            f"this machine has {total / 2**30:.1f} GiB of memory",
            param_hint="--ctx-size",
        )


def _model_option(f: Callable) -> Callable:
    """``-m/--model FILE`` (llama.cpp's spelling) as well as the positional MODEL; see :func:`_merge_model`."""
    return click.option(
        "-m",
        "--model",
        "model_option",
        metavar="GGUF",
        default=None,
        help="The model file (the same as the MODEL argument).",
    )(f)


def _merge_model(options: dict) -> dict:
    """Fold ``-m`` into ``model``; both given (and different) is a usage error."""
    opt = options.pop("model_option", None)
    if opt is not None:
        if options.get("model") is not None and options["model"] != opt:
            raise click.UsageError(f"two models given: {options['model']} and -m {opt}")
        options["model"] = opt
    return options


def _read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of -p/--prompt or --prompt-file")
    if prompt is not None:
        return prompt
    assert prompt_file is not None
    if prompt_file == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise click.UsageError("--prompt-file -: standard input is closed")
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise click.UsageError(f"--prompt-file -: standard input is not UTF-8 text ({exc.reason})") from None
    from .models import read_text_file

    return read_text_file(prompt_file, what="prompt file")


def _scorer_names() -> list[str]:
    # the scorer registry is pure Python (no backend): safe to import for option choices
    from .scorers import SCORERS

    return sorted(SCORERS)


def _options(*decorators: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """Apply several click options as one decorator (they show in --help in this order)."""

    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


# what `generate` and `chat` share: how the cache is compressed, sampled, and run
_compression_options = _options(
    click.option(
        "--interval",
        type=click.IntRange(min=1),
        default=128,
        show_default=True,
        help="Compress when budget + interval cells are occupied.",
    ),
    click.option("--scorer", type=click.Choice(_scorer_names()), default="rkv", show_default=True),
    click.option(
        "--no-ams",
        is_flag=True,
        help="Global top-k selection instead of AMS segments (without it: AMS when the budget leaves "
        "128 cells or more beyond the sinks and the recent window, else top-k).",
    ),
    click.option(
        "--ams-variant",
        type=click.Choice(["mean", "peaked", "vote"]),
        default="vote",
        show_default=True,
        help="AMS on one token set: one mass curve (row mean), rows weighted by peakedness, or per-row "
        "AMS with voting.",
    ),
    click.option(
        "--no-question-aware",
        is_flag=True,
        help="Score prompt compressions by the prompt read so far, not by its last tokens decoded ahead.",
    ),
    click.option(
        "--positions",
        type=click.Choice(["keep", "compact"]),
        default="keep",
        show_default=True,
        help="Kept tokens keep their positions, or are shifted to dense positions.",
    ),
    click.option(
        "--granularity",
        type=click.Choice(["auto", "token", "layer", "head"]),
        default="auto",
        show_default=True,
        help="One token set for the whole cache, one per layer, or one per (layer, KV head): each row "
        "keeps what it attends to, in the same cells. auto: head where the model allows it.",
    ),
    click.option(
        "--aggregation",
        type=click.Choice(["mean", "max", "rank"]),
        default="mean",
        show_default=True,
        help="How per-layer, per-head scores become one ranking per token.",
    ),
)
_sampling_options = _options(
    click.option(
        "--temp",
        type=click.FloatRange(min=0.0),
        default=0.8,
        show_default=True,
        help="Sampling temperature; 0 = greedy.",
    ),
    click.option(
        "--seed",
        type=click.IntRange(min=0, max=0xFFFFFFFE),
        default=None,
        help="Sampling seed (default: random); with a seed, output is reproducible.",
    ),
    click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0 disables."),
    click.option(
        "--top-p", type=click.FloatRange(min=0.0, max=1.0), default=0.95, show_default=True, help="1.0 disables."
    ),
    click.option(
        "--min-p", type=click.FloatRange(min=0.0, max=1.0), default=0.05, show_default=True, help="0 disables."
    ),
    click.option(
        "--repeat-penalty",
        type=click.FloatRange(min=0.0, min_open=True),
        default=1.0,
        show_default=True,
        help="Penalise tokens seen in the last 64 (1.0 = off).",
    ),
)
# chat's and serve's context when the budget is off
_ctx_size_budget_off = click.option(
    "-c",
    "--ctx-size",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Context size with --budget off.",
)
# llama.cpp's constrained sampling, for generate and chat
_grammar_options = _options(
    click.option("--grammar", metavar="GBNF", default=None, help="Only sample what this GBNF grammar allows."),
    click.option("--grammar-file", metavar="FILE", default=None, help="The same, from a file."),
    click.option(
        "-j", "--json-schema", metavar="SCHEMA", default=None, help="Only sample JSON that this JSON schema allows."
    ),
    click.option("-jf", "--json-schema-file", metavar="FILE", default=None, help="The same, from a file."),
)
# the attention kernel and the cache's types (llama.cpp's -fa, -ctk, -ctv): the runtime, and bench speed
_kv_options = _options(
    click.option("-fa", "--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True),
    click.option(
        "-ctk", "--cache-type-k", type=click.Choice(["f16", "q8_0", "q4_0", "f32"]), default="f16", show_default=True
    ),
    click.option(
        "-ctv",
        "--cache-type-v",
        type=click.Choice(["f16", "q8_0", "q4_0", "f32"]),
        default="f16",
        show_default=True,
        help="A quantized V cache needs --flash-attn on.",
    ),
)
_runtime_options = _options(
    _kv_options,
    _threads_option,
    click.option(
        "-b", "--batch-size", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt batch (tokens)."
    ),
    click.option(
        "-ub",
        "--ubatch-size",
        type=click.IntRange(min=1),
        default=512,
        show_default=True,
        help="Physical micro-batch (at most the batch).",
    ),
    click.option("--no-mmap", is_flag=True, help="Read the weights into memory instead of mapping the file."),
    click.option(
        "-ngl",
        "--n-gpu-layers",
        "n_gpu_layers",
        type=click.IntRange(min=-1),
        default=None,
        help="Layers to offload to the GPU (-1 = all) [default: all on a GPU build, $AMSLOCAL_N_GPU_LAYERS].",
    ),
)


def _make_engine(
    path: Path,
    threads: int,
    n_gpu_layers: Optional[int],
    flash_attn: str,
    cache_type_k: str,
    cache_type_v: str,
    batch_size: int,
    ubatch_size: int,
    no_mmap: bool,
) -> Any:
    """The runtime of generate, chat and serve, from their shared runtime options."""
    from .api import Engine

    return Engine(
        path,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        n_batch=batch_size,
        n_ubatch=ubatch_size,
        use_mmap=not no_mmap,
    )


def _chat_budget(parsed: Optional[int], interval: int, n_train: int) -> Optional[int]:
    """chat's and serve's budget: given, None for off (-1), or by default 1024 (less for a short
    trained context)."""
    if parsed is None:
        return min(1024, max(n_train - interval, 1))
    if parsed == -1:
        return None
    if parsed > n_train:
        raise click.BadParameter(
            f"the budget {parsed} is above the model's trained context ({n_train})", param_hint="--budget"
        )
    return parsed


def _compression_kwargs(
    interval: int,
    scorer: str,
    no_ams: bool,
    ams_variant: str,
    no_question_aware: bool,
    positions: str,
    granularity: str,
    aggregation: str,
) -> dict:
    """:meth:`Engine.session` keywords of the shared compression options."""
    return dict(
        interval=interval,
        scorer=scorer,
        ams=False if no_ams else None,  # None: AMS when the budget leaves room for it (CompressionConfig)
        ams_variant=ams_variant,
        question_aware=not no_question_aware,
        positions=positions,
        granularity=granularity,
        aggregation=aggregation,
    )


def _sampling_kwargs(
    temp: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, seed: Optional[int]
) -> dict:
    """:meth:`Engine.session` keywords of the shared sampling options."""
    return dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)


@main.command()
@click.argument("model", required=False)
@_model_option
@click.option("-p", "--prompt", help="Prompt text (raw; BOS is added if the model wants it).")
@click.option("--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin).")
@click.option(
    "-n", "--max-tokens", type=click.IntRange(min=0), default=128, show_default=True, help="Tokens to generate at most."
)
@click.option(
    "--budget", type=int, default=None, help="KV cache budget in tokens (default: full cache, no compression)."
)
@_compression_options
@_sampling_options
@_grammar_options
@click.option(
    "--keep",
    type=click.IntRange(min=-1),
    default=0,
    show_default=True,
    help="Prompt tokens that are never evicted, as llama.cpp's --keep (-1: the whole prompt).",
)
@click.option(
    "-c",
    "--ctx-size",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Context size without --budget (llama.cpp rounds it up to a multiple of 256).",
)
@_runtime_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option(
    "--stats-json", metavar="PATH", help="Write run statistics (tokens, speeds, cells, compressions) as JSON."
)
@click.option("-v", "--verbose", is_flag=True, help="Print llama.cpp's own log lines and a timing line to stderr.")
def generate(**options: Any) -> None:
    """Generate text from MODEL (default: the bundled SmolLM2-135M) and stream it to stdout."""
    try:
        _generate(**_merge_model(options))
    except KeyboardInterrupt:  # here, not in click, which would print a blank line first
        _fail("interrupted", EXIT_INTERRUPTED)


def _generate(
    model: Optional[str],
    prompt: Optional[str],
    prompt_file: Optional[str],
    max_tokens: int,
    budget: Optional[int],
    interval: int,
    scorer: str,
    no_ams: bool,
    ams_variant: str,
    no_question_aware: bool,
    positions: str,
    granularity: str,
    aggregation: str,
    temp: float,
    seed: Optional[int],
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    grammar: Optional[str],
    grammar_file: Optional[str],
    json_schema: Optional[str],
    json_schema_file: Optional[str],
    keep: int,
    ctx_size: int,
    flash_attn: str,
    cache_type_k: str,
    cache_type_v: str,
    threads: int,
    n_gpu_layers: Optional[int],
    batch_size: int,
    ubatch_size: int,
    no_mmap: bool,
    ignore_eos: bool,
    stats_json: Optional[str],
    verbose: bool,
) -> None:
    text = _read_prompt(prompt, prompt_file)
    from .grammar import read_grammar_options
    from .models import check_request

    gbnf = read_grammar_options(grammar, grammar_file, json_schema, json_schema_file)

    # Header-only checks before the backend loads, so they are reported even on a stock build: the
    # file, and with a budget whether the cache can be compressed and whether the budget can work.
    facts = check_request(model, budget=budget, positions=positions if budget is not None else None)
    path = Path(facts["path"])
    _check_kv_memory(facts, ctx_size if budget is None else budget + interval, cache_type_k, cache_type_v)
    # Lazy: the backend import raises BackendMissingError on a stock llama.cpp build.
    from .backend import set_llama_log

    set_llama_log(verbose)  # llama.cpp's own lines only with -v
    engine = _make_engine(
        path, threads, n_gpu_layers, flash_attn, cache_type_k, cache_type_v, batch_size, ubatch_size, no_mmap
    )
    tokens = engine.model.tokenize(text, add_special=True, parse_special=False)
    if not tokens:
        raise click.ClickException("the prompt is empty")
    session = engine.session(
        budget=budget,
        **_compression_kwargs(
            interval, scorer, no_ams, ams_variant, no_question_aware, positions, granularity, aggregation
        ),
        chat_template="chatml",  # raw text: the model's own template is never rendered
        **_sampling_kwargs(temp, top_k, top_p, min_p, repeat_penalty, seed),
        grammar=gbnf,
        max_tokens=max_tokens,
        ctx_size=ctx_size,
    )
    n_ctx = session.n_ctx
    if budget is None and len(tokens) > n_ctx:
        raise click.ClickException(
            f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; raise --ctx-size or set a --budget"
        )

    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a non-UTF-8 terminal gets "?" for what it cannot show, not a crash
        out.reconfigure(errors="replace")
    last = ""  # the end of what was written, so the text can end with a newline
    # Ctrl-C and SIGTERM only raise the session's cancel flag (lock-free), read between prefill
    # chunks and tokens: an exception raised by a signal handler while llama.cpp is calling back
    # into Python (its log callback) would be swallowed by ctypes, and the run would not stop
    caught: list[str] = []

    def stop(signum: int, frame: Any) -> None:
        caught.append(signal.Signals(signum).name)
        session.cancel()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for piece in session.generate(text, max_tokens=max_tokens, ignore_eos=ignore_eos, keep=keep):
            out.write(piece)
            out.flush()
            last = piece
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at /dev/null so the exit flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    interrupted: Optional[str] = caught[0] if caught else None
    if last and not last.endswith("\n"):  # the stats line and the shell prompt go on their own line
        out.write("\n")
        out.flush()

    st = session.stats
    if (
        interrupted is None
        and budget is None
        and st.generated_tokens < max_tokens
        and len(tokens) + st.generated_tokens >= n_ctx
    ):
        _say(
            f"note: stopped after {st.generated_tokens} tokens at the context limit ({n_ctx}); "
            "raise --ctx-size or set a --budget"
        )
    if stats_json:
        import json

        stats = st.as_dict()
        if interrupted:
            stats["interrupted"] = interrupted
        try:
            Path(stats_json).write_text(json.dumps(stats, indent=2) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write --stats-json {stats_json}: {exc.strerror}") from None
    if verbose:
        _say(
            f"prompt {st.prompt_tokens} tok, prefill {st.prefill_tok_per_s:.1f} tok/s; "
            f"generated {st.generated_tokens} tok, decode {st.decode_tok_per_s:.1f} tok/s; "
            f"cells peak {st.kv_cells_peak}, compressions {st.compressions} ({st.compress_ms_total:.0f} ms)"
            + (f"; interrupted ({interrupted})" if interrupted else "")
        )
    if interrupted:
        _fail("interrupted", EXIT_TERMINATED if interrupted == "SIGTERM" else EXIT_INTERRUPTED)


@main.command()
@click.argument("model", required=False)
@_model_option
@click.option(
    "--text", "text_file", metavar="FILE", help="Calibrate on this text (default: text the model samples itself)."
)
@click.option(
    "--max-tokens", type=click.IntRange(min=64), default=2048, show_default=True, help="Tokens of text to run at most."
)
@_threads_option
def calibrate(
    model: Optional[str], model_option: Optional[str], text_file: Optional[str], max_tokens: int, threads: int
) -> None:
    """Measure the query statistics TriAttention needs, once per model file."""
    model = _merge_model({"model": model, "model_option": model_option})["model"]
    text = _read_prompt(None, text_file) if text_file else None
    from .models import resolve_model

    path = resolve_model(model)
    from .calibration import calibrate as run_calibration

    def sampling(done: int, total: int) -> None:
        click.echo(f"\r{PROG}: sampling calibration text {done}/{total} tokens", err=True, nl=False)

    def progress(done: int, total: int) -> None:
        click.echo(f"\r{PROG}: calibrating {done}/{total} tokens          ", err=True, nl=False)

    out = run_calibration(path, text, max_tokens=max_tokens, progress=progress, sampling=sampling, n_threads=threads)
    click.echo("", err=True)
    _say(f"calibration of {path.name} written to {out}")


def _parse_budget(value: Optional[str]) -> Optional[int]:
    """``None`` (not given), ``off`` (full cache) or a positive number of tokens."""
    if value is None:
        return None
    if value.strip().lower() in ("off", "none", "full"):
        return -1
    try:
        budget = int(value)
    except ValueError:
        raise click.BadParameter(
            f"expected a number of tokens or 'off' (got {value!r})", param_hint="--budget"
        ) from None
    if budget <= 0:
        raise click.BadParameter(
            f"the budget must be a positive number of tokens (got {budget})", param_hint="--budget"
        )
    return budget


def _read_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: a file's text, template text itself, or ``chatml``."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.ClickException(
                f"cannot read chat template file {value}: {getattr(exc, 'strerror', None) or exc}"
            )
    if value.strip().lower() == "chatml" or "{{" in value or "{%" in value:
        return value
    raise click.BadParameter(f"{value} is neither a file nor template text (or 'chatml')", param_hint="--chat-template")


@main.command()
@click.argument("model", required=False)
@_model_option
@click.option(
    "--budget",
    metavar="N|off",
    default=None,
    help="KV cache budget in tokens (default 1024, or less for a short trained context); "
    "'off' keeps the full cache of --ctx-size.",
)
@_compression_options
@click.option("-sys", "--system", metavar="TEXT", help="System prompt (never evicted).")
@click.option(
    "--keep",
    type=click.IntRange(min=-1),
    default=0,
    show_default=True,
    help="Tokens of the first message that are never evicted, as llama.cpp's --keep (-1: the whole message).",
)
@click.option(
    "--chat-template",
    metavar="STR|FILE",
    help="Jinja chat template (text or a file), or 'chatml'; default: the model's own.",
)
@_sampling_options
@_grammar_options
@click.option(
    "-n", "--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Tokens per reply at most."
)
@_ctx_size_budget_off
@_runtime_options
@click.option("-q", "--quiet", is_flag=True, help="No status line after each reply.")
@click.option("--ignore-eos", is_flag=True, hidden=True)  # tests: replies that only stop when told to
def chat(**options: Any) -> None:
    """Chat with MODEL (default: the bundled SmolLM2-135M) under a KV cache budget.

    Replies stream to stdout; a status line (tokens, speed, cells / budget, compressions) follows
    each reply on stderr. With piped input every line is one message; at the end of the input the
    command exits 0, or 1 if a message or command failed. Type /help in the chat for its commands.
    """
    try:
        sys.exit(_chat(**_merge_model(options)))
    except KeyboardInterrupt:  # outside a reply (loading): the usual interrupted line
        _fail("interrupted", EXIT_INTERRUPTED)


def _chat(
    model: Optional[str],
    budget: Optional[str],
    interval: int,
    scorer: str,
    no_ams: bool,
    ams_variant: str,
    no_question_aware: bool,
    positions: str,
    granularity: str,
    aggregation: str,
    system: Optional[str],
    keep: int,
    chat_template: Optional[str],
    temp: float,
    seed: Optional[int],
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    grammar: Optional[str],
    grammar_file: Optional[str],
    json_schema: Optional[str],
    json_schema_file: Optional[str],
    max_tokens: int,
    ctx_size: int,
    flash_attn: str,
    cache_type_k: str,
    cache_type_v: str,
    threads: int,
    n_gpu_layers: Optional[int],
    batch_size: int,
    ubatch_size: int,
    no_mmap: bool,
    quiet: bool,
    ignore_eos: bool,
) -> int:
    if sys.stdin is None or sys.stdin.closed:
        raise click.UsageError("standard input is closed: amslocal chat reads your messages from it")
    parsed = _parse_budget(budget)
    template = _read_chat_template(chat_template)
    from .grammar import read_grammar_options
    from .models import check_compressible, check_request

    gbnf = read_grammar_options(grammar, grammar_file, json_schema, json_schema_file)
    # header checks before the backend loads: the file, the budget, and whether the cache compresses
    compress = parsed != -1
    facts = check_request(model, budget=parsed if compress else None, positions=positions if compress else None)
    if compress and parsed is None:
        check_compressible(facts, positions=positions)
    path = Path(facts["path"])
    if parsed == -1:  # a budget bounds the cache by itself
        _check_kv_memory(facts, ctx_size, cache_type_k, cache_type_v)
    engine = _make_engine(
        path, threads, n_gpu_layers, flash_attn, cache_type_k, cache_type_v, batch_size, ubatch_size, no_mmap
    )
    chosen = _chat_budget(parsed, interval, engine.model.n_ctx_train)
    session = engine.session(
        budget=chosen,
        **_compression_kwargs(
            interval, scorer, no_ams, ams_variant, no_question_aware, positions, granularity, aggregation
        ),
        system=system,
        keep=keep,
        chat_template=template,
        **_sampling_kwargs(temp, top_k, top_p, min_p, repeat_penalty, seed),
        grammar=gbnf,
        max_tokens=max_tokens,
        ctx_size=ctx_size,
    )
    from .repl import ChatUI

    ui = ChatUI(session, quiet=quiet, ignore_eos=ignore_eos)
    if ui.interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
        budget_text = f"budget {chosen} (+{interval})" if chosen is not None else f"full cache of {ctx_size}"
        rows = session.config.granularity if chosen is not None else "token"
        sets = {"head": ", a token set per KV head", "layer": ", a token set per layer"}.get(rows, "")
        _say(
            f"chat with {path.name}: {budget_text}, scorer {scorer}{' + AMS' if session.config.ams else ''}{sets}, "
            f"template {session.template.kind}. /help for commands, Ctrl-C stops a reply, Ctrl-D quits."
        )
    return ui.run()


@main.command()
@click.argument("model", required=False)
@_model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option(
    "--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True, help="0 picks a free port."
)
@click.option(
    "--budget",
    metavar="N|off",
    default=None,
    help="KV budget of every conversation (default 1024, or less for a short trained context); requests may "
    "choose their own with kv_budget.",
)
@_compression_options
@click.option(
    "--chat-template",
    metavar="STR|FILE",
    help="Jinja chat template (text or a file), or 'chatml'; default: the model's own.",
)
@_sampling_options
@click.option(
    "-n",
    "--max-tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Tokens per reply when a request does not say.",
)
@_ctx_size_budget_off
@_runtime_options
@click.option(
    "--sessions", type=click.IntRange(min=1), default=4, show_default=True, help="Conversations kept live in memory."
)
@click.option(
    "--max-saved",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Conversations kept on disk; the least recently used beyond it are forgotten.",
)
@click.option(
    "--session-dir",
    metavar="DIR",
    default=None,
    help="Where idle conversations are saved (and found again after a restart) [default: a temporary "
    "directory removed at exit].",
)
@click.option(
    "--api-key",
    metavar="KEY",
    envvar="AMSLOCAL_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on every route but /health and the chat page [$AMSLOCAL_API_KEY].",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Requests waiting at most; more get 503 with Retry-After.",
)
@click.option("--alias", metavar="NAME", default=None, help="The model's name in the API [default: the file's stem].")
@click.option(
    "--cors-origin",
    "cors_origins",
    metavar="ORIGIN",
    multiple=True,
    help="Let web pages from ORIGIN call the API from a browser ('*': any); repeatable [default: none].",
)
@click.option(
    "--max-body", type=click.IntRange(min=1), default=8, show_default=True, help="Largest request body, in MiB."
)
@click.option("-v", "--verbose", is_flag=True, help="Print llama.cpp's log lines and one line per HTTP request.")
def serve(**options: Any) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API, with a chat page at /.

    Every conversation keeps a bounded cache; a client that resends the whole history each turn
    only has the new messages read. At most --sessions conversations stay in memory; the least
    recently used one is saved to --session-dir and restored when its conversation comes back.
    Ctrl-C or SIGTERM stop the server and save the live conversations.
    """
    try:
        sys.exit(_serve(**_merge_model(options)))
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)


def _serve(
    model: Optional[str],
    host: str,
    port: int,
    budget: Optional[str],
    interval: int,
    scorer: str,
    no_ams: bool,
    ams_variant: str,
    no_question_aware: bool,
    positions: str,
    granularity: str,
    aggregation: str,
    chat_template: Optional[str],
    temp: float,
    seed: Optional[int],
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    max_tokens: int,
    ctx_size: int,
    flash_attn: str,
    cache_type_k: str,
    cache_type_v: str,
    threads: int,
    n_gpu_layers: Optional[int],
    batch_size: int,
    ubatch_size: int,
    no_mmap: bool,
    sessions: int,
    max_saved: int,
    session_dir: Optional[str],
    api_key: Optional[str],
    max_queue: int,
    alias: Optional[str],
    cors_origins: tuple,
    max_body: int,
    verbose: bool,
) -> int:
    try:
        import uvicorn  # noqa: F401

        from .server.app import ServerConfig, create_app, make_server
    except ImportError as exc:
        raise click.ClickException(
            f"amslocal serve needs the server extra ({exc.name} is missing): pip install 'amslocal[server]'"
        ) from None
    import socket

    parsed = _parse_budget(budget)
    template = _read_chat_template(chat_template)
    if session_dir is not None and Path(session_dir).exists() and not Path(session_dir).is_dir():
        raise click.BadParameter(f"{session_dir} is not a directory", param_hint="--session-dir")
    from .backend import set_llama_log
    from .models import check_compressible, check_request

    set_llama_log(verbose)
    compress = parsed != -1
    facts = check_request(model, budget=parsed if compress else None, positions=positions if compress else None)
    if compress and parsed is None:
        check_compressible(facts, positions=positions)
    path = Path(facts["path"])
    per_session = ctx_size if parsed == -1 else (parsed or 1024) + interval
    _check_kv_memory(facts, per_session * sessions, cache_type_k, cache_type_v)
    try:  # bind first: a busy port is one line, before minutes of loading
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    engine = _make_engine(
        path, threads, n_gpu_layers, flash_attn, cache_type_k, cache_type_v, batch_size, ubatch_size, no_mmap
    )
    chosen = _chat_budget(parsed, interval, engine.model.n_ctx_train)
    session = dict(
        budget=chosen,
        **_compression_kwargs(
            interval, scorer, no_ams, ams_variant, no_question_aware, positions, granularity, aggregation
        ),
        chat_template=template,
        **_sampling_kwargs(temp, top_k, top_p, min_p, repeat_penalty, seed),
        max_tokens=max_tokens,
        ctx_size=ctx_size,
    )
    probe = engine.session(**session)  # a configuration that cannot work fails here, not at the first request
    ams_on = probe.config.ams  # what create_app decides for --budget too
    probe.close()
    config = ServerConfig(
        model_id=alias or path.stem,
        session=session,
        sessions=sessions,
        max_saved=max_saved,
        session_dir=session_dir,
        api_key=api_key,
        max_queue=max_queue,
        max_body_bytes=max_body << 20,
        cors_origins=tuple(cors_origins),
    )
    app = create_app(engine, config)
    bound = sock.getsockname()
    shown_host = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    if chosen is not None:
        cache_text = f"budget {chosen} (+{interval}), scorer {scorer}{' + AMS' if ams_on else ''}"
    else:
        cache_text = f"full cache of {ctx_size}"
    _say(
        f"serving {path.name} as '{config.model_id}' on http://{shown_host}:{bound[1]} ({cache_text}, "
        f"{sessions} live sessions); the chat page is at /. Ctrl-C stops."
    )

    server = make_server(app, verbose=verbose)
    try:
        server.run(sockets=[sock])
    finally:
        closed = app.state.amslocal.get("closed")
        engine.close()
    if closed and closed["saved"]:
        _say(f"saved {closed['saved']} live conversation(s) to {closed['dir']}")
    return 0


@main.command()
@click.argument("model", required=False)
@_model_option
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def info(model: Optional[str], model_option: Optional[str], as_json: bool) -> None:
    """Show MODEL's architecture, sizes, KV bytes per token and whether its cache can be compressed.

    Reads the GGUF header only: fast, and works without the native backend.
    """
    from .info import format_info, model_info
    from .models import locate_model

    model = _merge_model({"model": model, "model_option": model_option})["model"]
    facts = model_info(locate_model(model))
    try:  # the library this model would run on; info itself never needs it
        from .backend import library_info

        lib = library_info()
        backend = {**lib, "available": True}
        line = f"{' + '.join(lib['backends']) or 'unknown'} (llama-cpp-python {lib['llama_cpp_python']}, patched)"
        if lib["gpu_offload"]:
            line += "; layers offload to the GPU by default (-ngl)"
    except AmsError as exc:
        backend = {"available": False, "reason": str(exc)}
        line = f"not available: {exc}"
    if as_json:
        import json

        click.echo(json.dumps({**facts, "backend": backend}, indent=2))
    else:
        click.echo(format_info(facts, [("backend", line)]))


@main.group(cls=click.Group)
def bench() -> None:
    """Measure quality under a budget (accuracy, fidelity, passkey) and decode speed."""


def _int_list(value: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers, got {value!r}", param_hint=what) from None
    if not out or any(x <= 0 for x in out):
        raise click.BadParameter(f"expected positive whole numbers, got {value!r}", param_hint=what)
    return sorted(set(out))


@bench.command("quality")
@click.option(
    "--task",
    type=click.Choice(["gsm8k", "math500", "aime24", "passkey", "fidelity", "perplexity", "chat"]),
    required=True,
)
@click.option("--model", "model", metavar="GGUF", default=None, help="Model file (default: the default model).")
@click.option(
    "--budgets",
    default=None,
    help="Comma-separated KV budgets (tokens over the prompt; absolute cells for passkey and perplexity) "
    "[default: 96,128,192; perplexity 256,512,1024].",
)
@click.option(
    "--budget-base",
    type=click.Choice(["prompt", "absolute"]),
    default=None,
    help="Budgets count on top of the prompt, or whole cells [default: prompt; absolute for passkey].",
)
@click.option(
    "--methods",
    default="full,context-shift,streaming,tova,ams-tova",
    show_default=True,
    help="Comma-separated: full, context-shift, S (global top-k) or ams-S for a scorer S; 'all' for every one.",
)
@click.option(
    "-n",
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Items (passkey: items per depth).",
)
@click.option(
    "--out", "out_dir", metavar="DIR", default=None, help="Results directory [default: bench-results/TASK-MODEL]."
)
@click.option("--data", "data_dir", metavar="DIR", default=None, help="Where the sets are [default: ../shared/data].")
@click.option(
    "--interval",
    type=click.IntRange(min=1),
    default=None,
    help="Memory is budget + interval cells; sessions compress back to the budget when it is full "
    "[default: 32; passkey 128, its long prompt goes through in chunks of this size].",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Per answer [default: 512; passkey 16; fidelity 256].",
)
@click.option(
    "--n-keep",
    type=int,
    default=0,
    show_default=True,
    help="context-shift: tokens kept at the start, like llama.cpp's --keep (-1: the whole prompt); "
    "chat task: tokens of the first message never evicted.",
)
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Samples per item (pass@k; needs --temp > 0).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--passkey-tokens",
    type=click.IntRange(min=64),
    default=2048,
    show_default=True,
    help="passkey: approximate prompt length.",
)
@click.option(
    "--doc-tokens",
    type=click.IntRange(min=64),
    default=2048,
    show_default=True,
    help="perplexity: tokens of each document.",
)
@click.option(
    "--step",
    type=click.IntRange(min=1),
    default=None,
    help="perplexity: tokens per lockstep slice [default: the interval, at most 128]; 1 feeds token by token "
    "(the same numbers, slower: for checking).",
)
@click.option(
    "--turns",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="chat: GSM8K questions per conversation (-n counts conversations).",
)
@click.option(
    "--no-replay",
    is_flag=True,
    help="Decode every token of every method (default: feed the full cache's answer up to the first compression).",
)
@click.option(
    "--no-question-aware",
    is_flag=True,
    help="Score prompt compressions by the prompt read so far, not by its last tokens decoded ahead.",
)
@click.option(
    "--aggregation",
    type=click.Choice(["mean", "max", "rank"]),
    default="mean",
    show_default=True,
    help="Every method: how per-layer, per-head scores become one ranking per token (token sets).",
)
@click.option(
    "--positions",
    type=click.Choice(["keep", "compact"]),
    default="keep",
    show_default=True,
    help="Every method: kept tokens keep their positions, or are compacted at every event.",
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG pictures.")
@click.option(
    "-t",
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="0 = every core but one (a busy core makes more threads collapse).",
)
@click.option(
    "--shard",
    metavar="I/K",
    default=None,
    help="Run only items I, I+K, I+2K, ... (start K processes with -t 1 into one --out; "
    "on a few cores K single-thread processes beat one K-thread process).",
)
@click.option("--report-only", is_flag=True, help="Summarise and plot what --out holds; run nothing.")
@click.option(
    "--summary-name",
    metavar="NAME",
    default="summary",
    show_default=True,
    help="Write NAME.json and NAME.md (and NAME-*.png plots), e.g. to report a subset of methods or items "
    "of one directory with --report-only.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def bench_quality(
    task: str,
    model: Optional[str],
    budgets: Optional[str],
    budget_base: Optional[str],
    methods: str,
    n: int,
    out_dir: Optional[str],
    data_dir: Optional[str],
    interval: Optional[int],
    max_tokens: Optional[int],
    n_keep: int,
    temp: float,
    top_p: float,
    samples: int,
    seed: int,
    passkey_tokens: int,
    doc_tokens: int,
    step: Optional[int],
    turns: int,
    no_replay: bool,
    no_question_aware: bool,
    aggregation: str,
    positions: str,
    no_plots: bool,
    threads: int,
    shard: Optional[str],
    report_only: bool,
    summary_name: str,
    quiet: bool,
) -> None:
    """Accuracy (gsm8k, math500, aime24, passkey) or fidelity to the full cache, per method and budget.

    Resumable: run the same command again and it continues where it stopped. Writes one JSONL
    line per item, summary.json, summary.md and PNG plots into --out.
    """
    from .bench.methods import parse_methods
    from .bench.quality import QualityRun, run_quality
    from .bench.runner import RunSettings
    from .models import load_model, resolve_model

    if samples > 1 and temp <= 0:
        raise click.BadParameter(
            "several samples need --temp > 0 (greedy samples are all the same)", param_hint="--samples"
        )
    method_list = parse_methods(methods)
    if task == "perplexity" and budget_base == "prompt":
        raise click.BadParameter("perplexity budgets are whole cells (there is no prompt)", param_hint="--budget-base")
    if task == "chat" and click.get_current_context().get_parameter_source("methods").name == "DEFAULT":
        method_list = [m for m in method_list if m.kind != "context-shift"]  # not a chat session
    if task == "fidelity":  # the full cache is what every method is compared with, not a row
        method_list = [m for m in method_list if m.kind != "full"]
        if not method_list:
            raise click.BadParameter(
                "fidelity compares compressed methods with the full cache; name some", param_hint="--methods"
            )
    budget_list = _int_list(
        budgets or {"perplexity": "256,512,1024", "chat": "256,512"}.get(task, "96,128,192"), "--budgets"
    )
    shard_ik = (0, 1)
    if shard is not None:
        try:
            i, k = (int(x) for x in shard.split("/"))
        except ValueError:
            raise click.BadParameter(f"expected I/K such as 0/2, got {shard!r}", param_hint="--shard") from None
        if not 0 <= i < k:
            raise click.BadParameter(f"need 0 <= I < K, got {shard!r}", param_hint="--shard")
        shard_ik = (i, k)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", summary_name) or summary_name.endswith((".json", ".md")):
        raise click.BadParameter(
            f"expected a plain file stem such as summary-core, got {summary_name!r}", param_hint="--summary-name"
        )
    path = resolve_model(model)
    default_max = {"passkey": 16, "fidelity": 256, "chat": 256}.get(task, 512)
    calibration = None
    if any(m.scorer == "triattention" for m in method_list):
        from .calibration import load_for_model

        calibration = load_for_model(path)
    interval = interval or (128 if task in ("passkey", "perplexity", "chat") else 32)
    settings = RunSettings(
        max_new=max_tokens or default_max,
        interval=interval,
        n_keep=n_keep,
        n_threads=threads,
        temperature=temp,
        top_p=top_p,
        seed=seed,
        replay=not no_replay,
        question_aware=not no_question_aware,
        calibration=calibration,
        aggregation=aggregation,
        positions=positions,
    )
    out = Path(out_dir) if out_dir else Path("bench-results") / f"{task}-{path.stem}"
    llm = load_model(path, compress=any(m.compresses for m in method_list))
    run = QualityRun(
        task=task,
        model_path=path,
        methods=method_list,
        budgets=budget_list,
        out_dir=out,
        n=n,
        data_dir=Path(data_dir) if data_dir else None,
        budget_base=budget_base or ("absolute" if task in ("passkey", "perplexity", "chat") else "prompt"),
        samples=samples,
        settings=settings,
        passkey_tokens=passkey_tokens,
        doc_tokens=doc_tokens,
        step=step,
        plots=not no_plots,
        progress=None if quiet else _say,
        shard=shard_ik,
        report_only=report_only,
        summary_name=summary_name,
        turns=turns,
    )
    summary = run_quality(run, llm)
    from .bench.quality import markdown

    click.echo(markdown(summary), nl=False)
    _say(f"results in {out}")


@bench.command("speed")
@click.option("--model", "model", metavar="GGUF", default=None, help="Model file (default: the default model).")
@click.option("--depths", default="512,2048,4096", show_default=True, help="Cache depths at which decode is timed.")
@click.option(
    "--budget", type=click.IntRange(min=DEFAULT_N_SINK + DEFAULT_KEEP_LAST + 1), default=256, show_default=True
)
@click.option("--interval", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--n-gen", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens timed per measurement."
)
@click.option("--methods", default=None, help="Comma-separated S / ams-S [default: every scorer with and without AMS].")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--no-stock", is_flag=True, help="Skip the stock llama-cpp-python decode loop.")
@click.option(
    "--evidence",
    type=click.Choice(["event", "step", "both"]),
    default="event",
    show_default=True,
    help="How budgeted rows gather attention evidence: computed at the event from captured queries, "
    "or by the per-step side branch in the graph; both: one row each, side by side.",
)
@click.option("--json", "json_out", metavar="PATH", default=None, help="Also write the raw result as JSON.")
@_kv_options
@click.option(
    "-t",
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="0 = all cores (run benchmarks alone).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def bench_speed(
    model: Optional[str],
    depths: str,
    budget: int,
    interval: int,
    n_gen: int,
    methods: Optional[str],
    rounds: int,
    no_stock: bool,
    evidence: str,
    json_out: Optional[str],
    flash_attn: str,
    cache_type_k: str,
    cache_type_v: str,
    threads: int,
    quiet: bool,
) -> None:
    """Decode tokens/s at several depths, full cache vs. a budget per scorer ± AMS (llama-bench style).

    Every row of a depth is measured in one process, round-robin, so the ratios compare like with like.
    """
    import json

    from .bench.speed import format_table, run_speed
    from .models import resolve_model

    path = resolve_model(model)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    result = run_speed(
        path,
        depths=tuple(_int_list(depths, "--depths")),
        budget=budget,
        interval=interval,
        n_gen=n_gen,
        methods=method_list,
        rounds=rounds,
        n_threads=threads,
        flash_attn=flash_attn,
        type_k=cache_type_k,
        type_v=cache_type_v,
        include_stock=not no_stock,
        evidence=("event", "step") if evidence == "both" else (evidence,),
        progress=None if quiet else _say,
    )
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(format_table(result))


if __name__ == "__main__":  # pragma: no cover
    main()
