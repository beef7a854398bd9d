"""Every JSONL the kit writes loads with datasets.load_dataset("json", ...) into typed columns.

One tiny run of every stage (00-07, solve.py, convert.py) with the random-weight Llama of
conftest, then each output file is loaded. datasets gives a column whose rows disagree (an int
here, a string there; a list here, an object there) its catch-all Json type instead of failing,
so the test asks for a real Arrow type in every column, at every depth. A null beside values of
one type is fine (Arrow columns are nullable). A file with no rows has no columns to check
(datasets cannot build a table from it), so empty files are listed and skipped.
"""
from pathlib import Path

import pytest

import common
from conftest import load_stage

FIXTURES = Path(__file__).parent / "fixtures"


def stage_main(name: str, *argv) -> None:
    stage = load_stage(name)
    stage.main(stage.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_path):
    run = tmp_path_factory.mktemp("tiny-run")
    data, model = run / "data", tiny_model_path
    hf = ["--backend", "hf", "--device", "cpu"]
    train, test = data / "builtin_train.jsonl", data / "builtin_test.jsonl"
    stage_main("00_prepare_data", "--source", "builtin", "--out-dir", data, "--n-train", 8, "--n-test", 4)
    stage_main("01_generate_errors", "--problems", train, "--out", run / "paths.jsonl", "--actor", model,
               "--methods", "rg1,rg2,rg3,reference", "--limit", 2, "--rg1-samples", 2, "--rg2-samples", 1,
               "--rg3-samples", 1, "--max-new-tokens", 12, *hf)
    stage_main("02_annotate", "--paths", run / "paths.jsonl", "--out", run / "annotations.jsonl")
    stage_main("03_filter", "--annotations", run / "annotations.jsonl", "--out-dir", run, "--actor", model,
               "--n", 2, "--k", 1, "--max-new-tokens", 12, *hf)
    stage_main("04_train_critic", "--data", run / "critic_sft.jsonl", "--model", model, "--out-dir", run / "critic",
               "--val-fraction", 0.5, "--epochs", 1, "--eval-max-new-tokens", 8, *hf)
    stage_main("01_generate_errors", "--problems", test, "--out", run / "test_paths.jsonl", "--actor", model,
               "--methods", "rg3,reference", "--limit", 2, "--rg3-samples", 1, "--fewshot-pool", train,
               "--max-new-tokens", 12, *hf)
    stage_main("05_test_time", "--problems", test, "--actor", model, "--critic", run / "critic",
               "--out-dir", run / "test_time", "--limit", 2, "--k-values", "1", "--difficulty-samples", 2,
               "--processbench", run / "test_paths.jsonl", "--fewshot-pool", train,
               "--actor-max-new-tokens", 8, "--critic-max-new-tokens", 8, *hf)
    stage_main("solve", "--problems", test, "--limit", 2, "--actor", model, "--n", 2, "--temperature", 0.7,
               "--max-new-tokens", 8, "--fewshot-pool", train, "--out", run / "solve.jsonl", *hf)
    stage_main("06_self_improve", "--train-problems", train, "--test-problems", test, "--actor", model,
               "--critic", "rules", "--n", 1, "--iterations", 1, "--train-limit", 2, "--test-limit", 2,
               "--difficulty-samples", 1, "--actor-max-new-tokens", 8, "--batch-size", 4, "--max-length", 512,
               "--out-dir", run / "self_improve", *hf)
    stage_main("07_self_talk", "--annotations", run / "annotations.jsonl", "--problems", test,
               "--fewshot-pool", train, "--out-dir", run / "self_talk", "--actor", model, "--critic", "rules",
               "--max-new-tokens", 8, "--samples", 2, "--limit", 2, "--epochs", 1, "--batch-size", 2,
               "--max-rounds", 1, "--candidates", 1, "--max-paths", 0, *hf)
    stage_main("convert", "trl-export", "--data", run / "annotations.jsonl", "--out", run / "trl.jsonl")
    stage_main("convert", "trl-import", "--data", run / "trl.jsonl", "--out", run / "critic_sft_trl.jsonl",
               "--annotator", "rules")
    stage_main("convert", "authors-import", "--critiques", FIXTURES / "authors_critiques_tiny.json",
               "--refinements", FIXTURES / "authors_refinements_tiny.jsonl", "--out-dir", run / "authors")
    return run


def untyped(feature, where: str = "") -> list[str]:
    """Where in a datasets feature tree a column fell back to the Json type."""
    from datasets import Json, LargeList, List
    if isinstance(feature, Json):
        return [where or "<row>"]
    if isinstance(feature, dict):
        return [w for k, f in feature.items() for w in untyped(f, f"{where}.{k}" if where else k)]
    if isinstance(feature, (List, LargeList)):
        return untyped(feature.feature, f"{where}[]")
    return []


def test_every_jsonl_output_loads_with_typed_columns(tiny_run, tmp_path):
    from datasets import load_dataset
    files = sorted(p for p in tiny_run.rglob("*.jsonl"))
    checked, empty, problems = set(), [], []
    for path in files:
        name = str(path.relative_to(tiny_run))
        rows = common.read_jsonl(path)
        if not rows:
            empty.append(name)
            continue
        ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
        assert len(ds) == len(rows), name
        problems += [f"{name}: column {c} mixes types" for c in untyped(ds.features)]
        checked.add(name)
    assert not problems, "\n".join(problems)
    expected = {"data/builtin_train.jsonl", "data/builtin_test.jsonl", "paths.jsonl", "annotations.jsonl",
                "refinements.jsonl", "critic_sft.jsonl", "critic/eval_generations.jsonl", "test_paths.jsonl",
                "test_time/per_problem.jsonl", "test_time/generations/samples.jsonl",
                "test_time/generations/critiques.jsonl", "test_time/generations/refinements.jsonl",
                "solve.jsonl", "self_improve/iter0/train_samples.jsonl", "self_talk/chains.jsonl",
                "self_talk/per_problem.jsonl", "trl.jsonl", "critic_sft_trl.jsonl",
                "authors/critic_sft.jsonl", "authors/refine_sft.jsonl"}
    assert expected <= checked, (sorted(expected - checked), sorted(checked), empty)


def test_the_type_check_sees_mixed_columns(tmp_path):
    """The check above can fail: a column that is an int in one row and a string in the next,
    or a list beside an object, is reported."""
    from datasets import load_dataset
    path = tmp_path / "mixed.jsonl"
    common.write_jsonl_atomic(path, [{"a": 1, "b": [1], "c": {"k": [1]}, "d": None},
                                     {"a": "1", "b": {"x": 1}, "c": {"k": ["s"]}, "d": "s"}])
    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(untyped(ds.features)) == ["a", "b", "c.k[]"]  # "d" is a string column with a null
