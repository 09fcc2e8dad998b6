"""Chat templates and stop strings without any model or native library (amslocal.templates)."""

from __future__ import annotations

import sys

import pytest

from amslocal.errors import TemplateError
from amslocal.templates import CHATML_STOPS, CHATML_TEMPLATE, ChatTemplate, StopFilter

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {{ there }}"}]


def test_templates_import_without_the_backend():
    import subprocess  # a fresh interpreter: this one may have loaded the backend for other tests

    code = (
        "import sys, amslocal.templates, amslocal.savefile, amslocal.config; print('amslocal.backend' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_chatml_renders_and_finds_every_content():
    t = ChatTemplate(CHATML_TEMPLATE, kind="chatml", stops=CHATML_STOPS)
    text = t.render(CONV)
    assert (
        text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {{ there }}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ranges = t.content_ranges(CONV, text)
    assert [text[a:b] for a, b in ranges] == ["Be brief.", "Hi {{ there }}"]


def test_a_template_that_rewrites_contents_has_no_ranges():
    t = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    text = t.render(CONV)
    assert t.content_ranges(CONV, text) is None


def test_template_errors_are_one_line():
    with pytest.raises(TemplateError, match="syntax error on line 1"):
        ChatTemplate("{% for m in messages %}")
    t = ChatTemplate("{{ raise_exception('only user turns, please') }}")
    with pytest.raises(TemplateError, match="only user turns, please"):
        t.render(CONV)


def test_sandbox_refuses_attribute_access():
    t = ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        t.render(CONV)


def test_stop_filter_holds_back_a_possible_stop_and_cuts_at_it():
    f = StopFilter(["<|im_end|>"])
    assert f.push("Hello <|im") == "Hello "
    assert f.push("_en") == ""
    assert f.push("d|> more") == ""
    assert f.hit and f.flush() == ""
    g = StopFilter(["<|im_end|>"])
    assert g.push("a <|i") == "a "
    assert g.flush() == "<|i"  # not a stop after all: given back at the end
    assert StopFilter([]).push("<|im_end|>") == "<|im_end|>"
