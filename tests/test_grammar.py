"""Constrained sampling (llama.cpp's grammar sampler) from the CLI, the API and the server, and
llama.cpp's --keep."""

from __future__ import annotations

import json

import pytest
from conftest import DEFAULT_MODEL, needs_model
from test_cli_errors import assert_one_line_error, run_cli

from amslocal.errors import OptionError
from amslocal.grammar import json_schema_grammar, read_grammar_options

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_grammar_options_and_schemas(tmp_path):
    assert read_grammar_options() is None
    assert read_grammar_options(grammar='root ::= "a"') == 'root ::= "a"'
    (tmp_path / "g.gbnf").write_text('root ::= "b"')
    assert read_grammar_options(grammar_file=str(tmp_path / "g.gbnf")) == 'root ::= "b"'
    gbnf = read_grammar_options(json_schema=json.dumps(PERSON))
    assert gbnf.count("root ::=") == 1 and '"\\"age\\""' in gbnf
    with pytest.raises(OptionError, match="give one of"):
        read_grammar_options(grammar="x", json_schema="{}")
    with pytest.raises(OptionError, match="not JSON"):
        json_schema_grammar("{nope")
    with pytest.raises(OptionError, match="cannot read grammar file"):
        read_grammar_options(grammar_file=str(tmp_path / "missing.gbnf"))


def test_a_grammar_decides_what_is_sampled(tiny_gguf):
    for grammar in ('root ::= "yes" | "no"', 'root ::= [0-9] [0-9] "."'):
        proc = run_cli(
            "generate", str(tiny_gguf), "-p", "hello", "-n", "12", "--temp", "0", "-t", "1", "--grammar", grammar
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.strip()
        if "yes" in grammar:
            assert out in ("yes", "no"), out
        else:
            assert len(out) == 3 and out[:2].isdigit() and out[2] == ".", out


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--grammar", "root ::= nonsense("], "the grammar does not parse as GBNF with a 'root' rule (parse: error"),
        (["--grammar", 'root ::= "a"', "-j", "{}"], "give one of --grammar"),
        (["-j", "{not json"], "the JSON schema is not JSON"),
        (["-jf", "/nonexistent/schema.json"], "cannot read JSON schema file"),
        (
            ["--budget", "64", "--keep", "40"],
            "--keep 40 keeps 40 prompt tokens, but a budget of 64 protects at most 27",
        ),
    ],
)
def test_bad_grammar_and_keep_options_are_one_line(tiny_gguf, args, phrase):
    proc = run_cli("generate", str(tiny_gguf), "-p", "hello " * 30, "-n", "4", "-t", "1", *args)
    assert_one_line_error(proc, phrase, 2)


@needs_model
def test_json_schema_output_parses_and_has_the_fields():
    proc = run_cli(
        "generate",
        str(DEFAULT_MODEL),
        "-p",
        "A person as JSON:",
        "-n",
        "60",
        "--temp",
        "0",
        "-t",
        "1",
        "-j",
        json.dumps(PERSON),
    )
    assert proc.returncode == 0, proc.stderr
    person = json.loads(proc.stdout)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


@needs_model
def test_every_chat_reply_starts_the_grammar_over():
    from amslocal.api import Engine

    with Engine(DEFAULT_MODEL, n_threads=1) as engine:
        chat = engine.session(budget=None, temperature=0, grammar=json_schema_grammar(PERSON), max_tokens=80)
        first = chat.chat("Invent a person; answer in JSON.", stream=False)
        second = chat.chat("Now another one.", stream=False)
    assert set(json.loads(first)) == set(json.loads(second)) == {"name", "age"}


def test_keep_protects_the_first_prompt_tokens(tiny_gguf):
    from amslocal.api import Engine

    prompt = "".join(chr(ord("a") + i % 26) for i in range(120))
    with Engine(tiny_gguf, n_threads=1) as engine:
        kept = {}
        for keep in (0, 20):
            s = engine.session(budget=64, interval=16, chat_template="chatml", temperature=0)
            s.generate(prompt, max_tokens=100, ignore_eos=True, keep=keep, stream=False)
            assert s.stats.compressions > 5
            kept[keep] = set(s.session.kept_tokens()[0])
            s.close()
    assert set(range(20)) <= kept[20]
    assert not set(range(20)) <= kept[0]  # without --keep only the sinks stay
