"""Stage 7 (07_self_talk.py): inline feedback, the correction loop's bookkeeping, the self-talk
rewriter and its checks, the trajectory-level data, the test-time measures, and a tiny
random-weight Llama end to end with resume."""
import json
from collections import Counter

import pytest

import common
from conftest import load_stage

st = load_stage("07_self_talk")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

QUESTION = "A box holds 12 rows of 8 eggs. Sam eats 6 eggs. How many eggs are left?"
REFERENCE = ["12 * 8 = 96", "96 - 6 = 90", "The answer is 90."]
FLAWED = ["12 * 8 = 86", "86 - 6 = 80", "The answer is 80."]


def critique_of(steps, correct, reasons, final):
    return common.format_critique(steps, correct, reasons, final, "checked")


def annotated(row_id="p1-rg3-0", steps=FLAWED, correct=(False, False, False),
              reasons=("12 * 8 is 96, not 86.", "it carries the earlier error from step 1.", "80 is wrong."),
              final=False):
    return {"id": row_id, "problem_id": "p1", "question": QUESTION, "steps": list(steps),
            "critique": critique_of(steps, list(correct), list(reasons), final), "gold_answer": "90",
            "reference_steps": REFERENCE, "method": "rg3", "is_correct": final, "source": "builtin"}


# -----------------------------------------------------------------------------
# Phase 1: inline feedback


def test_inline_feedback_puts_each_verdict_after_its_step():
    row = annotated()
    events = st.inline_feedback(row["steps"], row["critique"])
    assert [e["step"] for e in events] == FLAWED
    assert [e["correct"] for e in events] == [False, False, False]
    assert events[0]["reason"] == "12 * 8 is 96, not 86." and events[0]["round"] == 0
    text = st.render_inline(events)
    assert text.splitlines()[:2] == ["12 * 8 = 86", "Verdict: Wrong. 12 * 8 is 96, not 86."]
    assert len(text.splitlines()) == 2 * len(FLAWED)
    # a critique with the wrong number of verdicts, or none, gives no chain
    assert st.inline_feedback(FLAWED, critique_of(FLAWED[:2], [True, True], ["", ""], True)) is None
    assert st.inline_feedback(FLAWED, "looks fine to me") is None
    assert st.new_chain({**row, "critique": "garbage"})["drop_reason"] == "critique unreadable"


def test_new_chain_keeps_only_up_to_the_first_wrong_step():
    row = annotated(steps=["12 * 8 = 96", "96 - 6 = 80", "The answer is 80."], correct=(True, False, False),
                    reasons=("", "96 - 6 is 90, not 80.", "80 is wrong."))
    chain = st.new_chain(row)
    assert [e["step"] for e in chain["events"]] == ["12 * 8 = 96", "96 - 6 = 80"]
    assert st.solution_steps(chain["events"]) == ["12 * 8 = 96"]
    assert chain["status"] == "open" and chain["rounds"] == 0
    # the actor's prompt for the round: the kit's solve prompt plus the wrong step and why
    shots = [{"id": "p1", "question": "same problem", "reference_steps": ["x"]},
             {"id": "p9", "question": "What is 2 + 2?", "reference_steps": ["2 + 2 = 4", "The answer is 4."]}]
    messages = st.continue_messages(chain, shots, 1)
    assert messages[:-1] == common.solve_messages({"id": "p1", "question": QUESTION}, shots, 1)[:-1]
    assert "What is 2 + 2?" in messages[1]["content"]  # never the problem itself as an example
    assert "96 - 6 = 80" in messages[-1]["content"] and "96 - 6 is 90, not 80." in messages[-1]["content"]


# -----------------------------------------------------------------------------
# Phase 2: the correction loop with a scripted actor and critic


class Script:
    """regenerate/critique callables that record what the loop gives them."""

    def __init__(self, continuations, judge):
        self.continuations, self.judge = continuations, judge  # per round: steps; judge(steps) -> verdicts
        self.prefixes, self.rounds = [], []

    def regenerate(self, round_no, chains):
        """One candidate per chain, or several when a round's entry is a list of lists."""
        self.rounds.append(round_no)
        self.prefixes.append([st.solution_steps(c["events"]) for c in chains])
        out = []
        for c in chains:
            cand = self.continuations[c["id"]][round_no - 1]
            out.append([list(x) for x in cand] if cand and isinstance(cand[0], list) else [list(cand)])
        return out

    def critique(self, round_no, jobs):
        return [critique_of(s, self.judge(s), ["why" if not ok else "" for ok in self.judge(s)], True)
                for _, _, s in jobs]


def arithmetic_judge(steps):
    """Correct unless the step is one of the known slips."""
    return [s not in ("96 - 6 = 80", "12 * 8 = 86", "The answer is 80.", "The answer is 86.") for s in steps]


def test_correction_keeps_the_prefix_and_stops_when_right():
    row = annotated(steps=["12 * 8 = 96", "96 - 6 = 80", "The answer is 80."], correct=(True, False, False),
                    reasons=("", "96 - 6 is 90, not 80.", ""))
    script = Script({"p1-rg3-0": [["96 - 6 = 90", "The answer is 90."]]}, arithmetic_judge)
    [chain] = st.correct_chains([st.new_chain(row)], script.regenerate, script.critique, max_rounds=3)
    assert script.prefixes == [[["12 * 8 = 96"]]]  # the verified step is the prefix, the wrong one is not
    assert chain["status"] == "done" and chain["rounds"] == 1
    assert [(e["step"], e["correct"], e["round"]) for e in chain["events"]] == [
        ("12 * 8 = 96", True, 0), ("96 - 6 = 80", False, 0), ("96 - 6 = 90", True, 1),
        ("The answer is 90.", True, 1)]
    assert st.solution_steps(chain["events"]) == ["12 * 8 = 96", "96 - 6 = 90", "The answer is 90."]


def test_correction_round_limit_and_second_round():
    row = annotated()
    two = Script({"p1-rg3-0": [["12 * 8 = 96", "96 - 6 = 80", "The answer is 80."],
                               ["96 - 6 = 90", "The answer is 90."]]}, arithmetic_judge)
    [chain] = st.correct_chains([st.new_chain(row)], two.regenerate, two.critique, max_rounds=3)
    assert chain["status"] == "done" and chain["rounds"] == 2
    assert two.prefixes == [[[]], [["12 * 8 = 96"]]]  # round 2 starts after round 1's verified step
    assert [e["correct"] for e in chain["events"]] == [False, True, False, True, True]
    # the same chain with a limit of one round never gets there: dropped and counted
    one = Script(two.continuations, arithmetic_judge)
    [chain] = st.correct_chains([st.new_chain(row)], one.regenerate, one.critique, max_rounds=1)
    assert chain["status"] == "dropped" and chain["drop_reason"] == "still wrong after the round limit"
    assert one.rounds == [1]


def test_correction_gold_check_and_empty_continuations():
    row = annotated()
    # the critic passes every new step, but the answer is not the gold one: nothing to reflect on
    lenient = Script({"p1-rg3-0": [["12 * 8 = 96", "The answer is 95."]]}, lambda s: [True] * len(s))
    [chain] = st.correct_chains([st.new_chain(row)], lenient.regenerate, lenient.critique, max_rounds=3)
    assert chain["status"] == "dropped"
    assert chain["drop_reason"] == "no step marked Wrong but the answer is wrong"
    # an empty continuation costs a round and is tried again, without asking the critic
    calls = []
    empty = Script({"p1-rg3-0": [[], ["12 * 8 = 96", "96 - 6 = 90", "The answer is 90."]]}, arithmetic_judge)

    def critique(r, jobs):
        calls.append(r)
        return empty.critique(r, jobs)

    [chain] = st.correct_chains([st.new_chain(row)], empty.regenerate, critique, max_rounds=3)
    assert (chain["status"], chain["rounds"], calls) == ("done", 2, [2])
    # an already-right path needs no round; an unreadable critique of a correction drops the chain
    right = annotated("p1-ref-0", REFERENCE, (True, True, True), ("", "", ""), True)
    broken = Script({"p1-rg3-0": [["12 * 8 = 96"]]}, arithmetic_judge)
    chains = st.correct_chains([st.new_chain(right), st.new_chain(row)], broken.regenerate,
                               lambda r, jobs: ["no verdicts here"] * len(jobs), max_rounds=3)
    assert [(c["status"], c["rounds"]) for c in chains] == [("done", 0), ("dropped", 1)]
    assert chains[1]["drop_reason"] == "critique of a correction unreadable"


def test_correction_keeps_the_best_candidate():
    row = annotated()
    # round 1: a dead end (all passed, wrong answer), a repair that gets one step further, a
    # shorter one; round 2: a broken candidate and the repair
    script = Script({"p1-rg3-0": [
        [["12 * 8 = 96", "The answer is 95."], ["12 * 8 = 96", "96 - 6 = 80"], ["12 * 8 = 86"]],
        [["96 - 6 = 80"], ["96 - 6 = 90", "The answer is 90."]]]}, arithmetic_judge)
    [chain] = st.correct_chains([st.new_chain(row)], script.regenerate, script.critique, max_rounds=3)
    assert chain["status"] == "done" and chain["rounds"] == 2
    assert [(e["step"], e["round"]) for e in chain["events"]] == [
        ("12 * 8 = 86", 0), ("12 * 8 = 96", 1), ("96 - 6 = 80", 1), ("96 - 6 = 90", 2),
        ("The answer is 90.", 2)]
    # a candidate that ends right wins over one that is longer
    chain = st.new_chain(row)
    events = [[{"step": "12 * 8 = 96", "correct": True, "reason": "", "round": 1},
               {"step": "96 - 6 = 91", "correct": False, "reason": "no", "round": 1}],
              [{"step": "12 * 8 = 96", "correct": True, "reason": "", "round": 1},
               {"step": "96 - 6 = 90", "correct": True, "reason": "", "round": 1},
               {"step": "The answer is 90.", "correct": True, "reason": "", "round": 1}]]
    assert st.best_candidate(chain, events) is events[1]


def test_choose_paths_mixes_right_and_flawed():
    rows = [{"id": f"r{i}", "is_correct": i < 5} for i in range(20)]
    chosen = st.choose_paths(rows, 8, seed=0)
    assert len(chosen) == 8 and sum(r["is_correct"] for r in chosen) == 2
    assert chosen == st.choose_paths(rows, 8, seed=0) and len({r["id"] for r in chosen}) == 8
    assert len(st.choose_paths(rows, 0, seed=0)) == 20
    few_flaws = [{"id": f"r{i}", "is_correct": i > 0} for i in range(6)]
    assert len(st.choose_paths(few_flaws, 4, seed=0)) == 4  # filled up with right paths


# -----------------------------------------------------------------------------
# Phase 3: the template rewriter and the checks every rewrite passes


def corrected_events():
    return [{"step": "12 * 8 = 86", "correct": False, "reason": "12 * 8 is 96, not 86.", "round": 0},
            {"step": "12 * 8 = 96", "correct": True, "reason": "", "round": 1},
            {"step": "96 - 6 = 90", "correct": True, "reason": "", "round": 1},
            {"step": "The answer is 90.", "correct": True, "reason": "", "round": 1}]


def test_template_rewriter_keeps_answer_and_arithmetic():
    text = st.template_self_talk(corrected_events(), "p1")
    lines = text.splitlines()
    assert lines[0] == "12 * 8 = 86" and lines[2:] == ["12 * 8 = 96", "96 - 6 = 90", "The answer is 90."]
    assert st.REFLECTION.match(lines[1]) and "12 * 8 is 96, not 86." in lines[1]
    assert text == st.template_self_talk(corrected_events(), "p1")  # deterministic per key
    talk = st.parse_self_talk(text)
    assert talk["final_steps"] == ["12 * 8 = 96", "96 - 6 = 90", "The answer is 90."]
    assert [(r["before"], r["after"]) for r in talk["reflections"]] == [(0, 1)]
    assert common.extract_answer(text) == "90"
    assert st.check_rewrite(text, "90", corrected=True) is None
    # varied phrasings: across chains the rewriter uses several openers and closers
    firsts = {st.template_self_talk(corrected_events(), f"p{i}").splitlines()[1].split()[0] for i in range(40)}
    assert len(firsts) >= 4


def test_first_person_reasons():
    assert st.first_person("it uses 5, but the problem says 6 eggs.") == "I used 5, but the problem says 6 eggs."
    assert st.first_person("It carries the earlier error from step 2, where 80 is wrong.") == \
        "I carried the earlier error from an earlier step, where 80 is wrong."
    # only the first finding, and never the gold answer the reference-aware critic knows
    assert st.first_person("The final answer 80 is wrong; the correct answer is 90.") == "the final answer 80 is wrong."
    assert st.first_person("It stops at 96, an intermediate value; the question asks for 90.") == \
        "that step stops at 96, an intermediate value."
    assert st.first_person("It uses 86. Also, the final answer 80 does not match the correct answer 90.") == "I used 86."
    assert st.first_person("The final answer 80 does not match the correct answer 90.") == \
        "the final answer 80 cannot be right."
    assert st.first_person("12 * 8 is 96, not 86.") == "12 * 8 is 96, not 86."
    assert st.first_person("60 + 55 is 115, not 55 + 55 = 110: it needs 60 where it uses 55.") == \
        "60 + 55 is 115, not 55 + 55 = 110: I needed 60 where I used 55."
    assert st.first_person("13 - 8 is 5, not 13 + 8 = 21: it uses the wrong operation.") == \
        "13 - 8 is 5, not 13 + 8 = 21: I used the wrong operation."
    assert st.first_person("") == "that step is not right."


def test_check_rewrite_drops_by_reason():
    ok = "12 * 8 = 86\nWait, 12 * 8 is 96, not 86.\n12 * 8 = 96\n96 - 6 = 90\nThe answer is 90."
    assert st.check_rewrite(ok, "90", corrected=True) is None
    assert st.check_rewrite(ok.replace("The answer is 90.", "The answer is 91."), "90", True) == "final answer changed"
    assert st.check_rewrite(ok.replace("The answer is 90.", "So that is it."), "90", True) == "no final answer"
    slip = ok.replace("96 - 6 = 90", "96 - 6 = 91")  # a kept step that does not compute
    assert st.check_rewrite(slip, "90", True) == "arithmetic slip in a kept step"
    bad_reflection = ok.replace("Wait, 12 * 8 is 96, not 86.", "Wait, 12 * 8 = 98, not 86.")
    assert st.check_rewrite(bad_reflection, "90", True) == "arithmetic slip in a reflection"
    echo = ok.replace("96 - 6 = 90", "The teacher says this step was wrong.\n96 - 6 = 90")
    assert st.check_rewrite(echo, "90", True) == "talk about a mistake outside a reflection"
    no_reflection = "12 * 8 = 96\n96 - 6 = 90\nThe answer is 90."
    assert st.check_rewrite(no_reflection, "90", corrected=True) == "reflection lost"
    assert st.check_rewrite(no_reflection, "90", corrected=False) is None
    assert st.check_rewrite("", "90", False) == "empty rewrite"


# -----------------------------------------------------------------------------
# Trajectory-level self-correction: the same chains arranged as solution -> critique -> revision


def test_trajectory_data_builder():
    row = annotated()
    chain = st.new_chain(row)
    chain["events"] = corrected_events()
    text = st.trajectory_text(chain)
    first, critique, revised = text.split("\n\n")
    assert first == "\n".join(FLAWED)
    assert critique == st.CHECK_LINE + "\n" + row["critique"]
    assert revised == st.REVISED_LINE + "\n12 * 8 = 96\n96 - 6 = 90\nThe answer is 90."
    assert common.extract_answer(text) == "90"  # the last stated answer is the revised one
    assert st.trajectory_answer(text) == ("80", True)
    # a path that was right already: solution and critique, no revision
    right = st.new_chain(annotated("p1-ref-0", REFERENCE, (True, True, True), ("", "", ""), True))
    text = st.trajectory_text(right)
    assert st.REVISED_LINE not in text and st.trajectory_answer(text) == ("90", False)
    rec = st.sft_record(chain, text)
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][:-1] == common.actor_messages(QUESTION)
    assert rec["messages"][-1]["content"] == text


# -----------------------------------------------------------------------------
# Test-time measures


def test_reflection_effects_by_hand():
    texts = ["12 * 8 = 86\nWait, 12 * 8 is 96.\n12 * 8 = 96\nThe answer is 96.",   # wrong -> right
             "12 * 8 = 96\nHmm, let me redo it.\n12 * 8 = 98\nThe answer is 98.",   # right -> wrong
             "Sam has eggs.\nHold on: recount.\nHe has 90.\nThe answer is 90.",      # unjudged
             "12 * 8 = 96\nThe answer is 96."]                                       # no reflection
    r = st.reflection_effects(texts)
    assert (r["outputs"], r["outputs_reflecting"], r["reflections"]) == (4, 3, 3)
    assert r["reflect_rate"] == pytest.approx(0.75)
    assert (r["wrong_to_right"], r["right_to_wrong"], r["unjudged"]) == (1, 1, 1)


def test_score_system_by_hand():
    answers = [["90", "91", "90"], ["5", None, "5"]]
    m = st.score_system(answers, ["90", "7"], [1, 3])
    assert m["n"] == 2 and m["acc"] == pytest.approx(0.5) and m["correct_first"] == 1
    assert m["ci"][0] < 0.5 < m["ci"][1]
    assert m["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["pass@3"] == pytest.approx(0.5) and m["mv@3"] == pytest.approx(0.5) and "mv@1" not in m
    assert m["no_answer"] == pytest.approx(1 / 6)


# -----------------------------------------------------------------------------
# End to end with a tiny random-weight Llama (conftest.tiny_model_path) and the rules critic


def write_inputs(tmp_path):
    rules = common.load_stage_module("02_annotate").rules_critique
    paths = [
        {"id": "p1-reference-0", "steps": REFERENCE, "answer": "90", "is_correct": True, "method": "reference"},
        {"id": "p1-rg3-0", "steps": FLAWED, "answer": "80", "is_correct": False, "method": "rg3",
         "error_step": 1},
        {"id": "p2-reference-0", "question": "Ann has 3 bags of 5 apples. How many apples?",
         "steps": ["3 * 5 = 15", "The answer is 15."], "answer": "15", "is_correct": True,
         "method": "reference", "gold_answer": "15", "reference_steps": ["3 * 5 = 15", "The answer is 15."]}]
    rows = []
    for p in paths:
        row = {"problem_id": p["id"].split("-")[0], "question": QUESTION, "gold_answer": "90",
               "reference_steps": REFERENCE, "source": "builtin", "difficulty": 1, **p}
        rows.append({**row, "critique": rules(row)})
    ann = tmp_path / "annotations.jsonl"
    common.write_jsonl_atomic(ann, rows)
    problems = tmp_path / "test.jsonl"
    common.write_jsonl_atomic(problems, [
        {"id": "t1", "source": "builtin", "question": "Tom has 4 boxes of 6 pens. How many pens?",
         "reference_steps": ["4 * 6 = 24", "The answer is 24."], "answer": "24", "difficulty": 1},
        {"id": "t2", "source": "builtin", "question": "Mia had 9 cards and gave away 2. How many are left?",
         "reference_steps": ["9 - 2 = 7", "The answer is 7."], "answer": "7", "difficulty": 1}])
    return ann, problems


def run(tmp_path, model, ann, problems, *extra):
    argv = ["--annotations", str(ann), "--problems", str(problems), "--fewshot-pool", str(problems),
            "--out-dir", str(tmp_path / "out"), "--actor", model, "--critic", "rules", "--backend", "hf",
            "--device", "cpu", "--max-new-tokens", "12", "--samples", "2", "--limit", "2",
            "--epochs", "1", "--batch-size", "2", "--max-rounds", "2", "--candidates", "2", *extra]
    return st.main(st.parse_args(argv))


def test_end_to_end_tiny_llama_and_resume(tmp_path, tiny_model_path):
    ann, problems = write_inputs(tmp_path)
    out = tmp_path / "out"
    m = run(tmp_path, tiny_model_path, ann, problems)
    data = json.loads((out / "data_stats.json").read_text())
    # random weights never repair the flawed path: it is dropped at the round limit, the two
    # right paths are kept, and both models train on exactly those
    assert data["paths"] == 3 and data["already_right"] == 2 and data["corrected"] == 0
    assert data["dropped_in_correction"] == {"still wrong after the round limit": 1}
    assert data["critic"] == "rules" and m["config"]["critic"] == "rules"
    for name in ("self_talk", "trajectory"):
        recs = common.read_jsonl(out / f"{name}_sft.jsonl")
        assert sorted(r["id"] for r in recs) == ["p1-reference-0", "p2-reference-0"]
        assert (out / "models" / name / common.SFT_DONE).exists()
    chains = {c["id"]: c for c in common.read_jsonl(out / "chains.jsonl")}
    assert chains["p1-rg3-0"]["rounds"] == 2 and chains["p1-rg3-0"]["inline"].startswith("12 * 8 = 86\nVerdict: Wrong.")
    rows = common.read_jsonl(out / "generations" / "correction_actor.jsonl")
    assert sorted(r["id"] for r in rows) == [f"p1-rg3-0:r{r}:{j}" for r in (1, 2) for j in (0, 1)]
    assert set(m["systems"]) == {"self_talk", "trajectory", "two_player", "actor"}
    assert all(s["n"] == 2 and set(s) >= {"pass@1", "pass@2", "mv@2"} for s in m["systems"].values())
    assert m["reflection"]["outputs"] == 4
    assert (out / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert "| self-talk model alone |" in (out / "metrics.md").read_text()
    assert len(common.read_jsonl(out / "generations" / "two_player_refinements.jsonl")) == 4

    # kill -9 in the middle of writing an eval row, rerun: same rows, nothing duplicated
    cache = out / "generations" / "eval_self_talk.jsonl"
    before = {p.name: p.read_text() for p in (out / "generations").glob("*.jsonl")}
    cache.write_bytes(cache.read_bytes()[:-5])
    m2 = run(tmp_path, tiny_model_path, ann, problems)
    after = {p.name: p.read_text() for p in (out / "generations").glob("*.jsonl")}
    assert Counter(r["id"] for r in common.read_jsonl(cache)) == Counter(json.loads(l)["id"] for l in before[cache.name].splitlines())
    assert {k: v for k, v in after.items() if k != cache.name} == {k: v for k, v in before.items() if k != cache.name}
    assert m2["data"] == m["data"]

    # cached text from another setup is refused, not mixed in
    with pytest.raises(common.UsageError, match="another setup"):
        run(tmp_path, tiny_model_path, ann, problems, "--max-rounds", "3")


def test_model_rewriter_is_checked_like_the_template(tmp_path, tiny_model_path):
    """A rewriting model's text goes through the same checks; random weights fail them, counted."""
    chain = st.new_chain(annotated())
    chain.update(events=corrected_events(), status="done", rounds=1)
    args = st.parse_args(["--rewriter", tiny_model_path, "--backend", "hf", "--device", "cpu",
                          "--max-new-tokens", "8", "--critic", "rules"])
    kept, drops = st.rewrite_chains(args, [chain], tmp_path)
    assert kept == [] and sum(drops.values()) == 1 and chain["rewrite_drop"] in drops
    assert [r["id"] for r in common.read_jsonl(tmp_path / "rewrites.jsonl")] == [chain["id"]]
    assert "Verdict: Wrong. 12 * 8 is 96, not 86." in st.rewriter_messages(chain)[1]["content"]
    template = st.parse_args(["--critic", "rules"])
    kept, drops = st.rewrite_chains(template, [chain], tmp_path)
    assert kept == [chain] and not drops and st.REFLECTION.match(chain["self_talk"].splitlines()[1])


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.run_cli(st.main, st.parse_args, ["--annotations", str(tmp_path / "missing.jsonl"),
                                                "--critic", "rules", "--problems", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        st.parse_args(["--max-rounds", "0"])
    assert e.value.code == 2
