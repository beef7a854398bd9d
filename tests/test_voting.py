"""Majority vote, Pass@k, MV@k and intervals against hand-computed values."""
import math

import pytest

import common


def test_majority_vote_groups_equivalent_answers():
    # 0.5, \frac{1}{2} and 1/2 are one answer with three votes; "3" has two.
    assert common.majority_vote(["3", "0.5", "\\frac{1}{2}", "3", "1/2"]) == "0.5"
    assert common.majority_vote([None, None]) is None
    assert common.majority_vote([None, "7", None]) == "7"


def test_majority_ties_go_to_first_seen():
    assert common.majority_vote(["2", "1", "1", "2"]) == "2"
    assert common.majority_class([1, 0, 0, 1]) == 1


def test_answer_classes():
    assert common.answer_classes(["1", "2", "1.0", None, "2"]) == [0, 1, 0, None, 1]


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - (3 / 5) * (2 / 4)),          # 0.7
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
    (4, 1, 4, 1.0),
])
def test_pass_at_k_unbiased(n, c, k, expected):
    assert common.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError):
        common.pass_at_k(2, 1, 3)


def test_mv_at_k():
    classes = [0, 0, 1, 1, 1]            # answer 1 wins with all five
    correct = [True, True, False, False, False]
    assert common.mv_at_k(classes, correct, 5) == 0.0
    # k=1: correct exactly when the one sample is correct: 2/5 in expectation.
    assert common.mv_at_k(classes, correct, 1, trials=4000) == pytest.approx(0.4, abs=0.03)
    assert common.mv_at_k([None, None], [False, False], 2) == 0.0


def test_accuracy_ci_wilson():
    p, lo, hi = common.accuracy_ci(5, 10)
    assert p == 0.5 and lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    p, lo, hi = common.accuracy_ci(0, 20)
    assert p == 0.0 and lo == 0.0 and 0.1 < hi < 0.2
    assert common.accuracy_ci(0, 0) == (0.0, 0.0, 0.0)
    for n in range(1, 200):  # the interval always contains p, even at 0/n and n/n
        for k in (0, n):
            p, lo, hi = common.accuracy_ci(k, n)
            assert lo <= p <= hi
