"""Stage 1: the program inserter makes real mistakes of the named type; rg2/rg3 bookkeeping
(error_step, verbatim prefixes) and resuming, end to end with a tiny random-weight Llama."""
import json
import random
import re
from pathlib import Path

import pytest

import common
from conftest import load_stage

stage = load_stage("01_generate_errors")

QUESTION = ("Maya has 7 hens, and each hen lays 2 eggs in a month. On the way to the market 5 eggs "
            "crack. Then she bakes another 12 cookies. How many eggs does she have?")
STEPS = ["That is 7 * 2 = 14 eggs to start with.", "Taking away 5 leaves 14 - 5 = 9 eggs.",
         "Adding 12 gives 9 + 12 = 21 eggs.", "The answer is 21."]
COMPUTATION = re.compile(r"((?:\d+ [-+*/] )+\d+) = (\d+)")


def words(text):
    return re.findall(r"[A-Za-z]+", text)


def calc(text):
    """(numbers, ops, result) of the computation in a step, read without the stage's parser."""
    m = COMPUTATION.search(text)
    assert m, text
    tokens = m.group(1).split()
    return [int(t) for t in tokens[0::2]], tokens[1::2], int(m.group(2))


def value(nums, ops):
    """* and / first, then + and -, left to right."""
    sums, signs = [nums[0]], []
    for op, n in zip(ops, nums[1:]):
        if op in "*/":
            sums[-1] = sums[-1] * n if op == "*" else sums[-1] / n
        else:
            sums.append(n)
            signs.append(op)
    return sums[0] + sum(n if op == "+" else -n for op, n in zip(signs, sums[1:]))


# -----------------------------------------------------------------------------
# program inserter, one mistake type at a time

@pytest.mark.parametrize("seed", range(5))
def test_calculation_error_changes_only_the_result(seed):
    k, new, kind, fell_back = stage.program_insert(STEPS, QUESTION, ["calculation error"], random.Random(seed))
    nums, ops, result = calc(new)
    assert kind == "calculation error" and not fell_back and 1 <= k <= 3
    assert (nums, ops) == calc(STEPS[k - 1])[:2]  # same numbers, same operation
    assert value(nums, ops) != result  # but the arithmetic is now wrong
    assert words(new) == words(STEPS[k - 1]) and new.endswith(".")


@pytest.mark.parametrize("seed", range(5))
def test_wrong_operation_recomputes_consistently(seed):
    k, new, kind, _ = stage.program_insert(STEPS, QUESTION, ["wrong operation"], random.Random(seed))
    nums, ops, result = calc(new)
    old_nums, old_ops, old_result = calc(STEPS[k - 1])
    assert kind == "wrong operation" and nums == old_nums and ops != old_ops
    assert value(nums, ops) == result != old_result and result >= 0
    assert words(new) == words(STEPS[k - 1])


@pytest.mark.parametrize("seed", range(5))
def test_misread_quantity_changes_a_number_from_the_question(seed):
    k, new, kind, _ = stage.program_insert(STEPS, QUESTION, ["misread quantity"], random.Random(seed))
    nums, ops, result = calc(new)
    old_nums, old_ops, old_result = calc(STEPS[k - 1])
    changed = [(a, b) for a, b in zip(old_nums, nums) if a != b]
    question_numbers = {int(n) for n in re.findall(r"\d+", QUESTION)}
    assert kind == "misread quantity" and ops == old_ops and len(changed) == 1
    assert changed[0][0] in question_numbers and changed[0][1] > 0
    assert value(nums, ops) == result != old_result
    # "Taking away 5 leaves 14 - 5" misread as 6 says 6 in both places, so it still reads well
    if k == 2 and changed[0][0] == 5:
        assert new.startswith(f"Taking away {changed[0][1]} leaves")


def test_skipped_or_duplicated_quantity():
    k, new, kind, _ = stage.program_insert(STEPS[:1] + STEPS[-1:], QUESTION, ["skipped/duplicated quantity"],
                                           random.Random(0))
    assert (k, kind, new) == (1, "skipped/duplicated quantity", "That is 7 * 2 * 2 = 28 eggs to start with.")
    three = ["So the total is 4 + 5 + 6 = 15 apples.", "The answer is 15."]
    lengths = set()
    for seed in range(20):
        _, new, _, _ = stage.program_insert(three, "4 5 6", ["skipped/duplicated quantity"], random.Random(seed))
        nums, ops, result = calc(new)
        assert value(nums, ops) == result != 15 and words(new) == words(three[0])
        lengths.add(len(nums))
    assert lengths == {2, 4}  # terms are both skipped and duplicated


@pytest.mark.parametrize("seed", range(5))
def test_logic_error_uses_an_earlier_value(seed):
    k, new, kind, _ = stage.program_insert(STEPS, QUESTION, ["logic error"], random.Random(seed))
    assert kind == "logic error" and k in (2, 3)  # step 1 has no earlier value to confuse
    nums, ops, result = calc(new)
    old_nums = calc(STEPS[k - 1])[0]
    earlier = {n for s in STEPS[:k - 1] for n in calc(s)[0] + [calc(s)[2]]}
    (old, wrong), = [(a, b) for a, b in zip(old_nums, nums) if a != b]
    assert old in {calc(s)[2] for s in STEPS[:k - 1]} and wrong in earlier
    assert value(nums, ops) == result


def test_type_falls_back_when_not_applicable_and_records_it():
    one = ["Adding 2 gives 5 + 2 = 7 books.", "The answer is 7."]
    k, new, kind, fell_back = stage.program_insert(one, "Noah has 5 books and buys 2 more.",
                                                   ["logic error", "calculation error"], random.Random(1))
    assert (k, kind, fell_back) == (1, "calculation error", True)  # no earlier value at step 1
    assert stage.program_insert(["No arithmetic here.", "The answer is 3."], "q", list(stage.MISTAKES),
                                random.Random(0)) is None
    # result mentioned twice in the step: both change
    halve = ["Half of 20 is 20 / 2 = 10, so 10 books are left.", "The answer is 10."]
    _, new, _, _ = stage.program_insert(halve, "20 books", ["calculation error"], random.Random(0))
    r = calc(new)[2]
    assert r != 10 and new.endswith(f"so {r} books are left.")


def test_parse_inserted_and_assemble():
    assert stage.parse_inserted("Here is the rewritten step:\nStep 2: 14 - 5 = 8 eggs.", "14 - 5 = 9 eggs.") \
        == "14 - 5 = 8 eggs."
    assert stage.parse_inserted("  \n14 - 5 = 9 eggs.\n", "14 - 5 = 9 eggs.") is None
    assert stage.parse_inserted("", "x") is None
    fixed = ["a = 1.", "b = 2."]
    assert stage.assemble(fixed, "Step 3: c = 3.\nThe answer is 3.\nNew question: ...") == \
        fixed + ["c = 3.", "The answer is 3."]
    assert stage.assemble(fixed, "") == fixed


# -----------------------------------------------------------------------------
# end to end with a tiny random Llama: every path is wrong, which is what bookkeeping needs

PROBLEMS = [
    {"id": "p1", "source": "builtin", "question": QUESTION, "reference_steps": STEPS, "answer": "21",
     "difficulty": 3},
    {"id": "p2", "source": "builtin", "question": "Liam has 5 books. He buys 2 more. How many books?",
     "reference_steps": ["Adding 2 gives 5 + 2 = 7 books.", "The answer is 7."], "answer": "7", "difficulty": 1},
    {"id": "p3", "source": "builtin", "question": "Zoe reads 6 pages a day for 5 days, then 4 more pages.",
     "reference_steps": ["That is 6 * 5 = 30 pages.", "Now the total is 30 + 4 = 34 pages.",
                         "The answer is 34."], "answer": "34", "difficulty": 2},
]


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    common.write_jsonl_atomic(path, PROBLEMS)
    return path


def run(actor, problems, out, *extra):
    args = stage.parse_args(["--problems", str(problems), "--out", str(out), "--actor", actor,
                             "--backend", "hf", "--device", "cpu", "--max-new-tokens", "16",
                             "--rg1-samples", "2", "--rg2-samples", "3", "--rg3-samples", "3", *extra])
    return stage.main(args)


@pytest.fixture(scope="module")
def clean_run(tiny_model_path, problems_file, tmp_path_factory):
    """One uninterrupted run: all three methods over the three problems."""
    out = tmp_path_factory.mktemp("clean") / "paths.jsonl"
    stats = run(tiny_model_path, problems_file, out)
    return out, stats


def test_end_to_end_bookkeeping(clean_run):
    out, stats = clean_run
    rows = common.read_jsonl(out)
    refs = {p["id"]: p["reference_steps"] for p in PROBLEMS}
    by_method = {m: [r for r in rows if r["method"] == m] for m in ("rg1", "rg2", "rg3")}
    assert by_method["rg2"] and by_method["rg3"]
    for r in rows:
        assert r["id"] == f"{r['problem_id']}-{r['method']}-{r['id'].rsplit('-', 1)[1]}"
        assert r["is_correct"] is False and r["steps"] == common.split_steps("\n".join(r["steps"]))
    for r in by_method["rg1"]:
        assert r["error_step"] is None and r["error_type"] is None and r["inserter"] is None
    for r in by_method["rg2"]:  # template is the reference: random text is never right
        k = r["error_step"]
        assert 1 <= k <= len(refs[r["problem_id"]]) - 1 and len(r["steps"]) >= k
        assert r["steps"][:k - 1] == refs[r["problem_id"]][:k - 1]
    for r in by_method["rg3"]:
        k, ref = r["error_step"], refs[r["problem_id"]]
        assert r["inserter"] == "program" and r["error_type"] in stage.MISTAKES
        assert r["steps"][:k - 1] == ref[:k - 1]
        new_nums, new_ops, new_result = calc(r["steps"][k - 1])
        assert new_result != calc(ref[k - 1])[2] and words(r["steps"][k - 1]) == words(ref[k - 1])
        if r["error_type"] == "calculation error":
            assert value(new_nums, new_ops) != new_result
    saved = json.loads(out.with_name("paths.stats.json").read_text())
    assert saved == json.loads(json.dumps(stats))
    for m, rs in by_method.items():
        c = saved["by_method"][m]
        assert c["kept"] == len(rs) == c["wrong"] and c["correct"] == 0
        assert c["generated"] == {"rg1": 2, "rg2": 3, "rg3": 3}[m] * len(PROBLEMS)
        dropped = c["empty_dropped"] + c["insert_failed"] + c["repaired_dropped"] + c["correct_dropped"]
        assert c["generated"] == c["kept"] + dropped
    assert sum(saved["by_method"]["rg3"]["error_types"].values()) == len(by_method["rg3"])


def test_resume_after_kill_gives_the_same_rows(clean_run, tiny_model_path, problems_file, tmp_path):
    clean, _ = clean_run
    # kill -9 while p2's last rg2 row was being written: the files hold a prefix of the clean
    # run's writes (rows of a problem first, then its done marker)
    rows = common.read_jsonl(clean)
    last_p2_rg2 = max(i for i, r in enumerate(rows) if r["id"].startswith("p2-rg2-"))
    lines = clean.read_bytes().splitlines(keepends=True)
    killed = tmp_path / "paths.jsonl"
    killed.write_bytes(b"".join(lines[:last_p2_rg2]) + lines[last_p2_rg2][:40])
    markers = [json.loads(line) for line in Path(str(clean) + ".done").read_text().splitlines()]
    keep = [m for m in markers if m["id"].endswith(":rg1") or m["id"] == "p1:rg2"]
    common.write_jsonl_atomic(str(killed) + ".done", keep)
    run(tiny_model_path, problems_file, killed)
    again = common.read_jsonl(killed)
    ids = [r["id"] for r in again]
    assert len(ids) == len(set(ids)) and len(common.read_jsonl(str(killed) + ".done")) == 9
    assert sorted(again, key=lambda r: r["id"]) == sorted(rows, key=lambda r: r["id"])
    assert json.loads(killed.with_name("paths.stats.json").read_text()) == \
        json.loads(clean.with_name("paths.stats.json").read_text())
    run(tiny_model_path, problems_file, killed)  # everything done: nothing is generated or written
    assert common.read_jsonl(killed) == again


def test_model_inserter_bookkeeping(tiny_model_path, problems_file, tmp_path):
    out = tmp_path / "paths.jsonl"
    stats = run(tiny_model_path, problems_file, out, "--methods", "rg3", "--rg3-inserter", "model",
                "--rg3-types", "calculation error,unit error", "--fewshot", "0")
    rows = common.read_jsonl(out)
    refs = {p["id"]: p["reference_steps"] for p in PROBLEMS}
    c = stats["by_method"]["rg3"]
    assert rows and c["generated"] == 9 and c["kept"] == len(rows) and c["kept"] + c["insert_failed"] + \
        c["repaired_dropped"] + c["empty_dropped"] == 9
    for r in rows:
        k = r["error_step"]
        assert r["inserter"] == "model" and r["error_type"] in ("calculation error", "unit error")
        assert r["steps"][:k - 1] == refs[r["problem_id"]][:k - 1] and r["steps"][k - 1]
        assert common.split_steps(r["steps"][k - 1]) == [r["steps"][k - 1]]


def test_reference_method_adds_one_correct_path_per_problem(tmp_path, problems_file):
    out = tmp_path / "paths.jsonl"
    stats = stage.main(stage.parse_args(["--problems", str(problems_file), "--out", str(out),
                                         "--methods", "reference"]))
    rows = common.read_jsonl(out)
    assert [r["id"] for r in rows] == [f"{p['id']}-reference-0" for p in PROBLEMS]
    assert all(r["is_correct"] and r["error_step"] is None for r in rows)
    assert [r["steps"] for r in rows] == [p["reference_steps"] for p in PROBLEMS]
    assert stats["by_method"]["reference"]["correct"] == len(PROBLEMS)


def test_actor_prompt_is_the_kits_one_fewshot_path(problems_file, tmp_path):
    """01 prompts the actor exactly as solve.py and 05 do (common.solve_messages); its worked
    examples come from --fewshot-pool, else from its own train problems, never from a test split."""
    args = stage.parse_args(["--problems", str(problems_file), "--fewshot", "1"])
    assert args.fewshot_pool is None
    shots = common.load_fewshot_pool(args, PROBLEMS)
    setup = stage.GenerationSetup(args, shots, {})
    prompt = setup.prompt(PROBLEMS[0])
    assert prompt == common.solve_messages(PROBLEMS[0], PROBLEMS, 1, args.seed)
    assert len(prompt) == 4 and prompt[1]["content"] != PROBLEMS[0]["question"]  # one other problem
    test_split = [dict(p, split="test") for p in PROBLEMS]
    with pytest.raises(common.UsageError, match="--fewshot-pool"):
        common.load_fewshot_pool(args, test_split)
    pool = tmp_path / "pool.jsonl"
    common.write_jsonl_atomic(pool, PROBLEMS[1:2])
    args = stage.parse_args(["--problems", str(problems_file), "--fewshot-pool", str(pool)])
    assert common.load_fewshot_pool(args, test_split) == PROBLEMS[1:2]
    assert common.load_fewshot_pool(stage.parse_args(["--fewshot", "0"]), test_split) == []


# -----------------------------------------------------------------------------
# RG3 on MATH-style steps (no `a op b = c`): the program says why it made nothing; auto asks a model

MATH_PROBLEM = {"id": "m1", "split": "train", "question": "Solve $x^2 - 5x + 6 = 0$; give the sum of the roots.",
                "reference_steps": ["We factor: \\[x^2 - 5x + 6 = (x-2)(x-3).\\]", "So the roots are $2$ and $3$.",
                                    "The answer is \\boxed{5}."], "answer": "5"}


class StandInEngine:
    """The inserter rewrites the step it is shown; the actor then ends with a wrong answer."""

    def __init__(self):
        self.inserter_prompts = 0

    def generate(self, prompts, n=1, **kw):
        out = []
        for p in prompts:
            inserter = "You help build exercises" in p[0]["content"]
            self.inserter_prompts += inserter
            out.append(["So the roots are $2$ and $4$." if inserter else "The answer is \\boxed{6}."] * n)
        return out


@pytest.mark.parametrize("inserter", ["program", "auto"])
def test_rg3_on_math_steps(inserter, tmp_path, monkeypatch, capsys):
    engine = StandInEngine()
    monkeypatch.setattr(stage.common, "get_engine", lambda *a, **k: engine)
    problems = tmp_path / "math.jsonl"
    common.write_jsonl_atomic(problems, [MATH_PROBLEM])
    out = tmp_path / "paths.jsonl"
    stats = stage.main(stage.parse_args(["--problems", str(problems), "--out", str(out), "--methods", "rg3",
                                         "--rg3-samples", "2", "--rg3-inserter", inserter, "--fewshot", "0"]))
    c, rows, said = stats["by_method"]["rg3"], common.read_jsonl(out), capsys.readouterr().out
    if inserter == "program":
        assert rows == [] and c["insert_failed"] == 2 and engine.inserter_prompts == 0
        assert "found no `a op b = c` to rewrite in 2 of 2 tries and made no path" in said
        assert "--rg3-inserter auto or model" in said
    else:
        assert engine.inserter_prompts == 2 and c["kept"] == 2 and "found no" not in said
        assert all(r["inserter"] == "model" and r["answer"] == "6" for r in rows)
        assert all(r["steps"][r["error_step"] - 1] == "So the roots are $2$ and $4$." for r in rows)
