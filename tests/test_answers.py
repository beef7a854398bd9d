"""Answer extraction and equivalence (math-verify does the maths, we find the answer)."""
import pytest

import common

EXTRACT = [
    ("Step 1: 2 + 2 = 4\nThe answer is 4.", "4"),
    ("So she pays $1,250 in total.\nThe answer is $1,250.", "1250"),
    ("The answer is 18 apples.", "18"),
    ("The answer is: -3.5", "-3.5"),
    ("Thus x = 2. The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("We get \\boxed{\\sqrt{2}} and then \\boxed{3}", "3"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("48/2 = 24 clips\n#### 72", "72"),
    ("I am not sure how to solve this.", None),
    ("", None),
    ("The answer is \\boxed{unclosed", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract_answer(text, expected):
    assert common.extract_answer(text) == expected


MATCH = [
    ("72", "72", True),
    ("72", "72.0", True),
    ("1200", "1,200", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("3", "4", False),
    ("10", None, False),
    (None, "10", False),
    ("2", "two dogs", False),
    ("5", "", False),
]


@pytest.mark.parametrize("gold,pred,expected", MATCH)
def test_answers_match(gold, pred, expected):
    assert common.answers_match(gold, pred) is expected


def test_check_solution_reports_prediction_and_verdict():
    assert common.check_solution("3 * 4 = 12\nThe answer is 12.", "12") == ("12", True)
    assert common.check_solution("3 * 4 = 13\nThe answer is 13.", "12") == ("13", False)
    assert common.check_solution("gibberish without a number", "12") == (None, False)


def test_model_text_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"The answer is __import__('pathlib').Path('{marker}').touch()"
    common.check_solution(hostile, "1")
    assert not marker.exists()


@pytest.mark.parametrize("text,expected", [
    ("The answer is 3 * 4 = 12.", "12"),
    ("The answer is $1.00 - $1.00 = $0.00", "0.00"),
    ("The answer is reached by adding all of them.", None),
    ("The answer is odd.", "odd"),
])
def test_extract_answer_from_model_shaped_text(text, expected):
    assert common.extract_answer(text) == expected


# Commas: only a thousands separator inside a plain number goes; in tuples, lists and intervals
# the comma is part of the answer, and spaces after it do not matter.
COMMAS = [
    ("32348", "32,348", True),
    ("32348", "32,\\!348", True),
    ("1234567", "1,234,567", True),
    ("1200", "$1,200", True),
    ("3, 5, 7", "3,5,7", True),
    ("3,5,7", "3, 5, 7", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True),
    ("(1, 2)", "(1,2)", True),
    ("1,2", "12", False),
    ("12", "1,2", False),
    ("(1,2)", "(12)", False),
    ("(-\\infty, 0]", "(-\\infty, 0)", False),
]

# Escaped dollars (MATH and GSM8K-style LaTeX answers): the \$ is a currency sign.
DOLLARS = [
    ("\\$36", "36", True),
    ("\\$36", "$36$", True),
    ("\\$36", "\\boxed{\\$36}", True),
    ("36", "\\$36", True),
    ("\\$18.90", "18.9", True),
    ("\\$18.90", "$18.90$", True),
    ("\\$32,\\!348", "32348", True),
    ("70", "\\$70.00", True),
    ("\\$36", "37", False),
]


@pytest.mark.parametrize("gold,pred,expected", COMMAS + DOLLARS)
def test_answers_match_commas_and_dollars(gold, pred, expected):
    assert common.answers_match(gold, pred) is expected


# Explicit final-answer markers; free prose is never read as an answer.
MARKERS = [
    ("Mia baked 12 + 6 = 18 rolls.\nA: 18", "18"),
    ("She pays 3 * 6 = 18 dollars.\nAnswer: 18", "18"),
    ("She pays 3 * 6 = 18 dollars.\nAnswer: $18", "18"),
    ("Work.\nFinal answer: 18 apples", "18"),
    ("Work.\n**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("Work.\nFinal Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("The answer is 12.\nFinal answer: 13", "13"),
    ("The answer is 3, 5, 7.", "3, 5, 7"),
    ("Answer: (1, 2)", "(1, 2)"),
    ("A: 18 is what I first thought\nbut then I kept going", None),
    ("So she has 18 apples left.", None),
    ("Q: How many does she have?\nShe has 18.", None),
]


@pytest.mark.parametrize("text,expected", MARKERS)
def test_extract_answer_markers(text, expected):
    assert common.extract_answer(text) == expected
