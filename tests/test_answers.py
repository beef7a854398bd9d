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
