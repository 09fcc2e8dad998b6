"""Chat templates and stop strings: pure Python (jinja2), testable without the native library.

The chat template comes from the GGUF metadata (``tokenizer.chat_template``) and is rendered in
jinja2's ``ImmutableSandboxedEnvironment`` with the helpers Hugging Face templates expect
(``raise_exception``, ``strftime_now``, ``tojson``, ``bos_token``, ``eos_token``). A model without a
template gets ChatML (and stops at the text ``<|im_end|>``); a caller may pass its own.
:meth:`ChatTemplate.content_ranges` finds each message's content in a rendering (the rest is the
template's scaffolding, which the chat protects from eviction).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from .errors import TemplateError

if TYPE_CHECKING:  # only for a type: a template is made from any object with these methods
    from .backend import Model

__all__ = ["CHATML_STOPS", "CHATML_TEMPLATE", "ChatTemplate", "StopFilter"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError as JinjaTemplateError

    raise JinjaTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Optional[int] = None,
    separators: Optional[tuple] = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A jinja chat template rendered in a sandbox. ``kind``: gguf | chatml | custom."""

    def __init__(
        self, source: str, *, kind: str = "custom", bos_token: str = "", eos_token: str = "", stops: Sequence[str] = ()
    ):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.kind, self.stops = source, kind, tuple(stops)
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"chat template ({kind}): syntax error on line {exc.lineno}: {exc.message}") from None

    @classmethod
    def for_model(cls, model: Model, override: Optional[str] = None) -> "ChatTemplate":
        """``override`` (template text, or ``"chatml"``), else the GGUF's template, else ChatML."""
        bos = model.token_text(model.bos) if model.bos >= 0 else ""
        eos = model.token_text(model.eos) if model.eos >= 0 else ""
        if override is not None and override.strip().lower() != "chatml":
            return cls(override, kind="custom", bos_token=bos, eos_token=eos)
        source = None if override is not None else model.chat_template()
        if source:
            return cls(source, kind="gguf", bos_token=bos, eos_token=eos)
        # ChatML: stop at its end marker when the model does not know it as a token
        im_end = model.tokenize("<|im_end|>", add_special=False, parse_special=True)
        known = len(im_end) == 1 and model.is_eog(im_end[0])
        return cls(CHATML_TEMPLATE, kind="chatml", bos_token=bos, eos_token=eos, stops=() if known else CHATML_STOPS)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:  # jinja's own errors, and whatever a template's expressions raise
            msg = " ".join(str(exc).split()) or exc.__class__.__name__
            raise TemplateError(f"chat template ({self.kind}): {msg}") from None

    def content_ranges(
        self, messages: Sequence[Mapping[str, Any]], text: str, add_generation_prompt: bool = True
    ) -> Optional[list[tuple[int, int]]]:
        """Character range of each message's content in ``text`` (this template's rendering), or
        None when the template does not reproduce contents verbatim, exactly once each."""
        marked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
        try:
            skeleton = self.render(marked, add_generation_prompt)
        except TemplateError:
            return None
        ranges: list[Optional[tuple[int, int]]] = [None] * len(messages)
        out, cursor, shift = [], 0, 0
        for m in re.finditer("\ue000(\\d+)\ue001", skeleton):
            i = int(m.group(1))
            if i >= len(messages) or ranges[i] is not None:
                return None
            out.append(skeleton[cursor : m.start()])
            content = messages[i]["content"]
            start = m.start() + shift
            ranges[i] = (start, start + len(content))
            out.append(content)
            shift += len(content) - (m.end() - m.start())
            cursor = m.end()
        out.append(skeleton[cursor:])
        if any(r is None for r in ranges) or "".join(out) != text:
            return None
        return ranges  # type: ignore[return-value]


class StopFilter:
    """Holds back text that may be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.buf, self.hit = tuple(s for s in stops if s), "", False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.buf, self.hit = self.buf[: min(cuts)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out
