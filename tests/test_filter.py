"""Stage 3 (03_filter.py): the N/k rule, refinement selection, statistics, SFT files, resume."""
import json

import pytest

import common
from conftest import load_stage

flt = load_stage("03_filter")


def annotation(pid, method, steps, gold, is_correct, wrong_step=None, difficulty=2, source="builtin"):
    """A stage-2 row with a rule-style critique consistent with its label."""
    ok = [wrong_step is None or i < wrong_step for i in range(1, len(steps) + 1)]
    why = ["The arithmetic checks out." if c else "This computation is wrong." for c in ok]
    critique = common.format_critique(steps, ok, why, is_correct,
                                      "The answer matches." if is_correct else "The answer is wrong.")
    return {"id": f"{pid}-{method}-0", "problem_id": pid, "source": source, "question": f"Question {pid}?",
            "reference_steps": ["2 + 3 = 5", "The answer is 5."], "gold_answer": gold,
            "difficulty": difficulty, "method": method, "steps": steps,
            "answer": common.extract_answer(steps[-1]), "is_correct": is_correct,
            "error_step": wrong_step, "error_type": None, "inserter": None, "critique": critique,
            "annotator": "rules", "critique_first_wrong_step": wrong_step,
            "critique_final_correct": is_correct}


def good(pid, method="rg1", difficulty=2):
    return annotation(pid, method, ["2 + 3 = 5", "The answer is 5."], "5", True, None, difficulty)


def bad(pid, method="rg2", difficulty=2, gold="5"):
    return annotation(pid, method, ["2 + 3 = 6", "The answer is 6."], gold, False, 1, difficulty)


# -----------------------------------------------------------------------------
# The rule and the selection

@pytest.mark.parametrize("n_correct,k,kept", [
    (0, 0, True), (3, 0, True), (0, 1, False), (1, 1, True), (4, 1, True),
    (1, 2, False), (2, 2, True), (7, 8, False), (8, 8, True)])
def test_keep_critique_table(n_correct, k, kept):
    assert flt.keep_critique(n_correct, k) is kept


def test_keep_critique_rejects_negative():
    with pytest.raises(ValueError):
        flt.keep_critique(1, -1)


def test_select_refinement_first_correct_only():
    assert flt.select_refinement(["a", "b", "c"], [False, True, True]) == "b"
    assert flt.select_refinement(["a", "b"], [False, False]) is None
    assert flt.select_refinement([], []) is None


def test_refinement_record_keep_path():
    row = bad("p1", gold="5")
    texts = ["2 + 3 = 6\nThe answer is 6.", "gibberish with no answer",
             "2 + 3 = 5\nThe answer is 5.", "Step 1: 2 + 3 = 5\nThe answer is 5."]
    rec = flt.refinement_record(row, texts, k=1)
    assert rec["id"] == row["id"]
    assert rec["answers"] == ["6", None, "5", "5"]
    assert rec["n_correct"] == 2 and rec["kept"] is True
    assert rec["refinement"] == texts[2]  # the first correct one, not the last
    assert flt.refinement_record(row, texts, k=3)["kept"] is False
    none = flt.refinement_record(row, texts[:2], k=1)
    assert none["n_correct"] == 0 and none["kept"] is False and none["refinement"] is None


def test_classify():
    assert flt.classify(good("p1")) == "passthrough"
    assert flt.classify(bad("p2")) == "flawed"
    lying = bad("p3")
    lying["critique"] = good("p3")["critique"].replace("2 + 3 = 5", "2 + 3 = 6")
    assert flt.classify(lying).startswith("unusable")
    broken = bad("p4")
    broken["critique"] = "I think it is fine."
    assert flt.classify(broken) == "unusable: malformed critique"


# -----------------------------------------------------------------------------
# SFT rows and statistics from hand-made rows

def hand_made():
    rows = [good("p1", "rg1", 1), good("p2", "rg1", 2),
            bad("p3", "rg1", 1), bad("p4", "rg2", 1), bad("p5", "rg2", 2), bad("p6", "rg3", 2),
            bad("p7", "rg3", None)]
    def rec(row, n_correct, refinement=None):
        return {"id": row["id"], "answers": [], "n_correct": n_correct,
                "kept": n_correct >= 1, "refinement": refinement, "config": {}}
    records = {r["id"]: r for r in [rec(rows[2], 0), rec(rows[3], 1, "The answer is 5."),
                                     rec(rows[4], 2, "2 + 3 = 5\nThe answer is 5."), rec(rows[5], 0)]}
    return rows, records  # p7 has no record yet (pending)


def test_build_sft_and_stats_numbers():
    rows, records = hand_made()
    critic, refine = flt.build_sft(rows, records, k=1)
    assert [r["id"] for r in critic] == ["p1-rg1-0", "p2-rg1-0", "p4-rg2-0", "p5-rg2-0"]
    assert [r["passthrough"] for r in critic] == [True, True, False, False]
    assert [r["id"] for r in refine] == ["p4-rg2-0", "p5-rg2-0"]
    assert refine[1]["messages"][-1]["content"] == "2 + 3 = 5\nThe answer is 5."
    s = flt.compute_stats(rows, records, 1, critic, refine,
                          paths_stats={"by_method": {"rg1": 10, "rg2": {"paths": 7}}},
                          ann_stats={"paths": 9, "kept": 7, "dropped": 2, "retries": 0,
                                     "dropped_reasons": {"malformed": 2},
                                     "by_method": {"rg1": {"paths": 4, "kept": 3, "dropped": 1},
                                                   "rg3": {"paths": 3, "kept": 2, "dropped": 1}}},
                          filter_label="N=4, k=1")
    assert s["paths_by_method"] == {"rg1": 10, "rg2": 7, "rg3": 3}
    m = s["by_method"]
    assert (m["rg1"]["passthrough"], m["rg1"]["flawed"], m["rg1"]["kept"]) == (2, 1, 0)
    assert m["rg1"]["kept_rate"] == 0.0
    assert (m["rg2"]["flawed"], m["rg2"]["kept"], m["rg2"]["kept_rate"]) == (2, 2, 1.0)
    assert (m["rg3"]["flawed"], m["rg3"]["judged"], m["rg3"]["kept"]) == (2, 1, 0)
    d = s["by_difficulty"]
    assert (d["1"]["flawed"], d["1"]["kept"], d["1"]["kept_rate"]) == (2, 1, 0.5)
    assert (d["2"]["flawed"], d["2"]["kept"], d["2"]["kept_rate"]) == (2, 1, 0.5)
    assert d["none"]["judged"] == 0 and d["none"]["kept_rate"] is None
    assert s["by_method_difficulty"]["rg2"]["1"]["kept_rate"] == 1.0
    assert s["critic_sft"] == {"rows": 4, "verdict_correct": 2, "verdict_wrong": 2, "share_wrong": 0.5}
    assert s["refine_sft"] == {"rows": 2}
    md = flt.stats_markdown(s)
    assert "| rg2 | 7 | 2 | - | 0 | 2 | 2 | 2 | 100.0 |" in md
    assert "| rg1 | 10 | 3 | 1 | 2 | 1 | 1 | 0 | 0.0 |" in md
    assert "| 1 | 2 | 2 | 1 | 50.0 |" in md
    assert "Correct 2 / Wrong 2" in md


def test_filter_off_keeps_every_valid_critique():
    rows, _ = hand_made()
    critic, refine = flt.build_sft(rows, {}, k=0)
    assert len(critic) == len(rows) and refine == []
    s = flt.compute_stats(rows, {}, 0, critic, refine)
    assert s["by_method"]["rg3"]["kept_rate"] == 1.0
    assert s["critic_sft"]["verdict_wrong"] == 5


def test_sft_rows_load_with_datasets(tmp_path):
    from datasets import load_dataset
    rows, records = hand_made()
    critic, refine = flt.build_sft(rows, records, k=1)
    common.write_jsonl_atomic(tmp_path / "critic.jsonl", critic)
    common.write_jsonl_atomic(tmp_path / "refine.jsonl", refine)
    ds = load_dataset("json", data_files=str(tmp_path / "critic.jsonl"), split="train",
                      cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 4
    by_id = {r["id"]: r for r in rows}
    for ex in ds:
        assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
        assert ex["messages"][-1]["content"] == by_id[ex["id"]]["critique"]
        assert "Step 1: " in ex["messages"][1]["content"]
    rds = load_dataset("json", data_files=str(tmp_path / "refine.jsonl"), split="train",
                       cache_dir=str(tmp_path / "cache"))
    assert [m["role"] for m in rds[0]["messages"]] == ["system", "user", "assistant"]
    assert "teacher's feedback" in rds[0]["messages"][1]["content"]


# -----------------------------------------------------------------------------
# End to end with a tiny random-weight Llama (conftest.tiny_model_path)

def write_inputs(tmp_path):
    rows = [good("p1", "rg1", 1), bad("p2", "rg2", 1, gold="738261"), bad("p3", "rg3", 3, gold="918273")]
    ann = tmp_path / "annotations.jsonl"
    common.write_jsonl_atomic(ann, rows)
    common.write_json_atomic(tmp_path / "annotations.stats.json",
                             {"paths": 4, "kept": 3, "dropped": 1, "retries": 0,
                              "dropped_reasons": {"malformed": 1},
                              "by_method": {"rg1": {"paths": 2, "kept": 1, "dropped": 1}}})
    return rows, ann


def run(ann, out, actor, *extra):
    return flt.main(flt.parse_args(["--annotations", str(ann), "--out-dir", str(out), "--actor", actor,
                                    "--backend", "hf", "--device", "cpu", "--max-new-tokens", "16",
                                    "--n", "2", *extra]))


def test_main_end_to_end_and_resume(tmp_path, tiny_model_path):
    rows, ann = write_inputs(tmp_path)
    out = tmp_path / "out"
    stats = run(ann, out, tiny_model_path)
    critic = common.read_jsonl(out / "critic_sft.jsonl")
    assert [r["id"] for r in critic] == ["p1-rg1-0"] and critic[0]["passthrough"] is True
    assert common.read_jsonl(out / "refine_sft.jsonl") == []
    progress = common.read_jsonl(out / "refinements.jsonl")
    assert sorted(r["id"] for r in progress) == ["p2-rg2-0", "p3-rg3-0"]
    assert all(len(r["answers"]) == 2 and r["n_correct"] == 0 and not r["kept"] for r in progress)
    assert stats["by_method"]["rg2"]["kept_rate"] == 0.0
    assert stats["annotation"]["dropped"] == 1
    for name in ("critic_sft.stats.json", "critic_sft.stats.md", "critic_sft.stats.png"):
        assert (out / name).stat().st_size > 0
    before = {n: (out / n).read_text() for n in ("critic_sft.jsonl", "refine_sft.jsonl", "critic_sft.stats.md")}

    # kill -9 while the second progress row was being written, then rerun
    data = (out / "refinements.jsonl").read_bytes()
    first_end = data.index(b"\n") + 1
    (out / "refinements.jsonl").write_bytes(data[:first_end + 10])
    run(ann, out, tiny_model_path)
    progress = common.read_jsonl(out / "refinements.jsonl")
    assert sorted(r["id"] for r in progress) == ["p2-rg2-0", "p3-rg3-0"]
    assert {n: (out / n).read_text() for n in before} == before

    # other settings on the same progress file are refused, not silently mixed
    with pytest.raises(common.UsageError, match="another setup"):
        run(ann, out, tiny_model_path, "--n", "3")


def test_main_filter_off_skips_the_actor(tmp_path):
    rows, ann = write_inputs(tmp_path)
    out = tmp_path / "out"
    stats = run(ann, out, str(tmp_path / "no-such-model"), "--k", "0")  # loading it would fail
    assert not (out / "refinements.jsonl").read_text()
    assert len(common.read_jsonl(out / "critic_sft.jsonl")) == 3
    assert stats["filter"].startswith("filter off")
    assert "filter off" in (out / "critic_sft.stats.md").read_text()


def test_main_reports_malformed_row(tmp_path):
    ann = tmp_path / "annotations.jsonl"
    ann.write_text(json.dumps(good("p1")) + "\n{not json\n")
    with pytest.raises(common.UsageError, match=r"annotations.jsonl:2: malformed JSON row"):
        run(ann, tmp_path / "out", "unused")
