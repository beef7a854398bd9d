"""05 --processbench: the benchmark's rows from JSON arrays (the release's files), JSONL, a folder
laid out like the hub dataset and the hub id itself (all through `datasets` or the file readers),
scored per split with the benchmark's F1 by a scripted critic behind a real local server; rows
too long for the critic's context counted, never cut or sent."""
import json
from pathlib import Path

import pytest

import common
from conftest import ChatServer, load_stage

tt = load_stage("05_test_time")
FIXTURES = Path(__file__).parent / "fixtures"
HUB_COPY = FIXTURES / "processbench_tiny"        # README configs + gsm8k.json, math.json (arrays)
JSONL = FIXTURES / "processbench_tiny_jsonl"     # the same rows, one object per line

# What the scripted critic answers per problem: the 0-based step it marks Wrong, -1 (all
# Correct) or None (a critique without verdicts). Scores by hand:
#   gsm8k: erroneous 1/2 (gsm8k-1 found, gsm8k-2 at the wrong step), correct 1/2 (gsm8k-3
#          flagged), F1 = 0.5
#   math:  erroneous 1/2 (math-1 gets no usable critique), correct 1/1, F1 = 2/3
#   average F1 = (1/2 + 2/3) / 2 = 7/12
VERDICTS = {"gsm8k-0": -1, "gsm8k-1": 1, "gsm8k-2": 1, "gsm8k-3": 0, "math-0": 2, "math-1": None, "math-2": -1}


def fixture_rows() -> dict:
    return {r["problem"]: r for split in ("gsm8k", "math") for r in json.loads((HUB_COPY / f"{split}.json").read_text())}


class JudgeServer(ChatServer):
    """A critic behind /v1/chat/completions that answers VERDICTS; a problem with TOO-LONG in
    it is refused with HTTP 400, as a server refuses a prompt over its context."""

    def __init__(self, models=None):
        self.rows = fixture_rows()
        super().__init__(self.reply, models)

    def reply(self, body):
        user = body["messages"][-1]["content"]
        if "TOO-LONG" in user:
            return 400, None
        row = next(r for q, r in self.rows.items() if q in user)
        wrong = VERDICTS[row["id"]]
        if wrong is None:
            return 200, "I am not sure about this one."
        ok = [wrong == -1 or i < wrong for i in range(len(row["steps"]))]
        return 200, common.format_critique(row["steps"], ok, ["checked"] * len(ok), wrong == -1, "checked")


@pytest.fixture
def judge():
    s = JudgeServer()
    yield s
    s.close()


def run(tmp_path, name, sources, critic_args):
    argv = ["--processbench-only", "--processbench", *map(str, sources), "--out-dir", str(tmp_path / name),
            "--critic-max-new-tokens", "16", *critic_args]
    return tt.main(tt.parse_args(argv))


def test_every_shape_reads_the_same_rows():
    arrays, _ = tt.load_step_labelled([str(HUB_COPY / "gsm8k.json"), str(HUB_COPY / "math.json")])
    lines, _ = tt.load_step_labelled([str(JSONL / "gsm8k.jsonl"), str(JSONL / "math.jsonl")])
    dataset, _ = tt.load_step_labelled([str(HUB_COPY)])  # datasets.load_dataset on the hub layout
    some, _ = tt.load_step_labelled([f"{HUB_COPY}:math"])
    assert arrays == lines and sorted(dataset, key=lambda r: r["id"]) == sorted(arrays, key=lambda r: r["id"])
    assert [r["subset"] for r in arrays] == ["gsm8k"] * 4 + ["math"] * 3  # the split names the subset
    assert arrays[1] == {"id": "gsm8k:gsm8k-1", "source_id": "gsm8k-1", "subset": "gsm8k",
                         "question": "A bus carries 30 people and 12 get off. How many stay on?",
                         "steps": ["The bus starts with 30 people.", "After 12 leave, 30 - 12 = 28 stay.",
                                   "The answer is 28."], "label": 1, "generator": "toy-writer"}
    assert some == [r for r in arrays if r["subset"] == "math"]


def test_hub_id_goes_through_datasets(monkeypatch):
    """`Qwen/ProcessBench` is read by datasets.load_dataset(id, split=...), the code path the
    hub copy above takes; here the hub answers from that local copy."""
    import datasets
    real, calls = datasets.load_dataset, []

    def hub(name, **kw):
        calls.append((name, kw))
        if name == "Qwen/ProcessBench":
            return real(str(HUB_COPY), **kw)
        if not Path(name).is_dir():
            raise ConnectionError("offline")
        return real(name, **kw)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    rows, _ = tt.load_step_labelled(["Qwen/ProcessBench:gsm8k,math"])
    assert calls == [("Qwen/ProcessBench", {"split": "gsm8k"}), ("Qwen/ProcessBench", {"split": "math"})]
    assert rows == tt.load_step_labelled([str(HUB_COPY)])[0] and len(calls) == 3
    assert len(tt.load_step_labelled(["Qwen/ProcessBench"])[0]) == 7  # every split
    with pytest.raises(common.UsageError, match="cannot load someone/else with datasets.*offline"):
        tt.load_step_labelled(["someone/else"])
    with pytest.raises(common.UsageError, match="no such file or folder"):
        tt.load_step_labelled(["missing.jsonl"])


def test_malformed_sources(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "problem": "q", "steps": ["s"], "label": 0}, ')
    with pytest.raises(common.UsageError, match=r"bad.json:1: malformed JSON"):
        tt.load_step_labelled([str(bad)])
    bad.write_text('[{"id": "a", "problem": "q", "steps": ["s"], "label": 0}, 3]')
    with pytest.raises(common.UsageError, match=r"bad.json\[1\]: expected a JSON object"):
        tt.load_step_labelled([str(bad)])
    twice = str(HUB_COPY / "gsm8k.json")
    with pytest.raises(common.UsageError, match="'gsm8k-0' appears twice in subset 'gsm8k'"):
        tt.load_step_labelled([twice, twice])


def test_step_prediction():
    def crit(ok, final):
        return common.parse_critique(common.format_critique(["a", "b"], ok, ["", ""], final, ""))
    assert tt.step_prediction(crit([True, False], False)) == 1
    assert tt.step_prediction(crit([True, True], True)) == -1
    assert tt.step_prediction(crit([True, True], False)) == -1  # every step judged Correct
    assert tt.step_prediction(common.parse_critique("Final verdict: Correct.")) == -1
    assert tt.step_prediction(common.parse_critique("Final verdict: Wrong.")) is None  # no step named
    assert tt.step_prediction(common.parse_critique("no idea")) is None


def test_scores_per_split_in_every_shape(tmp_path, judge):
    critic = ["--critic", "api:judge", "--critic-url", judge.url]
    m = run(tmp_path, "arrays", [HUB_COPY / "gsm8k.json", HUB_COPY / "math.json"], critic)
    g, h = m["subsets"]["gsm8k"], m["subsets"]["math"]
    assert (g["acc_erroneous"], g["acc_correct"], g["f1"]) == (0.5, 0.5, 0.5)
    assert (h["acc_erroneous"], h["acc_correct"]) == (0.5, 1.0) and h["f1"] == pytest.approx(2 / 3)
    assert m["average_f1"] == pytest.approx(7 / 12)
    assert m["status"] == {"judged": 6, "unusable": 1} and h["status"] == {"judged": 2, "unusable": 1}
    out = tmp_path / "arrays"
    preds = common.read_jsonl(out / "processbench_predictions.jsonl")
    assert [(p["id"], p["prediction"], p["match"]) for p in preds] == [
        ("gsm8k-0", -1, True), ("gsm8k-1", 1, True), ("gsm8k-2", 1, False), ("gsm8k-3", 0, False),
        ("math-0", 2, True), ("math-1", None, False), ("math-2", -1, True)]
    assert preds[3] == {"id": "gsm8k-3", "subset": "gsm8k", "generator": "other-writer", "label": -1,
                        "prediction": 0, "match": False, "status": "judged", "critique_well_formed": True,
                        "critic": f"api:judge@{judge.url}"}
    md = (out / "processbench.md").read_text()
    assert "| math | 3 | 50.0 (2) | 100.0 (1) | 66.7 | 0 | 0 | 1 |" in md
    assert "| average | 7 | | | 58.3 | 0 | 0 | 1 |" in md
    asked = len(judge.log)
    for name, sources in [("lines", [JSONL / "gsm8k.jsonl", JSONL / "math.jsonl"]), ("hub-copy", [HUB_COPY])]:
        other = run(tmp_path, name, sources, critic)
        assert {k: v for k, v in other.items() if k != "files"} == {k: v for k, v in m.items() if k != "files"}
    assert len(judge.log) == asked * 3
    run(tmp_path, "arrays", [HUB_COPY / "gsm8k.json", HUB_COPY / "math.json"], critic)
    assert len(judge.log) == asked * 3  # resumed from generations/processbench.jsonl


def long_rows(tmp_path) -> Path:
    """The gsm8k toy split plus one solution far longer than the tiny Llama's 2048 positions."""
    rows = json.loads((HUB_COPY / "gsm8k.json").read_text())
    rows.append({"id": "gsm8k-long", "generator": "toy-writer", "problem": "TOO-LONG: how many apples?",
                 "steps": [f"Then {i} + 1 = {i + 1} apples." for i in range(400)] + ["The answer is 400."],
                 "final_answer_correct": True, "label": -1})
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps(rows))
    return path


def test_too_long_for_a_local_critic_is_counted_not_sent(tmp_path, tiny_model_path, monkeypatch):
    path = long_rows(tmp_path)
    sent = []
    real = common.Engine.generate
    monkeypatch.setattr(common.Engine, "generate",
                        lambda self, prompts, **kw: sent.extend(prompts) or real(self, prompts, **kw))
    m = run(tmp_path, "local", [path], ["--critic", tiny_model_path, "--backend", "hf"])
    assert m["status"]["too_long"] == 1 and m["n"] == 5 and len(sent) == 4
    assert not any("TOO-LONG" in p[-1]["content"] for p in sent)
    cached = common.read_jsonl(tmp_path / "local" / "generations" / "processbench.jsonl")
    assert sorted(r["id"] for r in cached) == [f"gsm8k:gsm8k-{i}" for i in range(4)]
    pred = common.read_jsonl(tmp_path / "local" / "processbench_predictions.jsonl")[-1]
    assert (pred["id"], pred["status"], pred["prediction"], pred["match"]) == ("gsm8k-long", "too_long", None, False)
    assert "| gsm8k | 5 |" in (tmp_path / "local" / "processbench.md").read_text()


def test_too_long_for_a_served_critic(tmp_path, tiny_model_path):
    """A server that reports its window, for a model whose tokenizer is here: checked before
    sending. A server that does not: it refuses the prompt, and the row is counted as refused."""
    path = long_rows(tmp_path)
    told = JudgeServer(models={tiny_model_path: 1024})
    silent = JudgeServer()
    try:
        m = run(tmp_path, "told", [path], ["--critic", "api:", "--critic-url", told.url])
        assert m["critic"] == f"api:{tiny_model_path}@{told.url}"  # the name the server lists
        assert m["status"] == {"judged": 4, "too_long": 1} and len(told.log) == 4
        m = run(tmp_path, "silent", [path], ["--critic", "api:judge", "--critic-url", silent.url])
        assert m["status"] == {"judged": 4, "refused": 1} and len(silent.log) == 5
        assert m["subsets"]["gsm8k"]["acc_correct"] == pytest.approx(1 / 3)  # the refused row is a miss
    finally:
        told.close()
        silent.close()
