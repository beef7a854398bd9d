"""Stage 5: metric functions against hand-computed values, the whole pipeline with a scripted
engine (known answers -> known metrics), and a tiny random Llama end to end with resume."""
import json
from pathlib import Path

import pytest

import common
from conftest import ChatServer, load_stage

tt = load_stage("05_test_time")
FIXTURE = Path(__file__).parent / "fixtures" / "earliest_error_format_tiny.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# -----------------------------------------------------------------------------
# Pure metric functions


def test_processbench_scores_hand_computed():
    labels = [2, 0, -1, -1, 1, -1]
    preds = [2, 1, -1, 0, 1, 3]
    m = tt.processbench_scores(preds, labels)
    assert (m["n"], m["n_erroneous"], m["n_correct"]) == (6, 3, 3)
    assert m["acc_erroneous"] == pytest.approx(2 / 3)  # steps 2 and 1 found, 0 missed
    assert m["acc_correct"] == pytest.approx(1 / 3)   # only one correct solution left alone
    assert m["f1"] == pytest.approx(4 / 9)            # 2ab/(a+b) = (4/9)/1
    assert tt.processbench_scores([-1], [-1])["f1"] is None  # no erroneous sample: undefined


def test_difficulty_bins_equal_width():
    rates = [1.0, 0.8, 0.79, 0.6, 0.5, 0.375, 0.2, 0.19, 0.0, 7 / 8]
    assert tt.difficulty_bins(rates) == [1, 1, 2, 2, 3, 4, 4, 5, 5, 1]
    assert tt.difficulty_bins([1.0, 0.5, 0.49, 0.0], n_bins=2) == [1, 1, 2, 2]
    assert tt.bin_range(1) == "[0.8, 1.0]" and tt.bin_range(5) == "[0.0, 0.2)"


def test_generation_budget():
    assert [tt.generation_budget("actor", k) for k in (1, 2, 4)] == [3, 6, 12]
    assert tt.generation_budget("parallel", 4) == 12
    assert [tt.generation_budget("sequential", k) for k in (1, 4, 32)] == [3, 9, 65]
    assert tt.generation_budget("sequential-last", 2) == 5
    with pytest.raises(ValueError):
        tt.generation_budget("beam", 2)


def test_discrimination_scores_wrong_is_positive():
    verdicts = [False, False, True, None, True, False]  # False = critic says Wrong
    truth = [False, True, True, False, False, False]    # False = answer really wrong
    m = tt.discrimination_scores(verdicts, truth)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 2)  # the None counts as a miss
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["unparseable"] == 1 and m["n_wrong_answers"] == 4
    assert tt.discrimination_scores([True], [True])["precision"] is None  # nothing flagged


def test_select_candidates_reuses_prefixes():
    samples, refined, rounds = list(range(12)), ["r0", "r1", "r2", "r3"], ["s1", "s2", "s3", "s4"]
    assert tt.select_candidates("actor", 2, samples, refined, rounds) == [0, 1, 2, 3, 4, 5]
    assert tt.select_candidates("actor", 4, samples, refined, rounds) == samples
    assert tt.select_candidates("parallel", 2, samples, refined, rounds) == ["r0", "r1"]
    assert tt.select_candidates("sequential", 3, samples, refined, rounds) == ["s1", "s2", "s3"]
    assert tt.select_candidates("sequential-last", 3, samples, refined, rounds) == ["s3"]


def test_vote():
    assert tt.vote([0, 1, 1, None], [True, False, False, False]) == (False, 0.5)
    assert tt.vote([0, 0, 1], [True, True, False]) == (True, pytest.approx(2 / 3))
    assert tt.vote([None, None], [False, False]) == (False, 0.0)


# -----------------------------------------------------------------------------
# Step-labelled inputs


def test_processbench_fixture_per_subset():
    rows, skipped = tt.load_step_labelled([str(FIXTURE)])
    assert skipped == 0 and len(rows) == 6
    assert [r["subset"] for r in rows] == ["toy_arith"] * 3 + ["toy_word"] * 2 + ["earliest_error_format_tiny"]
    assert [r["label"] for r in rows] == [-1, 1, 0, 2, -1, -1]
    preds = [-1, 1, 2, 2, 0, -1]
    m = tt.processbench_by_subset(rows, preds)
    assert m["subsets"]["toy_arith"]["acc_erroneous"] == pytest.approx(0.5)
    assert m["subsets"]["toy_arith"]["f1"] == pytest.approx(2 / 3)
    assert m["subsets"]["toy_word"]["f1"] == 0.0  # flags the correct solution
    assert m["subsets"]["earliest_error_format_tiny"]["f1"] is None
    assert m["average_f1"] == pytest.approx(1 / 3)


def test_paths_rows_as_step_labels(tmp_path):
    base = {"problem_id": "p", "question": "q?", "steps": ["a", "b", "c"]}
    rows = [dict(base, id="p-rg3-0", method="rg3", error_step=2, is_correct=False),
            dict(base, id="p-rg1-0", method="rg1", error_step=None, is_correct=True),
            dict(base, id="p-rg2-0", method="rg2", error_step=1, is_correct=False)]
    path = tmp_path / "paths.jsonl"
    common.write_jsonl_atomic(path, rows)
    got, skipped = tt.load_step_labelled([str(path)])
    assert skipped == 1  # the wrong rg2 path has no exact earliest error
    assert [(r["subset"], r["label"]) for r in got] == [("paths", 1), ("paths", -1)]
    path.write_text('{"id": "x", "problem": "q", "steps": ["a"]}\n')
    with pytest.raises(common.UsageError, match="paths.jsonl:1: needs 'label'"):
        tt.load_step_labelled([str(path)])


# -----------------------------------------------------------------------------
# The pipeline with a scripted engine: every metric below is computed by hand

GOLD = {"kites": "7", "melons": "12", "stamps": "30"}
SAMPLES = {"kites": ["7"] * 6, "melons": ["5", "12", "5", "5", "12", "9"], "stamps": ["1"] * 6}


def _problems(path: Path) -> str:
    qs = {"kites": "Nina has 3 kites and buys 4 more. How many kites?",
          "melons": "A crate has 6 melons; how many melons are in 2 crates?",
          "stamps": "Lena has 6 stamps and gets 4 times as many. How many stamps?"}
    rows = [{"id": f"t-{i}", "source": "builtin", "split": "test", "question": q,
             "reference_steps": [f"The answer is {GOLD[k]}."], "answer": GOLD[k], "difficulty": 1}
            for i, (k, q) in enumerate(qs.items())]
    common.write_jsonl_atomic(path, rows)
    return str(path)


class ScriptedEngine:
    """Actor: fixed samples; critic: Wrong on 5, no verdict on 1, else Correct;
    refinement: 7 <-> 8 for kites (so rounds alternate), the gold answer otherwise."""

    def __init__(self):
        self.calls = 0

    def plan(self, n_sequences, max_new_tokens):
        return "scripted"

    def generate(self, prompts, n=1, **kw):
        self.calls += 1
        return [self._one(p, n) for p in prompts]

    def _one(self, messages, n):
        user = messages[-1]["content"]
        topic = next(k for k in GOLD if k in user)
        if messages[0]["content"] == common.critic_messages("", [])[0]["content"]:
            solution = user.split("Student's solution:\n")[1]
            if "answer is 1." in solution:
                return ["I cannot tell."] * n
            steps = common.split_steps(solution)
            ok = "answer is 5." not in solution
            return [common.format_critique(steps, [ok] * len(steps), ["."] * len(steps), ok, "checked")] * n
        if "A previous attempt:" in user:
            if topic == "kites":
                return ["The answer is 8." if "answer is 7." in user.split("feedback")[0] else "The answer is 7."] * n
            return [f"The answer is {GOLD[topic]}."] * n
        return [f"The answer is {a}." for a in SAMPLES[topic][:n]]


def test_pipeline_metrics_by_hand(tmp_path, monkeypatch):
    engine = ScriptedEngine()
    monkeypatch.setattr(common, "get_engine", lambda *a, **k: engine)
    args = tt.parse_args(["--problems", _problems(tmp_path / "p.jsonl"), "--fewshot", "0",
                          "--out-dir", str(tmp_path / "out"), "--critic", "scripted", "--k-values", "1,2", "--difficulty-samples", "2"])
    m = tt.main(args)
    d = m["discrimination"]  # kites 2x Correct (right), melons 5 Wrong + 12 Correct, stamps 2x no verdict
    assert (d["tp"], d["fp"], d["tn"], d["fn"], d["unparseable"]) == (1, 0, 3, 2, 2)
    assert d["recall"] == pytest.approx(1 / 3) and d["f1"] == pytest.approx(0.5)
    o = m["critique_refine"]["overall"]
    assert (o["before"]["correct"], o["after"]["correct"], o["oracle"]["correct"]) == (1, 2, 3)
    assert (o["wrong_to_correct"], o["correct_to_wrong"]) == (2, 1)
    assert [b["n"] for b in m["critique_refine"]["by_difficulty"]] == [1, 0, 1, 0, 1]
    rows = {(r["method"], r["K"]): r for r in m["scaling"]["rows"]}
    assert rows["actor", 1]["correct"] == 1 and rows["actor", 2]["correct"] == 1  # melons votes 5
    assert rows["actor", 1]["pass_at_k"] == pytest.approx((1 + 0.8 + 0) / 3)  # 1 - C(4,3)/C(6,3)
    assert rows["actor", 1]["agreement"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert rows["parallel", 2]["correct"] == 2  # kites refined to 8 twice
    assert rows["sequential", 2]["correct"] == 2  # kites rounds [8, 7]: tie goes to 8
    assert rows["sequential-last", 2]["correct"] == 3
    assert rows["sequential", 2]["budget"] == 5 and rows["parallel", 2]["budget"] == 6
    assert m["critique_parse"] == {"critiques": 9, "malformed": 2, "no_final_verdict": 2}
    calls = engine.calls
    assert calls <= 1 + 2 * 2  # batched: one call per phase, never per problem
    tt.main(args)  # resume: everything comes from the cache
    assert engine.calls == calls
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| sequential-last | 2 | 5 | 1 | 100.0 [" in md


# -----------------------------------------------------------------------------
# A tiny random-weight Llama end to end


def _snapshot(gen_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(gen_dir.glob("*.jsonl"))}


def test_end_to_end_tiny_llama_and_resume(tmp_path, tiny_model_path, monkeypatch):
    out = tmp_path / "out"
    problems = _problems(tmp_path / "p.jsonl")  # also the few-shot pool: a problem never shows itself
    argv = ["--problems", problems, "--fewshot-pool", problems, "--actor", tiny_model_path, "--critic", tiny_model_path,
            "--backend", "hf", "--out-dir", str(out), "--k-values", "1,2", "--difficulty-samples", "2",
            "--actor-max-new-tokens", "8", "--critic-max-new-tokens", "8", "--processbench", str(FIXTURE)]
    m = tt.main(tt.parse_args(argv))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))  # the file holds what the run computed
    # 3 problems x 3 critiques (round 1 on 2 samples, round 2 on chain 0); 8 tokens of a random
    # model never reach a final verdict, so every critique is malformed and no answer is flagged
    assert saved["critique_parse"] == {"critiques": 9, "malformed": 9, "no_final_verdict": 9}
    assert saved["discrimination"]["unparseable_rate"] == 1.0
    assert saved["step_level"]["n"] == 6 and saved["step_level"]["malformed_critiques"] == 6
    assert saved["wall_s"] > 0
    assert "## Step-level discrimination" in (out / "metrics.md").read_text()
    assert saved["config"]["pool"] == 6 and saved["discrimination"]["n"] == 3 * 2
    assert [(r["method"], r["K"], r["budget"]) for r in saved["scaling"]["rows"]][:4] == \
        [("actor", 1, 3), ("parallel", 1, 3), ("sequential", 1, 3), ("sequential-last", 1, 3)]
    for png in ("by_difficulty.png", "scaling.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    gen = out / "generations"
    counts = {name: len(common.read_jsonl(gen / name)) for name in
              ("samples.jsonl", "critiques.jsonl", "refinements.jsonl")}
    assert counts == {"samples.jsonl": 3 * 6, "critiques.jsonl": 3 * 3, "refinements.jsonl": 3 * 3}
    before = _snapshot(gen)

    calls = []
    real = common.Engine.generate
    monkeypatch.setattr(common.Engine, "generate", lambda self, prompts, **kw: calls.append(len(prompts))
                        or real(self, prompts, **kw))
    m2 = tt.main(tt.parse_args(argv))  # full cache: no generation at all, identical files
    assert calls == [] and _snapshot(gen) == before
    assert m2["scaling"] == m["scaling"]

    # a run killed mid-phase: the last refinement row is lost (and half a row is torn)
    lines = (gen / "refinements.jsonl").read_text().splitlines(keepends=True)
    (gen / "refinements.jsonl").write_text("".join(lines[:-1]) + lines[-1][:10])
    tt.main(tt.parse_args(argv))
    assert calls == [1]  # only the missing refinement is generated again
    ids = [r["id"] for r in common.read_jsonl(gen / "refinements.jsonl")]
    assert len(ids) == len(set(ids)) == 9

    with pytest.raises(common.UsageError, match="another setup"):
        tt.main(tt.parse_args(argv + ["--temperature", "1.0"]))


def test_processbench_mode_tiny_llama(tmp_path, tiny_model_path):
    out = tmp_path / "pb"
    m = tt.main(tt.parse_args(["--processbench-only", "--processbench", str(FIXTURE), "--critic", tiny_model_path,
                               "--backend", "hf", "--out-dir", str(out), "--critic-max-new-tokens", "8"]))
    assert set(m["subsets"]) == {"toy_arith", "toy_word", "earliest_error_format_tiny"} and m["n"] == 6
    assert json.loads((out / "processbench.json").read_text())["subsets"]["toy_word"]["n"] == 2
    assert len(common.read_jsonl(out / "generations" / "processbench.jsonl")) == 6
    assert "| average | 6 |" in (out / "processbench.md").read_text()


# -----------------------------------------------------------------------------
# --backend openai: the actor (and an api: critic) served over HTTP on 127.0.0.1


def test_pipeline_over_a_served_model_matches_in_process(tmp_path, monkeypatch):
    """The scripted engine behind a real OpenAI-style server gives the metrics it gives in process."""
    scripted = ScriptedEngine()
    server = ChatServer(lambda body: (200, scripted._one(body["messages"], body["n"])), models=["scripted"])
    problems = _problems(tmp_path / "p.jsonl")
    common_argv = ["--problems", problems, "--fewshot", "0", "--k-values", "1,2", "--difficulty-samples", "2"]
    try:
        served = tt.main(tt.parse_args(common_argv + ["--out-dir", str(tmp_path / "served"), "--backend", "openai",
                                                      "--base-url", server.url, "--critic", "api:",
                                                      "--critic-url", server.url]))
    finally:
        server.close()
    monkeypatch.setattr(common, "get_engine", lambda *a, **k: ScriptedEngine())
    local = tt.main(tt.parse_args(common_argv + ["--out-dir", str(tmp_path / "local"), "--critic", "scripted"]))
    assert served["config"]["actor"] == "scripted" and served["config"]["critic"] == f"api:scripted@{server.url}"
    for key in ("discrimination", "critique_refine", "scaling", "critique_parse", "actor_no_answer_rate"):
        assert served[key] == local[key]
    assert {(p, b["model"]) for p, b in server.log} == {("/v1/chat/completions", "scripted")}


def _shape(obj):
    """Keys and list lengths: what two runs of one setup share whatever their numbers."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    return len(obj) if isinstance(obj, list) else "value"


def test_end_to_end_served_tiny_llama_has_the_local_shape(tmp_path, tiny_model_path):
    """A real model behind the server (the tiny Llama through HF generate, one request at a time):
    05 with --backend openai writes what 05 with --backend hf writes, file for file."""
    import threading
    model, lock = common.Engine(tiny_model_path, backend="hf", device="cpu"), threading.Lock()

    def serve(body):
        with lock:
            return 200, model.generate([body["messages"]], n=body["n"], temperature=body["temperature"],
                                       top_p=body["top_p"], max_new_tokens=body["max_tokens"], seed=body["seed"],
                                       stop=body.get("stop"))[0]

    server = ChatServer(serve, models={tiny_model_path: 2048})
    problems = _problems(tmp_path / "p.jsonl")
    argv = ["--problems", problems, "--fewshot-pool", problems, "--k-values", "1,2", "--difficulty-samples", "2",
            "--actor-max-new-tokens", "8", "--critic-max-new-tokens", "8", "--processbench", str(FIXTURE)]
    try:
        served = tt.main(tt.parse_args(argv + ["--out-dir", str(tmp_path / "served"), "--backend", "openai",
                                               "--base-url", server.url, "--concurrency", "2",
                                               "--critic", "api:", "--critic-url", server.url]))
    finally:
        server.close()
    local = tt.main(tt.parse_args(argv + ["--out-dir", str(tmp_path / "local"), "--actor", tiny_model_path,
                                          "--critic", tiny_model_path, "--backend", "hf"]))
    assert served["config"]["actor"] == tiny_model_path  # named by the server
    assert _shape(served) == _shape(local)
    for name in ("samples.jsonl", "critiques.jsonl", "refinements.jsonl", "processbench.jsonl"):
        s, l = (common.read_jsonl(tmp_path / run / "generations" / name) for run in ("served", "local"))
        assert [r["id"] for r in s] == [r["id"] for r in l] and all(isinstance(r["text"], str) for r in s)
    for name in ("metrics.md", "processbench.md", "by_difficulty.png", "scaling.png", "per_problem.jsonl",
                 "processbench_predictions.jsonl"):
        assert (tmp_path / "served" / name).stat().st_size > 0
