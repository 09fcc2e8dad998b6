"""Answer extraction and grading for GSM8K, MATH-500 and AIME 2024.

``grade(task, text, reference)`` pulls the final answer out of free model text
and compares it with the reference. MATH answers are compared by LaTeX string
normalisation, in the spirit of Hendrycks' MATH ``is_equiv`` and the PRM800K
grader, plus a numeric check and element-wise checks for tuples, intervals and
unordered lists. There is no symbolic algebra: sympy would be an extra, heavy
dependency, and normalisation already catches the forms that references and
models actually write (\\dfrac vs \\frac, \\frac12, units, degree signs,
thousands commas, ``x = ...``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

# A number as written in prose. A minus sign counts only when it is not a hyphen
# or a subtraction ("3-4" is 3 and 4); "1,234" is one number, "1,2345" is not.
_NUMBER = r"(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
# "The answer is", "Final answer:", "**Answer:**"; the match ends where the answer starts.
_ANSWER_PHRASE = re.compile(r"(?:final\s+answer\s*(?:is\b|:|=)?|answer\s*(?:is\b|:|=))[\s:*]*", re.I)
# Unit words dropped when they trail a number ("15 cm^2", "\frac{270}7 degrees").
_UNITS = re.compile(
    r"(?<=[\d}])\s*(?:square\s+|sq\.?\s*|cubic\s+)?(?:units?|degrees?|cm|centimeters?|meters?|km|mm|inch(?:es)?"
    r"|feet|foot|ft|yards?|miles?|mph|cents?|dollars?|hours?|minutes?|seconds?|days?|weeks?|years?|pounds?"
    r"|lbs?|ounces?|grams?|kg)(?:\^\{?\d\}?)?\s*\.?$",
    re.I,
)
# Plain substitutions for normalize_math, applied in this order ("\left" goes before "\le" is touched).
_REPLACEMENTS = [
    ("\n", " "),
    ("~", " "),
    ("−", "-"),
    ("\\left", ""),
    ("\\right", ""),
    ("\\displaystyle", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\circ", ""),
    ("\\degree", ""),
    ("°", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\leq", "\\le"),
    ("\\geq", "\\ge"),
    ("≤", "\\le"),
    ("≥", "\\ge"),
    ("\\neq", "\\ne"),
    ("\\{", "{"),
    ("\\}", "}"),
    ("\\lbrace", "{"),
    ("\\rbrace", "}"),
    ("∞", "\\infty"),
    ("infinity", "\\infty"),
    ("bmatrix", "pmatrix"),
]
_TEXT_COMMANDS = ["text", "textbf", "textit", "textrm", "mbox", "mathrm", "mathbf", "boldsymbol"]


def normalize_number(s) -> Optional[str]:
    """Canonical decimal string of a number written as text ("$1,000.00" -> "1000", "18.50" -> "18.5"), else None."""
    if s is None:
        return None
    t = str(s).replace("{,}", ",")
    for junk in ("\\!", "\\$", "$", "\\%", "%"):
        t = t.replace(junk, "")
    t = re.sub(r"\\(?:text|mbox|mathrm)\{([^}]*)\}", r" \1", t).strip().rstrip(".").strip().lstrip("+")
    m = re.fullmatch(rf"({_NUMBER})(?:\s*[a-zA-Z][a-zA-Z ]*)?", t)  # trailing unit words are allowed
    if not m:
        return None
    try:
        value = Decimal(m.group(1).replace(",", ""))
    except InvalidOperation:
        return None
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def gsm8k_reference(answer_field: str) -> str:
    """The number after '####' in a GSM8K solution, normalised ("1,000" -> "1000")."""
    tail = answer_field.split("####")[-1].strip()
    return normalize_number(tail) or tail.replace(",", "")


def _braced(s: str, start: int) -> Optional[tuple[str, int]]:
    """(content, index after the closing brace) for the group opening at s[start] == '{', or None if unbalanced."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return s[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete \\boxed{...} or \\fbox{...} (nested braces allowed), or of '\\boxed 5'."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)", text))):
        rest = text[m.end() :]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            found = _braced(stripped, 0)
            if found:
                return found[0]
        elif rest[:1].isspace():
            token = re.match(r"\s*([^\s$]+)", rest)
            if token:
                return token.group(1)
    return None  # a truncated last box falls back to the previous one above; none at all gives None


def _last_number(text: str) -> Optional[str]:
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_gsm8k(text: str) -> Optional[str]:
    """A model's final numeric answer: '#### N', else last \\boxed{}, else after 'the answer is', else last number."""
    text = text.replace("\\!", "").replace("{,}", ",").replace("−", "-")
    marked = re.findall(r"####\s*([^\n]*)", text)
    if marked and _NUMBER_RE.search(marked[-1]):
        return normalize_number(_NUMBER_RE.search(marked[-1]).group())
    boxed = last_boxed(text)
    if boxed is not None and _NUMBER_RE.search(boxed):
        return _last_number(boxed)  # "\boxed{2 \times 9 = 18}" means 18
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        first = _NUMBER_RE.search(text, phrases[-1].end())
        if first:
            return normalize_number(first.group())
    return _last_number(text)


def _unwrap(s: str, commands: list[str]) -> str:
    """Replace \\command{content} by content, with balanced braces."""
    pattern = re.compile(r"\\(?:%s)\s*\{" % "|".join(commands))
    while m := pattern.search(s):
        found = _braced(s, m.end() - 1)
        if not found:
            break
        s = s[: m.start()] + found[0] + s[found[1] :]
    return s


def _brace_args(s: str, command: str, n_args: int) -> str:
    """Brace one-token arguments: \\frac12 -> \\frac{1}{2}, \\frac9{19} -> \\frac{9}{19}, \\sqrt3 -> \\sqrt{3}."""
    token, out, i = "\\" + command, [], 0
    while (j := s.find(token, i)) != -1:
        out.append(s[i : j + len(token)])
        i = j + len(token)
        for _ in range(n_args):
            if i < len(s) and s[i] == "{" and (found := _braced(s, i)):
                out.append("{" + _brace_args(found[0], command, n_args) + "}")
                i = found[1]
            elif i < len(s) and (arg := re.match(r"\\[a-zA-Z]+|[^\\\[{}^_]", s[i:])):  # \frac\pi2; not \sqrt[3]
                out.append("{" + arg.group() + "}")
                i += len(arg.group())
            else:
                break
    return "".join(out) + s[i:]


def normalize_math(s: str) -> str:
    """Canonical string for a MATH-style LaTeX answer (see module docstring); equal strings mean equal answers."""
    s = str(s).strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = last_boxed(s) or s
    s = re.sub(r"(?<!\\)\\[!,;: ]", "", s)  # spacing commands; "\\ " is a matrix row break, kept
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = re.sub(r"\\inf(?!ty)", r"\\infty", s)
    s = _unwrap(s, _TEXT_COMMANDS)
    s = _UNITS.sub("", s.strip()) or s
    s = re.sub(r"\s+", "", s).rstrip(".")
    # "x = 5", "y=2x+3", "x \in [-2,7]": a single named variable on the left is not part of the answer.
    variable = r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?"
    if s.count("=") == 1:
        s = re.sub(variable + "=", "", s)
    s = re.sub(variable + r"\\in(?![a-z])", "", s)
    s = _brace_args(_brace_args(_brace_args(s, "frac", 2), "binom", 2), "sqrt", 1)
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)  # x^{2} -> x^2, 4210_{5} -> 4210_5
    s = re.sub(r"(?<![\w.])(\d+)/(\d+)(?![\w.{])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(?<!\d)\.(\d)", r"0.\1", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # a lone "1,000" is a number; "(1,2)" is a tuple
        s = s.replace(",", "")
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice "(C)" -> "C"
    return s.lower() if re.fullmatch(r"[A-Za-z]{2,}", s) else s


def _value(s: str) -> Optional[float]:
    """Numeric value of a normalised integer, decimal, \\frac{a}{b} or mixed number 1\\frac{4}{5}, else None."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(-?)(\d+)?\\frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m[4]) != 0:
        v = int(m[2] or 0) + int(m[3]) / int(m[4])
        return -v if m[1] else v
    return None


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at separators outside any (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def _wrapped(s: str) -> bool:
    """True when the bracket opening s[0] closes at s[-1]; mixed kinds count, so '(3,4]' is wrapped."""
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return False
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _same(a: str, b: str) -> bool:
    """Equality of two normalised answers: string, numeric, then element-wise for tuples, intervals, matrices."""
    if a == b:
        return True
    va, vb = _value(a), _value(b)
    if va is not None and vb is not None:
        return abs(va - vb) <= 1e-6 * max(abs(va), abs(vb), 1e-12)
    pairs = None
    if _wrapped(a) and _wrapped(b) and a[0] == b[0] and a[-1] == b[-1]:  # [0,1) never equals (0,1]
        pairs = (_split_top(a[1:-1]), _split_top(b[1:-1]))
    elif "\\cup" in a and "\\cup" in b:
        pairs = (a.split("\\cup"), b.split("\\cup"))
    else:
        matrices = [re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", x) for x in (a, b)]
        if all(matrices):
            pairs = tuple(re.split(r"\\\\|&", m[1]) for m in matrices)
    if pairs and len(pairs[0]) == len(pairs[1]) and len(pairs[0]) > 1:
        return all(_same(x, y) for x, y in zip(*pairs))
    return False


def math_equal(pred: Optional[str], ref: str) -> bool:
    """MATH answer equality; comma lists are unordered when the reference has no brackets ('1,-2' == '-2, 1')."""
    if pred is None or ref is None:
        return False
    a, b = normalize_math(pred), normalize_math(ref)
    if _same(a, b):
        return True
    ref_items = _split_top(b)
    if len(ref_items) < 2 or _wrapped(b):
        return False
    if a.startswith("{") and _wrapped(a):  # a set {1,-2} answers the list 1,-2
        a = a[1:-1]
    unmatched = [normalize_math(y) for y in ref_items]
    for x in map(normalize_math, _split_top(a)):
        hit = next((k for k, y in enumerate(unmatched) if _same(x, y)), None)
        if hit is None:
            return False
        unmatched.pop(hit)
    return not unmatched


def extract_math(text: str) -> Optional[str]:
    """Last \\boxed{} content; else what follows 'final answer is' / 'answer is' up to '$' or the sentence end."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if not phrases:
        return None
    rest = text[phrases[-1].end() :]
    for delimited in (r"\$\$?(.+?)\$", r"\\\((.+?)\\\)", r"\\\[(.+?)\\\]"):
        m = re.match(delimited, rest, re.S)
        if m:
            return m.group(1).strip()
    sentence = re.split(r"\.\s|\n", rest)[0].strip().rstrip(".").strip()
    return sentence or None


def extract_aime(text: str) -> Optional[int]:
    """AIME answer (an integer 0..999): from the last box, else after 'answer is', else the last integer."""
    boxed = last_boxed(text)
    if boxed is not None and (digits := re.findall(r"\d+", boxed)):
        return int(digits[-1])  # "\boxed{\textbf{(113) }}" and "\boxed{100+13=113}" both mean 113
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases and (m := re.match(r"[\s$\\(]*(\d+)", text[phrases[-1].end() :])):
        return int(m.group(1))
    integers = re.findall(r"(?<![\w.])\d+(?!\w|\.\d)", text)  # not "sepehr2010"
    return int(integers[-1]) if integers else None


def grade(task: str, text: str, reference) -> tuple[Optional[str], bool]:
    """(extracted prediction or None, correct) for task 'gsm8k', 'math500' or 'aime24'."""
    if task == "gsm8k":
        pred, ref = extract_gsm8k(text), normalize_number(reference)
        return pred, pred is not None and pred == ref
    if task == "math500":
        pred = extract_math(text)
        return pred, math_equal(pred, str(reference))
    if task == "aime24":
        pred = extract_aime(text)
        return (None if pred is None else str(pred)), pred is not None and pred == int(str(reference).strip())
    raise ValueError(f"unknown task {task!r}; expected 'gsm8k', 'math500' or 'aime24'")
