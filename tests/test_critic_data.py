"""Critic data without the actor: rg3 --rg3-continue program carries an inserted mistake
through the later steps, so the path stays consistent after its one wrong step."""
import random

import common
from conftest import load_stage

stage = load_stage("01_generate_errors")

REF = ["That is 7 * 2 = 14 eggs to start with.", "Taking away 5 leaves 14 - 5 = 9 eggs.",
       "Half of 9 is 9 / 2 = 4.5, so 4.5 eggs are left.", "The answer is 4.5."]


def test_carry_forward_recomputes_every_later_step():
    new = "That is 7 * 2 = 15 eggs to start with."  # a calculation error at step 1
    steps = stage.carry_forward(REF, 1, new)
    assert steps == [new, "Taking away 5 leaves 15 - 5 = 10 eggs.",
                     "Half of 10 is 10 / 2 = 5, so 5 eggs are left.", "The answer is 5."]
    # exactly one wrong step: the inserted one; the rest is right given it
    assert common.arithmetic_slips(steps) == [1]


def test_carried_paths_are_labelled_at_the_inserted_step():
    """Program-inserted mistakes in many reference solutions, carried forward: the path ends
    wrong and the only arithmetic slip is the inserted step."""
    prep = load_stage("00_prepare_data")
    problems = prep.generate_builtin(60, seed=5)
    types = list(stage.MISTAKES)
    n = 0
    for p in problems:
        ref = [stage.normalize_step(s) for s in p["reference_steps"]]
        found = stage.program_insert(ref, p["question"], types, random.Random(p["question"]))
        if found is None:
            continue
        k, new, kind, _ = found
        steps = stage.carry_forward(ref, k, new)
        assert len(steps) == len(ref) and steps[:k - 1] == ref[:k - 1]
        answer, ok = common.check_solution(common.join_steps(steps), p["answer"])
        assert not ok, (kind, steps)
        slips = common.arithmetic_slips(steps)
        assert slips in ([k], []), (kind, k, steps)  # [] : the mistake is not an arithmetic slip
        assert all(i == k for i in slips)
        n += 1
    assert n >= 50
