"""convert.py: TRL stepwise supervision out and back in (labels survive the round trip, hub
loading fed a local dataset folder, 02's annotators explain the verdicts), the authors'
critique and refinement files, and a critic trained by 04 from an imported TRL file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import common
from conftest import ChatServer, load_stage

convert = load_stage("convert")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

APPLES = "Ann has 3 bags of 5 apples and buys 4 more apples. How many apples does she have?"
PENS = "Tom buys 6 boxes of 2 pens and gives away 3 pens. How many pens are left?"
PATHS = [
    {"id": "p1-reference-0", "problem_id": "p1", "question": APPLES, "gold_answer": "19", "method": "reference",
     "steps": ["3 * 5 = 15 apples are in the bags.", "15 + 4 = 19 apples.", "The answer is 19."], "answer": "19",
     "is_correct": True, "error_step": None},
    {"id": "p1-rg3-0", "problem_id": "p1", "question": APPLES, "gold_answer": "19", "method": "rg3",
     "steps": ["3 * 5 = 16 apples are in the bags.", "16 + 4 = 20 apples.", "The answer is 20."], "answer": "20",
     "is_correct": False, "error_step": 1, "error_type": "calculation error"},
    {"id": "p2-reference-0", "problem_id": "p2", "question": PENS, "gold_answer": "9", "method": "reference",
     "steps": ["6 * 2 = 12 pens.", "12 - 3 = 9 pens are left.", "The answer is 9."], "answer": "9",
     "is_correct": True, "error_step": None},
    {"id": "p2-rg3-0", "problem_id": "p2", "question": PENS, "gold_answer": "9", "method": "rg3",
     "steps": ["6 * 2 = 12 pens.", "12 - 3 = 8 pens are left.", "The answer is 8."], "answer": "8",
     "is_correct": False, "error_step": 2, "error_type": "calculation error"},
]


def annotations(tmp_path) -> Path:
    """02's real output (rules annotator) over the paths above."""
    refs = {"p1": PATHS[0]["steps"], "p2": PATHS[2]["steps"]}
    paths = tmp_path / "paths.jsonl"
    common.write_jsonl_atomic(paths, [dict(p, reference_steps=refs[p["problem_id"]], difficulty=1) for p in PATHS])
    out = tmp_path / "annotations.jsonl"
    load_stage("02_annotate").main(load_stage("02_annotate").parse_args(["--paths", str(paths), "--out", str(out)]))
    assert len(common.read_jsonl(out)) == len(PATHS)
    return out


def run(*argv):
    return convert.main(convert.parse_args([str(a) for a in argv]))


def verdicts(critic_row: dict) -> list[bool]:
    c = common.parse_critique(critic_row["messages"][-1]["content"])
    assert c.ok, c.problems
    return [s.correct for s in c.steps]


# -----------------------------------------------------------------------------
# TRL stepwise supervision: out, back in, and out again


def test_trl_round_trip_keeps_every_step_label(tmp_path):
    ann = annotations(tmp_path)
    truth = {r["id"]: [s.correct for s in common.parse_critique(r["critique"]).steps] for r in common.read_jsonl(ann)}
    assert truth["p1-rg3-0"] == [False, False, False] and truth["p2-rg3-0"] == [True, False, False]
    assert truth["p1-reference-0"] == [True] * 3

    trl = tmp_path / "trl.jsonl"
    assert run("trl-export", "--data", ann, "--out", trl) == {"rows": 4, "skipped": {}}
    exported = common.read_jsonl(trl)
    for row, path in zip(exported, PATHS):
        assert set(row) == {"prompt", "completions", "labels", "id", "gold_answer"}
        assert (row["id"], row["prompt"], row["completions"]) == (path["id"], path["question"], path["steps"])
        assert row["labels"] == truth[row["id"]] and all(type(v) is bool for v in row["labels"])

    imported = tmp_path / "critic_sft_trl.jsonl"
    assert run("trl-import", "--data", trl, "--out", imported)["rows"] == 4
    rows = common.read_jsonl(imported)
    for row, path in zip(rows, exported):
        assert verdicts(row) == path["labels"]
        assert convert.critic_prompt_question(row["messages"]) == path["prompt"]
        assert row["is_correct"] is all(path["labels"]) and row["method"] == "trl"
        assert (row["source"], row["source_id"], row["annotator"]) == (str(trl), path["id"], "none")
        assert row["annotated_steps"] == 0 and row["difficulty"] is None
    assert rows[0]["problem_id"] == rows[1]["problem_id"] != rows[2]["problem_id"]  # held out together
    assert rows[1]["source_row"] == 1
    neutral = rows[3]["messages"][-1]["content"]
    assert "Step 2: 12 - 3 = 8 pens are left.\nVerdict: Wrong.\n" in neutral  # no Check line to invent
    assert neutral.endswith("Final verdict: Wrong. The solution goes wrong at step 2.")

    # 03-shaped rows export again to the same labels: the kit's critic data round-trips too
    again = tmp_path / "again.jsonl"
    run("trl-export", "--data", imported, "--out", again)
    assert [(r["prompt"], r["completions"], r["labels"]) for r in common.read_jsonl(again)] == \
        [(r["prompt"], r["completions"], r["labels"]) for r in exported]


def test_trl_import_with_the_rules_annotator_explains_but_keeps_the_labels(tmp_path):
    trl = tmp_path / "trl.jsonl"
    run("trl-export", "--data", annotations(tmp_path), "--out", trl)
    out = tmp_path / "rules.jsonl"
    result = run("trl-import", "--data", trl, "--out", out, "--annotator", "rules")
    rows = common.read_jsonl(out)
    assert [verdicts(r) for r in rows] == [r["labels"] for r in common.read_jsonl(trl)]
    assert result["annotated_steps"] == result["steps"] == 12  # rules agrees with its own labels
    assert "3 * 5 is 15, not 16." in rows[1]["messages"][-1]["content"]
    assert {r["annotator"] for r in rows} == {"rules"}


def test_trl_labels_override_a_disagreeing_annotator():
    steps, labels = ["a = 1", "b = 2", "c = 3"], [True, False, False]
    text = common.format_critique(steps, [True, False, True], ["fine", "b is 3", "ok"], False, "off")
    critique, explained = convert.labelled_critique(steps, labels, text)
    c = common.parse_critique(critique)
    assert [s.correct for s in c.steps] == labels and explained == 2
    assert [s.explanation for s in c.steps] == ["fine", "b is 3", ""]  # a label alone: no Check line
    assert c.final_explanation == "off"
    assert convert.labelled_critique(steps, labels, "no critique here")[1] == 0


def test_trl_import_from_a_dataset_folder_uses_the_hub_code_path(tmp_path, monkeypatch):
    """The hub branch of common.load_records is datasets.load_dataset(spec, config, split=...);
    a folder laid out like a hub repo (data/train-*.parquet) goes through exactly that call."""
    from datasets import Dataset
    rows = [{"prompt": PENS, "completions": PATHS[3]["steps"], "labels": [True, False, False], "index": 7},
            {"prompt": APPLES, "completions": ["3 * 5 = 15", "15\n+ 4 = 19", "The answer is 19."],
             "labels": [True, True, True], "index": 8}]
    folder = tmp_path / "math_steps"
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    calls = []
    import datasets
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    out = tmp_path / "from_folder.jsonl"
    assert run("trl-import", "--data", folder, "--split", "train", "--out", out)["rows"] == 2
    assert calls == [((str(folder), None), {"split": "train"})]
    got = common.read_jsonl(out)
    assert [verdicts(r) for r in got] == [r["labels"] for r in rows]
    assert got[0]["source"] == f"{folder}:train" and got[1]["source_row"] == 1
    assert "Step 2: 15 + 4 = 19" in got[1]["messages"][1]["content"]  # one step per line
    with pytest.raises(common.UsageError, match="unknown split|Unknown split|not a local file"):
        run("trl-import", "--data", folder, "--split", "validation", "--out", tmp_path / "x.jsonl")


def test_trl_import_resumes_and_refuses_other_settings(tmp_path):
    trl = tmp_path / "trl.jsonl"
    run("trl-export", "--data", annotations(tmp_path), "--out", trl)
    out = tmp_path / "c.jsonl"
    run("trl-import", "--data", trl, "--out", out, "--limit", "2")
    assert len(common.read_jsonl(out)) == 2
    run("trl-import", "--data", trl, "--out", out)  # the other two are added, none twice
    assert [r["id"] for r in common.read_jsonl(out)] == [f"trl-{i}" for i in range(4)]
    with pytest.raises(common.UsageError, match="another setup"):
        run("trl-import", "--data", trl, "--out", out, "--annotator", "rules")


def test_trl_import_with_an_api_annotator(tmp_path):
    """02's API annotator against a real local server; its critique is validated by 02, then
    the labels decide every verdict."""
    steps = ["6 * 2 = 12 pens.", "12 - 3 = 8 pens are left.", "The answer is 8."]
    trl = tmp_path / "trl.jsonl"
    common.write_jsonl_atomic(trl, [{"prompt": PENS, "completions": steps, "labels": [True, False, False]}])
    reply = common.format_critique(steps, [True, False, False], ["6 * 2 is 12.", "12 - 3 is 9, not 8.",
                                                                 "It keeps the wrong count."], False, "9 pens.")
    server = ChatServer(lambda body: (200, reply))
    try:
        out = tmp_path / "api.jsonl"
        result = run("trl-import", "--data", trl, "--out", out, "--annotator", "api", "--annotator-model", "m",
                     "--annotator-url", server.url, "--annotator-flags", "--requests-per-minute 0")
    finally:
        server.close()
    row = common.read_jsonl(out)[0]
    assert result["annotated_steps"] == 3 and row["annotator"] == "api:m"
    assert row["messages"][-1]["content"] == reply


def test_trl_import_with_the_model_annotator(tmp_path, tiny_model_path):
    """02's batched model annotator with 02's own flags; a random model's critiques fail 02's
    validation, so every explanation is the neutral one and every verdict still the label."""
    trl = tmp_path / "trl.jsonl"
    common.write_jsonl_atomic(trl, [{"prompt": PENS, "completions": PATHS[3]["steps"], "labels": [True, False, False]}])
    out = tmp_path / "model.jsonl"
    result = run("trl-import", "--data", trl, "--out", out, "--annotator", "model", "--annotator-model",
                 tiny_model_path, "--backend", "hf", "--device", "cpu",
                 "--annotator-flags", "--max-new-tokens 8 --annotation-retries 0")
    row = common.read_jsonl(out)[0]
    assert result["annotated_steps"] == 0 and row["annotator"] == f"model:{tiny_model_path}"
    assert verdicts(row) == [True, False, False]
    with pytest.raises(common.UsageError, match="--annotator api needs --annotator-model"):
        run("trl-import", "--data", trl, "--out", tmp_path / "api.jsonl", "--annotator", "api")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, "trl.jsonl:1: 2 completions but 1 labels"),
    ({"prompt": "q", "completions": ["a"], "labels": ["yes"]}, "trl.jsonl:1: 'labels' must be a list of booleans"),
    ({"prompt": ["q"], "completions": ["a"], "labels": [True]}, "trl.jsonl:1: 'prompt' must be a string"),
    ({"question": "q", "steps": ["a"]}, "trl.jsonl:1: 'prompt' must be a string"),
])
def test_trl_rows_of_another_shape_are_user_errors(tmp_path, row, message):
    common.write_jsonl_atomic(tmp_path / "trl.jsonl", [row])
    with pytest.raises(common.UsageError, match=message):
        run("trl-import", "--data", tmp_path / "trl.jsonl", "--out", tmp_path / "o.jsonl")


def test_command_line_errors_are_one_line(tmp_path):
    common.write_jsonl_atomic(tmp_path / "other.jsonl", [{"problem": "q", "steps": ["a"], "label": -1}])
    for argv, piece in [(["trl-import", "--data", "nowhere.jsonl"], "nowhere.jsonl: no such file"),
                        (["trl-export", "--data", "other.jsonl"], "other.jsonl:1: neither an annotated path"),
                        (["authors-import"], "give --critiques and/or --refinements")]:
        r = subprocess.run([sys.executable, str(ROOT / "convert.py"), *argv], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and piece in lines[0], r.stderr
        assert "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# The authors' critique and refinement files


def test_authors_files_become_the_kits_critic_and_refinement_data(tmp_path):
    out = tmp_path / "authors"
    result = run("authors-import", "--critiques", FIXTURES / "authors_critiques_tiny.json",
                 "--refinements", FIXTURES / "authors_refinements_tiny.jsonl", "--out-dir", out)
    assert result["critic"] == {"rows": 3, "skipped": {"critique does not parse": 1}}
    assert result["refine"] == {"rows": 2, "skipped": {}}
    critic = common.read_jsonl(out / "critic_sft.jsonl")
    assert [verdicts(r) for r in critic] == [[True, False, False], [True, True], [True, True]]
    assert [r["is_correct"] for r in critic] == [False, True, True]
    first = critic[0]
    assert convert.critic_prompt_question(first["messages"]).startswith("A baker fills 6 trays")
    assert "Step sentence" not in first["messages"][1]["content"]  # the authors' template is not the question
    assert first["messages"][-1]["content"].splitlines()[4:6] == ["Check: 48 - 20 is 28, not 26.", "Verdict: Wrong."]
    assert (first["method"], first["source_row"]) == ("authors", 0)
    assert convert.critic_prompt_question(critic[2]["messages"]).startswith("A jar holds")  # field-named row

    refine = common.read_jsonl(out / "refine_sft.jsonl")
    assert refine[0]["problem_id"] == first["problem_id"]  # same question, same problem
    user, answer = refine[0]["messages"][-2]["content"], refine[0]["messages"][-1]["content"]
    assert "Step 2: 48 - 20 = 26 rolls are left." in user and "Check: 48 - 20 is 28" in user
    assert "Here is a step-by-step critique" not in user.split("A previous attempt:")[0]
    assert answer == "6 * 8 = 48 rolls are baked.\n48 - 20 = 28 rolls are left.\nThe answer is 28."
    assert refine[1]["messages"][-1]["content"].endswith("\\boxed{30}$.")
    assert "\\boxed{ANSWER}" in refine[1]["messages"][0]["content"]  # a boxed answer: the boxed prompt


def test_authors_refinement_rows_need_a_critique(tmp_path):
    bad = tmp_path / "refine.json"
    bad.write_text(json.dumps([{"instruction": "Question:\nWhat is 1 + 1?\n\nSolution:\n1 + 1 = 2.",
                                "input": "", "output": "The answer is 2."}]))
    with pytest.raises(common.UsageError, match=r"refine.json\[0\]: a refinement row needs the critique"):
        run("authors-import", "--refinements", bad, "--out-dir", tmp_path / "o")
    bad.write_text("[{\"instruction\": 1}")
    with pytest.raises(common.UsageError, match="refine.json:1: malformed JSON"):
        run("authors-import", "--refinements", bad, "--out-dir", tmp_path / "o")


# -----------------------------------------------------------------------------
# 04 trains a critic from an imported TRL file (tiny random Llama, CPU)


def test_stage04_trains_on_an_imported_trl_file(tmp_path, tiny_model_path):
    trl = tmp_path / "trl.jsonl"
    run("trl-export", "--data", annotations(tmp_path), "--out", trl)
    data = tmp_path / "critic_sft_trl.jsonl"
    run("trl-import", "--data", trl, "--out", data)
    stage = load_stage("04_train_critic")
    out = tmp_path / "critic"
    stage.main(stage.parse_args(["--data", str(data), "--model", tiny_model_path, "--out-dir", str(out),
                                 "--val-fraction", "0.5", "--epochs", "1", "--batch-size", "2",
                                 "--eval-max-new-tokens", "8", "--backend", "hf", "--device", "cpu"]))
    done = json.loads((out / common.SFT_DONE).read_text())
    assert done["train_examples"] == 2 and done["global_step"] == 1
    result = json.loads((out / "eval.json").read_text())
    assert result["n_eval"] == 2 and result["by_source"]["trl"]["n"] == 2
