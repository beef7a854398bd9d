"""Stage 6: the keep/reject rules and the data-share accounting against hand-computed values, the
whole loop with a scripted actor (known samples and refinements -> known counts) including
resume after a kill between and within iterations, and a tiny random Llama end to end."""
import json
import shutil
from pathlib import Path

import pytest

import common
from conftest import load_stage

si = load_stage("06_self_improve")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def problem(pid, question, reference, answer):
    return {"id": pid, "source": "builtin", "split": "train", "question": question,
            "reference_steps": reference, "answer": answer, "difficulty": 1}


EASY = problem("easy", "Tom has 2 pens and buys 3 more. How many pens?", ["2 + 3 = 5", "The answer is 5."], "5")
MID = problem("mid", "Ann packs 4 boxes of 6 cups and breaks 4. How many cups are left?",
              ["4 * 6 = 24", "24 - 4 = 20", "The answer is 20."], "20")
HARD = problem("hard", "Bo buys 3 packs of 5 cards, gets 7 more, then doubles them. How many cards?",
               ["3 * 5 = 15", "15 + 7 = 22", "22 * 2 = 44", "The answer is 44."], "44")

# -----------------------------------------------------------------------------
# The shortcut guard and the keep/reject rules


def test_shortcut_guard_counts_computations():
    ref = HARD["reference_steps"]  # 3 computations: fewer than 1.5 is a shortcut
    assert si.n_computations(si.join_steps(ref)) == 3
    assert si.is_shortcut("The answer is 44.", ref, 0.5)
    assert si.is_shortcut("So 22 * 2 = 44.\nThe answer is 44.", ref, 0.5)
    assert not si.is_shortcut("15 + 7 = 22\n22 * 2 = 44\nThe answer is 44.", ref, 0.5)
    assert not si.is_shortcut("The answer is 44.", ["The answer is 44."], 0.5)  # nothing to compare
    assert si.is_shortcut("15 + 7 = 22\n22 * 2 = 44\nThe answer is 44.", ref, 1.0)  # a stricter ratio


def test_refinement_chain_keeps_the_first_correct_non_shortcut():
    chain = ["3 + 5 = 8\nThe answer is 8.", "The answer is 44.",
             "3 * 5 = 15\n15 + 7 = 22\n22 * 2 = 44\nThe answer is 44.",
             "5 * 3 = 15\n15 + 7 = 22\n44\nThe answer is 44."]
    assert si.refinement_chain(chain, HARD, 0.5) == {"kept": chain[2], "round": 3, "shortcuts": 1}
    assert si.refinement_chain(chain[:2], HARD, 0.5) == {"kept": None, "round": None, "shortcuts": 1}
    assert si.refinement_chain([], HARD, 0.5)["kept"] is None


def test_only_wrong_samples_continue_and_chains_stop():
    correct = [True, False, False, False]
    chains = {1: ["The answer is 3."], 2: ["4 * 6 = 24\n24 - 4 = 20\nThe answer is 20."], 3: []}
    # sample 0 is correct (never refined), 2 already has its refinement, 1 and 3 go on
    assert si.chains_to_continue(correct, chains, MID, 4, 0.5) == [1, 3]
    assert si.chains_to_continue(correct, chains, MID, 1, 0.5) == [3]  # chain 1 is at its cap


def test_keep_question_counts_duplicates_shortcuts_and_one_per_critique():
    samples = ["2 + 3 = 5\nThe answer is 5.", "Step 1: 2 + 3 = 5\n\nThe answer is 5.", "2 + 3 = 6\nThe answer is 6.",
               "2 * 3 = 6\nThe answer is 6."]
    chains = {2: ["The answer is 5.", "2 + 3 = 5\nThe answer is 5.", "3 + 2 = 5\nThe answer is 5."],
              3: ["3 + 2 = 5\nThe answer is 5.", "2 + 3 = 5\nSo 5.\nThe answer is 5."]}
    got = si.keep_question(EASY, samples, chains, 0.5)
    # sample 1 is sample 0 with a label and a blank line: the same steps, a duplicate; chain 2 keeps
    # its 2nd refinement (the 1st is a shortcut), which duplicates sample 0; chain 3 keeps its 1st only
    assert got["kept"] == [("sample", "2 + 3 = 5\nThe answer is 5."), ("refinement", "3 + 2 = 5\nThe answer is 5.")]
    assert got["counts"] == {"samples": 4, "correct_samples": 2, "duplicate_samples": 1, "wrong_samples": 2,
                             "refinements": 5, "fixed": 2, "shortcut_refinements": 1, "duplicate_refinements": 1}
    assert got["correct"] == [True, True, False, False]
    vanilla = si.keep_question(EASY, samples, None, 0.5)
    assert [k for k, _ in vanilla["kept"]] == ["sample"] and vanilla["counts"]["refinements"] == 0
    with pytest.raises(ValueError, match="must not be refined"):
        si.keep_question(EASY, samples, {0: ["2 + 3 = 5\nThe answer is 5."]}, 0.5)


def test_data_share_by_bin_hand_computed():
    records = ([{"kind": "reference", "bin": 1}] * 5 + [{"kind": "sample", "bin": 1}] * 3
               + [{"kind": "sample", "bin": 3}] + [{"kind": "refinement", "bin": 3}] * 2
               + [{"kind": "refinement", "bin": 5}] * 2 + [{"kind": "refine_data", "bin": None}])
    d = si.data_share(records)
    assert d["n"] == 8  # reference solutions and 03's data are not the loop's own data
    assert d["count"] == {1: 3, 2: 0, 3: 3, 4: 0, 5: 2}
    assert d["share"] == {1: 3 / 8, 2: 0.0, 3: 3 / 8, 4: 0.0, 5: 2 / 8}
    assert d["by_kind"]["refinement"] == {1: 0, 2: 0, 3: 2, 4: 0, 5: 2}
    assert si.data_share([{"kind": "reference", "bin": 1}])["share"][1] is None


def test_layout_shares_what_does_not_depend_on_the_critic():
    a, b = si.Layout("run", "rules"), si.Layout("run", "out/default/critic")
    assert a.iteration(4, "vanilla", 2) == b.iteration(4, "vanilla", 2) == Path("run/n4/vanilla/iter2")
    assert a.iteration(4, "critique", 0) == b.iteration(8, "vanilla", 0) == Path("run/iter0")
    assert a.iteration(4, "critique", 1) == Path("run/n4/critique-rules/iter1")
    assert b.iteration(4, "critique", 1) == Path("run/n4/critique-out-default-critic/iter1")
    assert a.critic_eval(Path("x")) != b.critic_eval(Path("x")) and a.report() != b.report()


# -----------------------------------------------------------------------------
# The loop with a scripted actor (real fine-tuning of the tiny model, rules critic)

SAMPLES = {
    "easy": ["2 + 3 = 5\nThe answer is 5."] * 4,  # 4 correct, 3 duplicates
    "mid": ["4 * 6 = 24\n24 - 4 = 20\nThe answer is 20.", "Boxes: 4 * 6 = 24\nLeft: 24 - 4 = 20\nThe answer is 20.",
            "4 * 6 = 24\n24 - 6 = 18\nThe answer is 18.", "4 + 6 = 10\nThe answer is 10."],
    "hard": ["3 * 5 = 15\nThe answer is 15.", "3 + 5 = 8\nThe answer is 8.", "3 * 5 = 15\n15 + 7 = 21\nThe answer is 21.",
             "3 * 7 = 21\nThe answer is 21."],
}
FULL_HARD = "3 * 5 = 15\n15 + 7 = 22\n22 * 2 = 44\nThe answer is 44."
# refinement of (question, wrong sample) by round 1..4
REFINE = {
    ("mid", 2): ["4 * 6 = 24\n24 - 4 = 20\nThe answer is 20."],  # a duplicate of sample 0
    ("mid", 3): ["4 + 6 = 10\nThe answer is 10.", "6 * 4 = 24\n24 - 4 = 20\nThe answer is 20."],
    ("hard", 0): ["The answer is 44.", FULL_HARD],  # a shortcut first
    ("hard", 1): ["3 + 5 = 8\nThe answer is 8."] * 4,  # never fixed
    ("hard", 2): ["22 * 2 = 44\nThe answer is 44.", "The answer is 40.",
                  "5 * 3 = 15\n15 + 7 = 22\n22 * 2 = 44\nThe answer is 44."],
    ("hard", 3): ["15 + 7 = 22\n22 * 2 = 44\nThe answer is 44."],  # 2 of 3 computations: kept
}
TEST = [problem("t-right", "Lia has 1 cat and gets 1 more. How many cats?", ["1 + 1 = 2", "The answer is 2."], "2"),
        problem("t-wrong", "Max has 9 eggs and uses 4. How many eggs?", ["9 - 4 = 5", "The answer is 5."], "5")]


class ScriptedActor:
    """Solves from the tables above whatever the model; refines by the round that cached_generate's
    seed encodes (seed + 1000 * round); at test time refines every answer into the gold one."""

    def __init__(self):
        self.prompts = []

    def plan(self, n_sequences, max_new_tokens):
        return "scripted"

    def close(self):
        pass

    def generate(self, prompts, n=1, seed=0, **kw):
        self.prompts += [p[-1]["content"] for p in prompts]
        return [self._one(p[-1]["content"], n, seed) for p in prompts]

    def _one(self, user, n, seed):
        test = next((p for p in TEST if p["question"] in user), None)
        if test:
            if "A previous attempt:" in user:
                return [f"{test['reference_steps'][0]}\nThe answer is {test['answer']}."] * n
            return ["1 + 1 = 2\nThe answer is 2." if test["id"] == "t-right" else "9 - 4 = 6\nThe answer is 6."] * n
        q = next(p["id"] for p in (EASY, MID, HARD) if p["question"] in user)
        if "A previous attempt:" in user:
            attempt = user.split("A previous attempt:\n")[1].split("\n\nA teacher's feedback")[0]
            j = next(j for j, s in enumerate(SAMPLES[q]) if common.number_steps(common.split_steps(s)) == attempt)
            return [REFINE[q, j][seed // 1000 - 1]] * n
        return SAMPLES[q][:n]


@pytest.fixture()
def scripted(tmp_path, monkeypatch):
    actor = ScriptedActor()
    monkeypatch.setattr(common, "get_engine", lambda *a, **k: actor)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    common.write_jsonl_atomic(train, [EASY, MID, HARD])
    common.write_jsonl_atomic(test, TEST)
    return actor, str(train), str(test)


def scripted_argv(tmp_path, tiny_model_path, train, test, *extra):
    return ["--actor", tiny_model_path, "--critic", "rules", "--train-problems", train, "--test-problems", test,
            "--n", "4", "--iterations", "2", "--difficulty-samples", "4", "--out-dir", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "8", "--max-length", "512", *extra]


def test_loop_keeps_and_rejects_by_hand_and_resumes(tmp_path, scripted, tiny_model_path):
    actor, train, test = scripted
    argv = scripted_argv(tmp_path, tiny_model_path, train, test)
    m = si.main(si.parse_args(argv))
    run = tmp_path / "run"
    assert m["train_bins"] == {1: 1, 2: 0, 3: 1, 4: 0, 5: 1}  # pass rates 1, 0.5, 0
    runs = {r["method"]: r["iterations"] for r in m["runs"]}
    van, cri = runs["vanilla"][1], runs["critique"][1]
    assert van["by_kind"] == {"reference": 3, "sample": 3, "refinement": 0, "refine_data": 0}
    assert van["data_share"]["count"] == {1: 1, 2: 0, 3: 2, 4: 0, 5: 0}
    assert cri["kept"] == {"samples": 12, "correct_samples": 6, "duplicate_samples": 3, "wrong_samples": 6,
                           "refinements": 13, "fixed": 5, "shortcut_refinements": 2, "duplicate_refinements": 1}
    assert cri["by_kind"] == {"reference": 3, "sample": 3, "refinement": 4, "refine_data": 0}
    assert cri["train_size"] == 10
    assert cri["data_share"]["share"] == {1: 1 / 7, 2: 0.0, 3: 3 / 7, 4: 0.0, 5: 3 / 7}  # toward the hard bin
    assert cri["critic_on_wrong_samples"]["critiques"] == 6
    # only the 6 wrong samples were critiqued; round r refined only chains still without a keeper
    ids = [r["id"] for r in common.read_jsonl(run / "n4/critique-rules/iter1/critiques.jsonl")]
    assert sorted(ids) == ["hard:0", "hard:1", "hard:2", "hard:3", "mid:2", "mid:3"]
    refs = [r["id"] for r in common.read_jsonl(run / "n4/critique-rules/iter1/refinements.jsonl")]
    assert len(refs) == len(set(refs)) == 13 and "hard:1:r4" in refs and "mid:2:r2" not in refs
    trained = common.read_jsonl(run / "n4/critique-rules/iter1/train.jsonl")
    assert {r["messages"][-1]["content"] for r in trained if r["kind"] == "refinement"} == {
        REFINE["mid", 3][1], FULL_HARD, REFINE["hard", 2][2], REFINE["hard", 3][0]}
    assert all(r["messages"][:-1] == common.solve_messages(HARD, [], 0) for r in trained if r["question_id"] == "hard")
    assert not (run / "n4/vanilla/iter1/samples.jsonl").exists()  # iteration 1 reuses iteration 0's samples
    e = runs["vanilla"][0]["eval"]
    assert (e["greedy"]["correct"], e["with_critic"]["correct"], e["wrong_to_right"]) == (1, 2, 1)
    assert m["critic"] == "rules" and "critic `rules`" in (run / "report-rules/metrics.md").read_text()
    for png in ("accuracy_vs_iteration.png", "data_share.png"):
        assert (run / "report-rules" / png).read_bytes()[:8] == PNG_MAGIC
    for folder in ("iter0", "n4/vanilla/iter1", "n4/vanilla/iter2", "n4/critique-rules/iter2"):
        assert (run / folder / "model" / "model.safetensors").exists()

    # resume: a finished run generates nothing and trains nothing
    files = {p: p.read_bytes() for p in run.rglob("*.jsonl")}
    actor.prompts.clear()
    assert si.main(si.parse_args(argv))["runs"] == m["runs"] and actor.prompts == []

    # killed inside an iteration: the last refinement row lost, the one before torn mid-line
    path = run / "n4/critique-rules/iter1/refinements.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:15])
    shutil.rmtree(run / "n4/critique-rules/iter1/model")
    shutil.rmtree(run / "n4/critique-rules/iter2")  # what came after the kill never happened
    m2 = si.main(si.parse_args(argv))
    assert len(actor.prompts) == 2 + 3 + 13 + 2 * 2  # 2 refinements; iteration 2: samples, refinements, test
    assert m2["runs"] == m["runs"]
    assert [r["id"] for r in common.read_jsonl(path)] == [r["id"] for r in map(json.loads, lines)]

    # killed between iterations: iteration 2 of vanilla is gone, iteration 1 is kept as it was
    shutil.rmtree(run / "n4/vanilla/iter2")
    actor.prompts.clear()
    m3 = si.main(si.parse_args(argv))
    assert len(actor.prompts) == 3 + 2 * 2 and m3["runs"] == m["runs"]  # samples, test
    for p, data in files.items():
        if "vanilla/iter2" not in str(p):
            assert p.read_bytes() == data, p

    with pytest.raises(common.UsageError, match="another setup"):
        si.main(si.parse_args(argv + ["--temperature", "1.0"]))


# -----------------------------------------------------------------------------
# A tiny random-weight Llama end to end, both methods


def test_end_to_end_tiny_llama(tmp_path, tiny_model_path, monkeypatch):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    common.write_jsonl_atomic(train, [EASY, MID, HARD])
    common.write_jsonl_atomic(test, TEST)
    argv = ["--actor", tiny_model_path, "--critic", "rules", "--train-problems", str(train),
            "--test-problems", str(test), "--n", "1,2", "--iterations", "1", "--difficulty-samples", "2",
            "--actor-max-new-tokens", "8", "--backend", "hf", "--out-dir", str(tmp_path / "run"),
            "--batch-size", "8", "--max-length", "512"]
    m = si.main(si.parse_args(argv))
    saved = json.loads((tmp_path / "run/report-rules/metrics.json").read_text())
    assert saved["critic"] == "rules" and [(r["n"], r["method"]) for r in saved["runs"]] == \
        [(1, "vanilla"), (1, "critique"), (2, "vanilla"), (2, "critique")]
    for r in saved["runs"]:
        assert [it["iteration"] for it in r["iterations"]] == [0, 1]  # iteration 2+: the scripted test
        for it in r["iterations"][1:]:
            assert it["train_size"] == 3 + it["data_share"]["n"]
            assert set(it["eval"]["greedy"]["by_bin"]) == {"1", "2", "3", "4", "5"}
    for png in ("accuracy_vs_iteration.png", "data_share.png", "accuracy_vs_n.png"):
        assert (tmp_path / "run/report-rules" / png).read_bytes()[:8] == PNG_MAGIC
    # the iteration-0 pool serves both N: 2 samples per training question, not 1 + 2
    assert len(common.read_jsonl(tmp_path / "run/iter0/train_samples.jsonl")) == 3 * 2
    assert "| 2 | critique | 1 |" in (tmp_path / "run/report-rules/metrics.md").read_text()
    calls = []
    real = common.Engine.generate
    monkeypatch.setattr(common.Engine, "generate", lambda self, prompts, **kw: calls.append(len(prompts))
                        or real(self, prompts, **kw))
    assert si.main(si.parse_args(argv))["runs"] == m["runs"] and calls == []  # resumed: nothing to redo
