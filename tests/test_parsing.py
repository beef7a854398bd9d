"""Steps out of solutions, verdicts out of critiques; malformed text never raises."""
import pytest

import common


def test_split_steps_strips_labels_and_blank_lines():
    text = "Step 1: 3 * 4 = 12\n\n2. 12 + 1 = 13\n- so 13 left\n  The answer is 13.  \n"
    assert common.split_steps(text) == ["3 * 4 = 12", "12 + 1 = 13", "so 13 left", "The answer is 13."]


def test_number_and_join_steps_round_trip():
    steps = ["a = 1", "b = 2"]
    assert common.split_steps(common.number_steps(steps)) == steps
    assert common.split_steps(common.join_steps(steps)) == steps


def test_format_then_parse_critique_round_trip():
    steps = ["He buys 3 * 4 = 12 pens.", "He has 12 + 5 = 18 pens.", "The answer is 18."]
    text = common.format_critique(steps, [True, False, False],
                                  ["Right.", "12 + 5 is 17, not 18.", "Carries the error."],
                                  False, "The answer should be 17.")
    c = common.parse_critique(text, n_steps=3)
    assert c.ok, c.problems
    assert [s.correct for s in c.steps] == [True, False, False]
    assert [s.step for s in c.steps] == steps
    assert c.steps[1].explanation == "12 + 5 is 17, not 18."
    assert c.first_wrong_step == 2
    assert c.final_correct is False and c.final_explanation == "The answer should be 17."


def test_check_line_comes_before_the_verdict_and_older_layout_still_parses():
    text = common.format_critique(["a", "b"], [True, False], ["1 + 1 is 2, as written.", ""], False, "bad")
    assert text.splitlines() == ["Step 1: a", "Check: 1 + 1 is 2, as written.", "Verdict: Correct.",
                                 "Step 2: b", "Verdict: Wrong.", "Final verdict: Wrong. bad"]
    c = common.parse_critique("Step 1: a\nCheck: 2 + 2 is 4,\nnot 5.\nVerdict: Wrong.\nFinal verdict: Wrong.")
    assert c.ok and c.steps[0].explanation == "2 + 2 is 4, not 5." and c.steps[0].correct is False
    old = common.parse_critique("Step 1: a\nVerdict: Wrong. 2 + 2 is 4, not 5.\nFinal verdict: Wrong. no")
    assert old.ok and old.steps[0].explanation == "2 + 2 is 4, not 5."


def test_parse_critique_tolerates_markdown_and_case():
    text = ("**Step 1:** x = 2\n**Verdict:** correct - fine\nStep 2: y = 5\nverdict: INCORRECT. no\n"
            "Final Verdict: Wrong. bad")
    c = common.parse_critique(text)
    assert c.ok, c.problems
    assert [s.correct for s in c.steps] == [True, False]
    assert c.final_correct is False


@pytest.mark.parametrize("text,problem", [
    ("", "no step verdicts"),
    ("The solution looks fine to me!", "no step verdicts"),
    ("Step 1: a\nVerdict: Correct.\nStep 2: b\n", "steps without a verdict: [2]"),
    ("Step 1: a\nVerdict: Correct.", "no final verdict"),
    ("Step 1: a\nVerdict: Correct.\nStep 3: c\nVerdict: Wrong.\nFinal verdict: Wrong.",
     "steps are not numbered 1..n"),
    ("Verdict: Correct.\nFinal verdict: Correct.", "verdict without its step"),
])
def test_malformed_critiques_are_reported_not_raised(text, problem):
    c = common.parse_critique(text)
    assert not c.ok
    assert any(problem in p for p in c.problems), c.problems


def test_step_count_mismatch_is_reported():
    text = "Step 1: a\nVerdict: Correct.\nFinal verdict: Correct."
    assert common.parse_critique(text, n_steps=1).ok
    c = common.parse_critique(text, n_steps=2)
    assert c.problems == ["1 step verdicts for 2 steps"]


def test_parse_critique_never_raises_on_odd_input():
    huge = common.parse_critique("Step 99999999999999999999: x")
    assert [s.index for s in huge.steps] == [99999999999999999999] and huge.steps[0].correct is None
    assert huge.problems == ["steps without a verdict: [99999999999999999999]",
                             "steps are not numbered 1..n", "no final verdict"]
    for text in ["Final verdict:", "\x00\x01", None, ""]:  # no verdict word, no steps
        c = common.parse_critique(text)
        assert c.steps == [] and c.final_correct is None
        assert c.problems == ["no step verdicts", "no final verdict"]
    many = common.parse_critique("Step 1:\n" * 500, n_steps=3)
    assert len(many.steps) == 500 and not many.ok
    assert "500 step verdicts for 3 steps" in many.problems and "steps are not numbered 1..n" in many.problems


# The authors' layout: unnumbered "Step sentence" blocks, explanations on their own lines

AUTHORS = ("Step sentence: She buys 4 * 3 = 12 apples.\n"
           "Correctness of the step: Correct\n"
           "Explanation: Four bags of three apples are 12 apples.\n\n"
           "Step sentence: She eats 2, so 12 - 2 = 9 are left.\n"
           "Correctness of the step: Wrong\n"
           "Explanation: 12 - 2 is 10,\n"
           "not 9.\n\n"
           "Correctness of the final answer: Wrong\n"
           "Explanation: The answer should be 10.\n"
           "She still has ten apples.")


def test_parse_critique_reads_the_authors_layout():
    c = common.parse_critique(AUTHORS, n_steps=2)
    assert c.ok, c.problems
    assert [s.index for s in c.steps] == [1, 2]
    assert [s.step for s in c.steps] == ["She buys 4 * 3 = 12 apples.", "She eats 2, so 12 - 2 = 9 are left."]
    assert [s.correct for s in c.steps] == [True, False]
    assert c.steps[0].explanation == "Four bags of three apples are 12 apples."
    assert c.steps[1].explanation == "12 - 2 is 10, not 9."  # a wrapped explanation is one text
    assert c.first_wrong_step == 2
    assert c.final_correct is False
    assert c.final_explanation == "The answer should be 10. She still has ten apples."


def test_authors_layout_variants_and_round_trip_into_the_kit_layout():
    text = ("**Step 1 sentence:** x = 2\n**Correctness of the step:** correct.\n"
            "Step 2 sentence: y = 5\nExplanation: y is 4\nCorrectness of the step: INCORRECT\n"
            "Correctness of the final answer: Wrong. y is off by one")
    c = common.parse_critique(text)
    assert c.ok, c.problems
    assert [s.correct for s in c.steps] == [True, False]
    assert c.steps[1].explanation == "y is 4"  # an explanation before the verdict is kept
    assert c.final_explanation == "y is off by one"
    kit = common.format_critique([s.step for s in c.steps], [s.correct for s in c.steps],
                                 [s.explanation for s in c.steps], c.final_correct, c.final_explanation)
    back = common.parse_critique(kit)
    assert [(s.step, s.correct, s.explanation) for s in back.steps] == \
        [(s.step, s.correct, s.explanation) for s in c.steps]
    assert (back.final_correct, back.final_explanation) == (False, "y is off by one")


@pytest.mark.parametrize("text,problem", [
    ("Step sentence: a\nExplanation: fine\nCorrectness of the final answer: Correct", "steps without a verdict: [1]"),
    ("Step sentence: a\nCorrectness of the step: Correct\n", "no final verdict"),
    ("Correctness of the step: Correct\nCorrectness of the final answer: Correct", "verdict without its step"),
    ("Step 1 sentence: a\nCorrectness of the step: Correct\nStep 3 sentence: b\n"
     "Correctness of the step: Wrong\nCorrectness of the final answer: Wrong", "steps are not numbered 1..n"),
])
def test_malformed_authors_critiques_are_reported(text, problem):
    c = common.parse_critique(text)
    assert not c.ok and any(problem in p for p in c.problems), c.problems


def test_kit_layout_ignores_text_after_the_final_verdict_but_reads_an_explanation_line():
    kit = "Step 1: a\nVerdict: Correct. ok\nFinal verdict: Correct. fine\nThanks for reading!"
    assert common.parse_critique(kit).final_explanation == "fine"
    c = common.parse_critique("Step 1: a\nVerdict: Correct.\nFinal verdict: Correct.\nExplanation: all good")
    assert c.ok and c.final_explanation == "all good"
