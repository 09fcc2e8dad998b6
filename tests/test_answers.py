"""Answer extraction and grading on known strings, and on the reference solutions of the real data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amslocal.bench.answers import (
    extract_aime,
    extract_gsm8k,
    extract_math,
    grade,
    gsm8k_reference,
    last_boxed,
    math_equal,
    normalize_math,
    normalize_number,
)

DATA = Path("/work/shared/data")


def rows(name: str) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- GSM8K -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("18", "18"),
        ("18.00", "18"),
        ("1,000", "1000"),
        ("$1,234.50", "1234.5"),
        ("-3", "-3"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("50%", "50"),
        ("18 dollars", "18"),
        ("100", "100"),
        (7, "7"),
        ("12.", "12"),
        ("abc", None),
        ("1,2", None),
        ("", None),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_gsm8k_reference():
    assert gsm8k_reference("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_reference("...\n#### 1,450,000") == "1450000"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is $1,234.50.", "1234.5"),
        ("Step 1: 8 * 9 = 72\n#### 72", "72"),
        ("She sells 16 - 3 - 4 = 9 eggs, so she makes 18 dollars.", "18"),
        ("9 * 2 = 18, so the total is \\boxed{18}. Check: 18 / 2 = 9.", "18"),
        ("Total: $\\boxed{\\$1,\\!080}$", "1080"),
        ("#### $18.00", "18"),
        ("Final answer: 42 apples. (I used 6 * 7.)", "42"),
        ("**Answer:** -5", "-5"),
        ("The temperature drops to -12 degrees.", "-12"),
        ("It increased by 25%.", "25"),
        ("The difference is 10-4 = 6", "6"),
        ("I cannot tell.", None),
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


def test_grade_gsm8k():
    assert grade("gsm8k", "So she earns $18.00 per day.", "18") == ("18", True)
    assert grade("gsm8k", "The answer is 17.", "18") == ("17", False)
    assert grade("gsm8k", "no number here", "18") == (None, False)


# ---- boxed -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("the answer is $\\boxed 5$.", "5"),
        ("\\boxed{3} and a cut-off \\boxed{\\frac{1", "3"),
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# ---- MATH ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac9{19}", "\\frac{9}{19}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("10^\\circ", "10"),
        ("10^{\\circ}", "10"),
        ("\\text{(C)}", "C"),
        ("x = 5", "5"),
        ("\\$1,000", "1000"),
        ("10,\\!080", "10080"),
        ("15\\mbox{ cm}^2", "15"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("5.", "5"),
        (".5", "0.5"),
        ("3/4", "\\frac{3}{4}"),
        ("50\\%", "50"),
        ("\\boxed{7}", "7"),
        ("x \\in [-2,7]", "[-2,7]"),
        ("\\{1,2\\}", "{1,2}"),
        ("x \\leq 3", "x\\le3"),
        ("4210_{5}", "4210_5"),
        ("(1,200)", "(1,200)"),
        ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0"),
    ],
)
def test_normalize_math(raw, expected):
    assert normalize_math(raw) == expected


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("\\frac12", "\\dfrac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\tfrac12"),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("(3, \\frac\\pi2)", "(3,\\frac{\\pi}{2})"),
        ("10", "10^\\circ"),
        ("C", "\\text{(C)}"),
        ("(C)", "\\text{(C)}"),
        ("5", "x = 5"),
        ("1000", "\\$1,000"),
        ("\\sqrt{2}", "\\sqrt2"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("2, 1", "1,2"),
        ("-2,1", "1, -2"),
        ("\\{-2, 1\\}", "1,-2"),
        ("x=1, x=-2", "1,-2"),
        ("\\infty", "\\infty"),
        ("(2, infinity)", "(2,\\infty)"),
        ("(-\\infty, 0]", "(-\\infty,0]"),
        ("18.9", "\\$18.90"),
        ("137.5", "137 \\frac{1}{2}"),
        ("1.8", "1\\frac{4}{5}"),
        ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
        ("5.4", "5.4 \\text{ cents}"),
        ("864", "864 \\mbox{ inches}^2"),
        ("East", "\\text{east}"),
        ("y=2x+3", "y = 2x + 3"),
        ("0.0000672", ".0000672"),
        ("11111111100", "11,\\! 111,\\! 111,\\! 100"),
        (
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
            "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\\\ \\frac53 \\end{pmatrix}",
        ),
        ("\\begin{bmatrix}0.2\\\\-3.6\\end{bmatrix}", "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}"),
        ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)"),
        ("\\left[0,1\\right)", "[0,1)"),
    ],
)
def test_math_equal(pred, ref):
    assert math_equal(pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("[0,1)", "(0,1]"),
        ("(3,4)", "(3,4]"),
        ("\\frac{1}{3}", "0.33"),
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("5", "6"),
        ("\\sqrt{3}", "\\sqrt{2}"),
        ("1,2", "1,2,3"),
        ("1,1", "1,2"),
        ("(1,2)", "(2,1)"),
        ("(1,2)", "1,2"),
        ("B", "\\text{(C)}"),
        ("2x+3", "2x-3"),
        ("-5", "5"),
        (None, "5"),
        ("", "5"),
        ("1000", "100"),
        ("\\infty", "-\\infty"),
        ("(a+5)(b+2)", "(a+5)(b+3)"),
    ],
)
def test_math_not_equal(pred, ref):
    assert not math_equal(pred, ref)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thus $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("So the answer is 3.5 cm.\nDone.", "3.5 cm"),
        ("Answer: \\(2\\sqrt{5}\\)", "2\\sqrt{5}"),
        ("I think it is 7.", None),
    ],
)
def test_extract_math(text, expected):
    assert extract_math(text) == expected


def test_grade_math500():
    assert grade("math500", "So $r = \\boxed{\\dfrac12}$.", "\\frac{1}{2}") == ("\\dfrac12", True)
    assert grade("math500", "So $r = \\boxed{\\frac13}$.", "\\frac{1}{2}") == ("\\frac13", False)
    assert grade("math500", "no idea", "5") == (None, False)


# ---- AIME ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $m+n = \\boxed{033}$", 33),
        ("The answer is 204.", 204),
        ("$\\boxed{\\textbf{(113) }}$", 113),
        ("$\\boxed{\\mathbf{127} }$", 127),
        ("so 180 + 24 = 204. -sepehr2010", 204),
        ("We get 3.5 and then 12", 12),
        ("The answer is $\\boxed{100+13=113}$", 113),
        ("no digits", None),
    ],
)
def test_extract_aime(text, expected):
    assert extract_aime(text) == expected


def test_grade_aime_and_unknown_task():
    assert grade("aime24", "\\boxed{025}", "025") == ("25", True)
    assert grade("aime24", "\\boxed{25}", 25) == ("25", True)
    assert grade("aime24", "\\boxed{26}", "025") == ("26", False)
    with pytest.raises(ValueError):
        grade("mmlu", "A", "A")


# ---- real data: every reference solution grades as correct --------------------------------------


def test_math500_reference_solutions_grade_correct():
    data = rows("math500_test.jsonl")
    failures = [
        (r["unique_id"], grade("math500", r["solution"], r["answer"])[0], r["answer"])
        for r in data
        if not grade("math500", r["solution"], r["answer"])[1]
    ]
    print(f"MATH-500: {len(data) - len(failures)}/{len(data)} reference solutions graded correct; failures: {failures}")
    assert not failures


def test_math500_normalisation_is_idempotent():
    for r in rows("math500_test.jsonl"):
        once = normalize_math(r["answer"])
        assert normalize_math(once) == once, r["answer"]


def test_gsm8k_reference_solutions_grade_correct():
    data = rows("gsm8k_test.jsonl")
    failures = [r["answer"][-40:] for r in data if not grade("gsm8k", r["answer"], gsm8k_reference(r["answer"]))[1]]
    print(f"GSM8K: {len(data) - len(failures)}/{len(data)} reference solutions graded correct")
    assert not failures


def test_aime24_reference_solutions_grade_correct():
    data = [r for r in rows("aime24_test.jsonl") if last_boxed(r["solution"]) is not None]
    failures = [(r["id"], r["answer"]) for r in data if not grade("aime24", r["solution"], r["answer"])[1]]
    print(f"AIME 2024: {len(data) - len(failures)}/{len(data)} boxed reference solutions graded correct")
    assert len(data) >= 25 and not failures
