"""The command-line contract of every stage: a user's mistake ends with one `error:` line on
stderr naming the file (and line) and exit status 2, never a traceback; 0 means all for --limit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]

# stage -> (flags naming its input file (INPUT is replaced), a valid first row of that file)
PROBLEM = {"id": "p1", "source": "builtin", "split": "test", "question": "What is 2 + 3?",
           "reference_steps": ["2 + 3 = 5.", "The answer is 5."], "answer": "5", "difficulty": 1}
PATH_ROW = {"id": "p1-rg1-0", "problem_id": "p1", "question": "What is 2 + 3?",
            "steps": ["2 + 3 = 5.", "The answer is 5."], "gold_answer": "5", "method": "rg1",
            "is_correct": True, "difficulty": 1, "reference_steps": ["2 + 3 = 5.", "The answer is 5."],
            "answer": "5", "error_step": None}
ANNOTATION = dict(PATH_ROW, critique="Step 1: 2 + 3 = 5.\nVerdict: Correct.\n"
                                     "Step 2: The answer is 5.\nVerdict: Correct.\n"
                                     "Final verdict: Correct.")
CRITIC_ROW = {"id": "p1-rg1-0", "problem_id": "p1", "is_correct": True,
              "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
STAGES = {
    "00_prepare_data.py": (["--source", "gsm8k", "--gsm8k-train", "INPUT"],
                           {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}),
    "01_generate_errors.py": (["--problems", "INPUT"], PROBLEM),
    "02_annotate.py": (["--paths", "INPUT"], PATH_ROW),
    "03_filter.py": (["--annotations", "INPUT"], ANNOTATION),
    "04_train_critic.py": (["--data", "INPUT"], CRITIC_ROW),
    "05_test_time.py": (["--problems", "INPUT"], PROBLEM),
    "solve.py": (["--problems", "INPUT"], PROBLEM),
}
# Where each stage writes: inside tmp_path, so a failed check never touches the repository.
OUTPUTS = {"00_prepare_data.py": ["--out-dir", "OUT"], "01_generate_errors.py": ["--out", "OUT/p.jsonl"],
           "02_annotate.py": ["--out", "OUT/a.jsonl"], "03_filter.py": ["--out-dir", "OUT"],
           "04_train_critic.py": ["--out-dir", "OUT/critic"], "05_test_time.py": ["--out-dir", "OUT"],
           "solve.py": ["--out", "OUT/s.jsonl"]}


def run_stage(stage: str, flags: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    out = [f.replace("OUT", str(tmp_path / "out")) for f in OUTPUTS[stage]]
    return subprocess.run([sys.executable, str(ROOT / stage), *flags, *out], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def assert_usage_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, stderr is exactly one `error:` line holding every expected piece, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_missing_input_file(stage, tmp_path):
    flags, _ = STAGES[stage]
    missing = str(tmp_path / "nowhere.jsonl")
    result = run_stage(stage, [f.replace("INPUT", missing) for f in flags], tmp_path)
    assert_usage_error(result, f"{missing}: no such file")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_malformed_row_names_file_and_line(stage, tmp_path):
    flags, row = STAGES[stage]
    path = tmp_path / "input.jsonl"
    path.write_text(json.dumps(row) + "\n\n{not json\n", encoding="utf-8")
    result = run_stage(stage, [f.replace("INPUT", str(path)) for f in flags], tmp_path)
    assert_usage_error(result, f"{path}:3: malformed JSON row")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jsonl")) \
        or stage == "02_annotate.py"  # 02 opens its resumable outputs after reading the input


@pytest.mark.parametrize("stage", ["01_generate_errors.py", "03_filter.py", "solve.py"])
def test_empty_input_and_missing_field(stage, tmp_path):
    flags, row = STAGES[stage]
    path = tmp_path / "input.jsonl"
    path.write_text("\n", encoding="utf-8")
    result = run_stage(stage, [f.replace("INPUT", str(path)) for f in flags], tmp_path)
    assert_usage_error(result, f"{path}: no rows")
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "question"}) + "\n")
    result = run_stage(stage, [f.replace("INPUT", str(path)) for f in flags], tmp_path)
    assert_usage_error(result, f"{path}:1: missing field(s) question")


def test_bad_flag_values_exit_2_without_traceback(tmp_path):
    for stage, flags in [("solve.py", ["--limit", "-1"]), ("05_test_time.py", ["--k-values", "1,x"]),
                         ("03_filter.py", ["--chunk-size", "0"])]:
        result = run_stage(stage, flags, tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "error: argument " + flags[0] in result.stderr
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(PROBLEM) + "\n")
    result = run_stage("01_generate_errors.py", ["--problems", str(problems), "--methods", "rg1,rg9"], tmp_path)
    assert_usage_error(result, "--methods", "rg9")


# -----------------------------------------------------------------------------
# run_cli and the shared flag types, in process

def test_run_cli_exit_codes_and_engines_closed(capsys, tiny_model_path):
    def fails(args):
        common.get_engine(tiny_model_path, "hf", "cpu")
        raise common.UsageError(f"x.jsonl:4: malformed JSON row ({args})")

    with pytest.raises(SystemExit) as e:
        common.run_cli(fails, lambda argv: "Expecting value", [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: x.jsonl:4: malformed JSON row (Expecting value)\n"
    assert common._ENGINES == {}  # closed on the way out

    def interrupted(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        common.run_cli(interrupted, lambda argv: None, [])
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err
    seen = []
    assert common.run_cli(seen.append, lambda argv: argv, ["ok"]) is None and seen == [["ok"]]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        common.run_cli(lambda args: 1 / 0, lambda argv: None, [])


def test_flag_types_and_take():
    import argparse
    assert common.count("0") == 0 and common.positive("3") == 3
    assert common.int_list("1, 2,4") == [1, 2, 4]
    for parse, text in [(common.count, "-1"), (common.positive, "0"), (common.count, "two"),
                        (common.int_list, "1,x"), (common.int_list, "0"), (common.int_list, "")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert common.take([1, 2, 3], 0) == [1, 2, 3] and common.take([1, 2, 3], None) == [1, 2, 3]
    assert common.take([1, 2, 3], 2) == [1, 2]


def test_stable_seed_is_fixed_and_spreads():
    import hashlib
    assert common.stable_seed("a", 1) == int(hashlib.sha256(b"a:1").hexdigest()[:8], 16) == 724320422
    assert common.stable_seed("a", 1) != common.stable_seed("a", 2)
    assert common.stable_seed("a:1") == common.stable_seed("a", 1)  # parts are joined with ':'
