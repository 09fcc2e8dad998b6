"""Constrained sampling: GBNF grammars and JSON schemas turned into one, as llama.cpp takes them.

A grammar is GBNF text with a ``root`` rule (llama.cpp's format); the sampler applies it to every
token (:class:`~amslocal.backend.Sampler`). A JSON schema is converted to GBNF by llama-cpp-python's
converter (``llama_cpp.llama_grammar``), the same one its server uses; ``JSON_GRAMMAR`` accepts any
JSON object (OpenAI's ``response_format: {"type": "json_object"}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from .errors import OptionError

__all__ = ["JSON_GRAMMAR", "json_schema_grammar", "read_grammar_options"]

# any JSON object, whitespace allowed between tokens (llama.cpp's grammars/json.gbnf)
JSON_GRAMMAR = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
""".strip()


def json_schema_grammar(schema: Union[str, dict, Any]) -> str:
    """GBNF for the JSON values ``schema`` (a dict or JSON text) allows; :class:`OptionError` for a
    schema that is not JSON or that the converter does not understand."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise OptionError(f"the JSON schema is not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise OptionError("the JSON schema must be a JSON object")
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # pure Python, shipped with llama-cpp-python

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter asserts and raises plain errors on what it cannot handle
        why = f"{exc.__class__.__name__}: {exc}"
        raise OptionError(f"the JSON schema cannot be turned into a grammar ({why})") from None


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"cannot read {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_grammar_options(
    grammar: Optional[str] = None,
    grammar_file: Optional[str] = None,
    json_schema: Optional[str] = None,
    json_schema_file: Optional[str] = None,
) -> Optional[str]:
    """The GBNF that llama.cpp's ``--grammar``, ``--grammar-file``, ``-j/--json-schema`` or
    ``-jf/--json-schema-file`` asks for (at most one of them), or None."""
    given = [g for g in (grammar, grammar_file, json_schema, json_schema_file) if g is not None]
    if len(given) > 1:
        raise OptionError("give one of --grammar, --grammar-file, --json-schema, --json-schema-file")
    if grammar is not None:
        return grammar
    if grammar_file is not None:
        return _read(grammar_file, "grammar")
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    if json_schema_file is not None:
        return json_schema_grammar(_read(json_schema_file, "JSON schema"))
    return None
