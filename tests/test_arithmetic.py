"""common.py "Arithmetic in text": the one reader of `a op b = c` computations (01 and 02 use it)."""
import random
import string
from fractions import Fraction

import pytest

import common

# text -> [(lhs_text, rhs_text, exact value of the left side, ok)]
CASES = [
    ("He has 12 * 4 = 48 pens.", [("12 * 4", "48", 48, True)]),
    ("3 * (4 + 2) = 18 and (10 - 4) / 3 = 2", [("3 * (4 + 2)", "18", 18, True), ("(10 - 4) / 3", "2", 2, True)]),
    ("(12 * 4 = 48)", [("12 * 4", "48", 48, True)]),
    ("So 50 / 250 * 100 = 20% of them.", [("50 / 250 * 100", "20%", 20, True)]),
    ("20% * 50 = 10 apples", [("20% * 50", "10", 10, True)]),
    ("2 x $1,200 = $2,400 and 3 × $150 = $350", [("2 x $1,200", "$2,400", 2400, True),
                                                 ("3 × $150", "$350", 450, False)]),
    ("It is 3 * 6 = 15 + 3 = 18 in all", [("3 * 6", "15 + 3", 18, True), ("15 + 3", "18", 18, True)]),
    ("Then 3 * 5 = 15 + 2 = 17", [("3 * 5", "15 + 2", 15, True), ("15 + 2", "17", 17, True)]),
    ("10 / 3 = 3.33 and 10 / 3 = 3.34 but 10 / 3 = 3.3", [("10 / 3", "3.33", Fraction(10, 3), True),
                                                         ("10 / 3", "3.34", Fraction(10, 3), True),
                                                         ("10 / 3", "3.3", Fraction(10, 3), True)]),
    ("10 / 4 = 2.6", [("10 / 4", "2.6", Fraction(5, 2), False)]),
    ("0.2 x 50 = $10", [("0.2 x 50", "$10", 10, True)]),
    ("$3 \\times 4 = 12$ and $6 \\div 3 = 2$", [("3 \\times 4", "12", 12, True), ("6 \\div 3", "2", 2, True)]),
    ("3 \\cdot 4 = 11", [("3 \\cdot 4", "11", 12, False)]),
    ("5 apples + 3 apples = 8 apples", [("5 apples + 3", "8", 8, True)]),
    ("3 - 5 = -2 and 2 ^ 3 = 8", [("3 - 5", "-2", -2, True), ("2 ^ 3", "8", 8, True)]),
    ("x + 3 = 7, so x = 4", []),
    ("2 + 3 = 5x", []),
    ("On the 3rd day, 2nd place = 1st loser", []),
    ("The answer is 42.", []),
    ("5 / 0 = 1", []),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_find_computations(text, expected):
    found = common.find_computations(text)
    assert [(c.lhs_text, c.rhs_text, c.value, c.ok) for c in found] == expected
    for c in found:  # the span covers the computation as written
        assert text[c.start:c.end].replace("$", "").startswith(c.lhs_text.replace("$", ""))
        assert text[c.start:c.end].endswith(c.rhs_text)


@pytest.mark.parametrize("value,like,text", [
    (Fraction(48), "", "48"), (Fraction(5, 2), "", "2.5"), (Fraction(10, 3), "", "3.33"),
    (Fraction(1, 8), "", "0.125"), (Fraction(2400), "$2,000", "$2,400"), (Fraction(2400), "$20", "$2400"),
    (Fraction(-5), "$", "-$5"), (Fraction(12345, 10), "1,000", "1,234.5"), (Fraction(10 ** 20, 3), "", str(round(Fraction(10 ** 20, 3)))),
])
def test_format_number(value, like, text):
    assert common.format_number(value, like) == text


def test_arithmetic_slips_and_evaluation():
    steps = ["He has 12 * 4 = 48 pens.", "Then 48 - 10 = 36 pens.", "No numbers here.", "36 + 6 = 42."]
    assert common.arithmetic_slips(steps) == [2]
    assert common.evaluate_expression("3 x (4 + 2) - 6 / 4") == Fraction(33, 2)
    assert common.evaluate_expression("3 +") is None and common.evaluate_expression("2 ^ 100") is None


def test_random_text_never_crashes():
    rng = random.Random(0)
    alphabet = string.digits * 3 + "+-*/=()%$,.x ^×÷" + string.ascii_letters[:8]
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for c in common.find_computations(text):
            assert isinstance(c.value, Fraction) and 0 <= c.start < c.end <= len(text)
            common.format_number(c.value, c.rhs_text)
        common.arithmetic_slips([text])


# How real GSM8K and model solutions write numbers (own cases): ordinals, clock times and
# zero-padded codes are not operands; leading-dot decimals, "20 %", "20% of", cents, numeric
# \frac and \boxed are read; a phrase that starts before the numbers is not a computation.
REAL_TEXT = [
    ("Pages 1st - 5th = 5 pages", []),
    ("the 2nd + 3rd = 5th", []),
    ("20% of $20 = $4", [("20% of $20", "$4", 4, True)]),
    ("so 20% of 50 = 11", [("20% of 50", "11", 10, False)]),
    ("3/4 of 20 = 15", [("3/4 of 20", "15", 15, True)]),
    ("half of 10 + 4 = 9", []),
    ("His first drive was 30*.5=15 miles", [("30*.5", "15", 15, True)]),
    ("$.75*2=$1.5", [("$.75*2", "$1.5", Fraction(3, 2), True)]),
    ("100% - 80% = 20 % were children", [("100% - 80%", "20 %", Fraction(1, 5), True)]),
    ("0900-0130 = 0730 hours", []),
    ("at 6:00+18 hours = 00:00 on Tuesday", []),
    ("Day 3:100+20=120", [("100+20", "120", 120, True)]),
    ("He spends $1 / 2 = 50 cents", [("$1 / 2", "50", Fraction(1, 2), True)]),
    ("3 * 50 cents = $1.50", [("3 * 50", "$1.50", 150, True)]),
    ("1/4 cup + 1 and 1/4 cup = 1.5 cups", []),
    ("24 degrees / 3 degrees/5% increase = 8 5% increases", []),
    ("So $\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$", [("\\frac{1}{2} + \\frac{1}{3}", "\\frac{5}{6}", Fraction(5, 6), True)]),
    ("This is $12 + 7 = \\boxed{19}$.", [("12 + 7", "19", 19, True)]),
    ("$\\dfrac{3}{4} \\times 8 = 5$", [("\\dfrac{3}{4} \\times 8", "5", 6, False)]),
    ("15 trucks / 90 vehicles * 100% = 16.66%", [("15 trucks / 90 vehicles * 100%", "16.66%", Fraction(1, 6), True)]),
    ("$7500/75% = $100", [("$7500/75%", "$100", 10000, True)]),
    ("$80 000 x 20/100 = $16 000", [("$80 000 x 20/100", "$16 000", 16000, True)]),
    ("25 / 1/3 = 75 decorations", [("25 / 1/3", "75", 75, True)]),
    ("12/4/2 = 1.5", [("12/4/2", "1.5", Fraction(3, 2), True)]),
    ("Lazlo = 4 pounds - 6 ounces = 58 ounces", []),
    ("10 pages per day on day 1 * 2 = 20 pages", []),
    ("Weeks 1-2 = 96 - 70 = 26", [("96 - 70", "26", 26, True)]),
    ("X = 9 because - 18/-2 = 9", []),
    ("38 - 32 = 32 + x - 32", []),
    ("1/3 of Solomon = 66/3 = 22", [("66/3", "22", 22, True)]),
    ("It is 17 000/5 = 3 400.", [("17 000/5", "3 400", 3400, True)]),
    ("20 minutes / 240 minutes = 8.333...%, about 8%", [("20 minutes / 240", "8.333...%", Fraction(1, 12), True)]),
]


@pytest.mark.parametrize("text,expected", REAL_TEXT)
def test_find_computations_in_real_text(text, expected):
    assert [(c.lhs_text, c.rhs_text, c.value, c.ok) for c in common.find_computations(text)] == expected


@pytest.mark.parametrize("line,step", [
    ("3.5 * 2 = 7 pints", "3.5 * 2 = 7 pints"),
    ("4.5 gallons = 36 pints", "4.5 gallons = 36 pints"),
    ("-5 + 3 = -2", "-5 + 3 = -2"),
    ("3. Then 2 + 2 = 4", "Then 2 + 2 = 4"),
    ("2) ok", "ok"),
    ("- a bullet", "a bullet"),
    ("Step 4: 12 / 3 = 4", "12 / 3 = 4"),
])
def test_step_labels_are_not_numbers(line, step):
    assert common.split_steps(line) == [step]


def test_latex_fuzz_never_crashes():
    rng = random.Random(1)
    pieces = ["\\frac{", "}{", "}", "\\boxed{", "\\left(", "\\right)", "$", "1", "23", ".5", "%", " ", "=",
              "+", "of", "1st", "6:00", "0900", "cents", "\\times", "x", "("]
    for _ in range(1000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        for c in common.find_computations(text):
            assert isinstance(c.value, Fraction) and 0 <= c.start < c.end <= len(text)
        common.beyond_arithmetic(text)
