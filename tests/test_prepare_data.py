"""Tests for stage 0 (00_prepare_data.py): built-in generator, GSM8K/MATH conversion, CLI."""
import importlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
prep = importlib.import_module("00_prepare_data")

CALC = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
SCHEMA_KEYS = ["id", "source", "split", "question", "reference_steps", "answer", "difficulty"]


def recompute(a, op, b):
    a, b = int(a), int(b)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert a % b == 0, f"inexact division {a} / {b}"
    return a // b


@pytest.fixture(scope="module")
def problems():
    return prep.generate_builtin(500, seed=0)


@pytest.fixture(scope="module")
def splits():
    return prep.make_builtin_splits(300, 100, seed=0)


# ---------------------------------------------------------------------------
# Built-in generator
# ---------------------------------------------------------------------------
def test_deterministic_and_seed_dependent():
    assert prep.generate_builtin(50, seed=3) == prep.generate_builtin(50, seed=3)
    assert prep.generate_builtin(50, seed=3) != prep.generate_builtin(50, seed=4)
    assert prep.make_builtin_splits(40, 10, seed=1) == prep.make_builtin_splits(40, 10, seed=1)


def test_every_step_has_one_exact_computation(problems):
    for p in problems:
        *work, last = p["reference_steps"]
        assert len(work) == len(p["computations"]) >= 1
        for step, (a, op, b, r) in zip(work, p["computations"]):
            found = CALC.findall(step)
            assert len(found) == 1, step
            sa, sop, sb, sr = found[0]
            assert (int(sa), sop, int(sb), int(sr)) == (a, op, b, r), step
            assert recompute(sa, sop, sb) == int(sr), step
            assert not re.search(r"\d,\d", step), f"thousands separator in {step!r}"
        assert CALC.findall(last) == []
        assert last == f"The answer is {p['answer']}."
        assert p["answer"] == str(p["computations"][-1][3])
        assert re.fullmatch(r"\d+", p["answer"])


def test_difficulty_levels_balanced_and_tied_to_steps(problems):
    levels = Counter(p["difficulty"] for p in problems)
    assert set(levels) == {1, 2, 3, 4, 5}
    assert min(levels.values()) >= 80
    for p in problems:
        n = len(p["computations"])
        assert n == p["difficulty"] if p["difficulty"] < 5 else n in (5, 6)
    assert all(p["difficulty"] == 2 for p in prep.generate_builtin(30, seed=0, difficulty=2))


def test_wording_and_topic_variety():
    rows = prep.generate_builtin(200, seed=0)
    prefixes = {" ".join(r["question"].split()[:8]) for r in rows}
    assert len(prefixes) >= 40
    assert len({r["topic"] for r in rows}) >= 8
    assert len({r["question"].split(". ")[1] if ". " in r["question"] else "" for r in rows}) >= 40


def test_splits_disjoint_schema_and_ids(splits):
    train, test = splits
    assert (len(train), len(test)) == (300, 100)
    norm = prep.normalize_question
    assert not {norm(r["question"]) for r in train} & {norm(r["question"]) for r in test}
    assert len({norm(r["question"]) for r in train}) == len(train)
    for split, rows in (("train", train), ("test", test)):
        assert [r["id"] for r in rows[:2]] == [f"builtin-{split}-000000", f"builtin-{split}-000001"]
        for r in rows:
            assert list(r) == SCHEMA_KEYS and r["split"] == split and r["source"] == "builtin"
    assert len({r["id"] for r in train + test}) == 400


# ---------------------------------------------------------------------------
# GSM8K and MATH conversion from local files
# ---------------------------------------------------------------------------
def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GSM8K_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"},
    {"question": "A farm has 400 cows and buys 800 more. How many cows?",
     "answer": "The farm has 400 + 800 = <<400+800=1200>>1,200 cows.\n#### 1,200"},
]


def test_gsm8k_conversion(tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    args = prep.parse_args(["--source", "gsm8k", "--gsm8k-test", path, "--out-dir", str(tmp_path / "out")])
    paths = prep.main(args)
    assert set(paths) == {"test"}  # only the given split is written
    rows = [json.loads(line) for line in open(paths["test"])]
    assert rows[0]["reference_steps"] == ["Natalia sold 48/2 = 24 clips in May.",
                                          "Natalia sold 48+24 = 72 clips altogether.", "The answer is 72."]
    assert rows[0]["answer"] == "72" and rows[0]["difficulty"] is None
    assert rows[1]["answer"] == "1200" and rows[1]["reference_steps"][-1] == "The answer is 1200."
    assert [r["id"] for r in rows] == ["gsm8k-test-000000", "gsm8k-test-000001"]
    assert all(list(r) == SCHEMA_KEYS for r in rows)


MATH_ROW = {
    "problem": "What is $\\frac{2}{4}$ in lowest terms?",
    "solution": "We divide top and bottom by $2$.\n\n$$\n\\frac{2}{4} = \\frac{1}{2}\n$$\n"
                "So the answer is $\\boxed{\\frac{1}{2}}$.",
    "level": "Level 2",
}


def test_math_conversion_nested_boxed_and_missing_answer(tmp_path):
    assert common.last_boxed("x $\\boxed{1}$ then $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    path = write_lines(tmp_path / "math.jsonl", [MATH_ROW, dict(MATH_ROW, answer="1/2", level=5)])
    out = tmp_path / "out"
    paths = prep.main(prep.parse_args(["--source", "math", "--math-test", path, "--out-dir", str(out)]))
    first, second = [json.loads(line) for line in open(paths["test"])]
    assert first["answer"] == "\\frac{1}{2}" and first["difficulty"] == 2
    assert first["reference_steps"] == [
        "We divide top and bottom by $2$.", "$$ \\frac{2}{4} = \\frac{1}{2} $$",
        "So the answer is $\\boxed{\\frac{1}{2}}$.", "The answer is \\boxed{\\frac{1}{2}}."]
    assert second["answer"] == "1/2" and second["difficulty"] == 5
    assert first["id"] == "math-test-000000" and paths["test"].endswith("math_test.jsonl")
    aligned = "Then\n\\begin{align}\nx &= 1 \\\\\ny &= 2\n\\end{align}\nDone."
    assert prep.split_solution(aligned) == [
        "Then", "\\begin{align} x &= 1 \\\\ y &= 2 \\end{align}", "Done."]


@pytest.mark.parametrize("bad, message", [('{"question": "no answer"}', "missing field"),
                                          ("{not json", "malformed JSON")])
def test_malformed_row_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], "", bad])
    args = prep.parse_args(["--source", "gsm8k", "--gsm8k-train", path, "--out-dir", str(tmp_path)])
    with pytest.raises(common.UsageError, match=re.escape(f"{path}:3") + ".*" + message):
        prep.main(args)
    assert not list(tmp_path.glob("gsm8k_*.jsonl*"))


def test_limit_keeps_first_rows(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", GSM8K_ROWS)
    paths = prep.main(prep.parse_args(["--source", "gsm8k", "--gsm8k-train", path, "--limit-train", "1",
                                       "--out-dir", str(tmp_path)]))
    assert len(open(paths["train"]).readlines()) == 1


# ---------------------------------------------------------------------------
# Command line, end to end
# ---------------------------------------------------------------------------
def test_cli_builtin_end_to_end_and_rerun_identical(tmp_path, capsys):
    argv = ["--n-train", "60", "--n-test", "20", "--seed", "7", "--out-dir", str(tmp_path)]
    paths = prep.main(prep.parse_args(argv))
    assert paths == {"train": str(tmp_path / "builtin_train.jsonl"), "test": str(tmp_path / "builtin_test.jsonl")}
    first = {s: Path(p).read_bytes() for s, p in paths.items()}
    rows = [json.loads(line) for line in first["train"].decode().splitlines()]
    assert len(rows) == 60 and all(list(r) == SCHEMA_KEYS for r in rows)
    assert "builtin train: 60" in capsys.readouterr().out
    prep.main(prep.parse_args(argv))
    assert {s: Path(p).read_bytes() for s, p in paths.items()} == first
    assert sorted(x.name for x in tmp_path.iterdir()) == ["builtin_test.jsonl", "builtin_train.jsonl"]


# ---------------------------------------------------------------------------
# MATH solutions as steps a reader would count; train/test overlap
# ---------------------------------------------------------------------------
MATH_SPLITS = [
    ("Substituting $x = 4$ gives $3(4) + 7$. This is $12 + 7 = \\boxed{19}$.",
     ["Substituting $x = 4$ gives $3(4) + 7$.", "This is $12 + 7 = \\boxed{19}$."]),
    ("The figure is below.\n[asy]\ndraw((0,0)--(8,0)--(0,6)--cycle);\nlabel(\"$8$\",(4,0),S);\n[/asy]\n"
     "The hypotenuse is $10$.", ["The figure is below.", "The hypotenuse is $10$."]),
    ("Shown: [asy]dot((3,0), red);[/asy] The area is $6$.", ["Shown:", "The area is $6$."]),
    ("We factor. \\[x^2 - 5x + 6 = (x-2)(x-3).\\] So $x = 2$ or $x = 3$.",
     ["We factor.", "\\[x^2 - 5x + 6 = (x-2)(x-3).\\]", "So $x = 2$ or $x = 3$."]),
    ("We get $$a = 1,$$ and so $b = 2$. Done.", ["We get $$a = 1,$$", "and so $b = 2$.", "Done."]),
    ("Then $x = 3.$ Hence $y = 2$.", ["Then $x = 3.$", "Hence $y = 2$."]),
    ("It costs \\$2.50, e.g. for Mr. Smith. Then $3.5 \\cdot 2 = 7$. So 7 it is.",
     ["It costs \\$2.50, e.g. for Mr. Smith.", "Then $3.5 \\cdot 2 = 7$.", "So 7 it is."]),
    ("Since $f(x) = x. $ is odd, we stop", ["Since $f(x) = x. $ is odd, we stop"]),
    ("Line one.\nLine two has $a\nb$ math.", ["Line one.", "Line two has $a b$ math."]),
]


@pytest.mark.parametrize("solution,steps", MATH_SPLITS)
def test_math_solution_steps(solution, steps):
    assert prep.split_solution(solution) == steps


def test_math_steps_distribution_is_reported(tmp_path, capsys):
    rows = [dict(MATH_ROW, solution="One $a$. Two $b$. Three $c$. Answer $\\boxed{1}$."),
            dict(MATH_ROW, problem="Another?", solution="[asy]\ndraw((0,0)--(1,1));\n[/asy]\nIt is $\\boxed{2}$.")]
    path = write_lines(tmp_path / "m.jsonl", rows)
    paths = prep.main(prep.parse_args(["--source", "math", "--math-test", path, "--out-dir", str(tmp_path / "o")]))
    steps = [json.loads(line)["reference_steps"] for line in open(paths["test"])]
    assert [len(s) for s in steps] == [5, 2] and not any("draw" in x for s in steps for x in s)
    assert "steps per solution: median 4, 1-4; 1:1  4-6:1" in capsys.readouterr().out


def test_same_file_as_train_and_test_stops(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", GSM8K_ROWS)
    args = prep.parse_args(["--source", "gsm8k", "--gsm8k-train", path, "--gsm8k-test", path,
                            "--out-dir", str(tmp_path / "out")])
    with pytest.raises(common.UsageError, match=re.escape(path) + ": all 2 train problems also appear"):
        prep.main(args)
    assert not (tmp_path / "out").exists()


def test_partial_overlap_keeps_test_and_names_the_dropped_rows(tmp_path, capsys):
    train = write_lines(tmp_path / "train.jsonl", GSM8K_ROWS)
    test = write_lines(tmp_path / "test.jsonl", GSM8K_ROWS[1:])
    paths = prep.main(prep.parse_args(["--source", "gsm8k", "--gsm8k-train", train, "--gsm8k-test", test,
                                       "--out-dir", str(tmp_path / "out")]))
    assert len(open(paths["train"]).readlines()) == 1 and len(open(paths["test"]).readlines()) == 1
    assert "dropped 1 of 2 train problems that also appear in the test split" in capsys.readouterr().out
