"""JSONL I/O: errors name file:line, and a killed writer resumes with no lost or duplicated rows."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import common
from conftest import ROOT


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2}\n{"id": 3,\n')
    with pytest.raises(common.UsageError, match=r"rows.jsonl:4: malformed JSON row"):
        common.read_jsonl(path)
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(common.UsageError, match=r"rows.jsonl:2: expected a JSON object, got list"):
        common.read_jsonl(path)
    path.write_bytes(b'{"id": 1}\n{"id": "\xff"}\n')
    with pytest.raises(common.UsageError, match=r"rows.jsonl:2: not UTF-8 text"):
        common.read_jsonl(path)


def test_required_fields_missing_file_and_empty_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a", "question": "q"}\n{"id": "b"}\n')
    with pytest.raises(common.UsageError, match=r"rows.jsonl:2: missing field\(s\) question$"):
        common.read_jsonl(path, required=("id", "question"))
    assert [r["id"] for r in common.read_jsonl(path, required=("id",))] == ["a", "b"]
    with pytest.raises(common.UsageError, match=r"nowhere.jsonl: no such file$"):
        common.read_jsonl(tmp_path / "nowhere.jsonl")
    with pytest.raises(common.UsageError, match=r"is a folder"):
        common.read_jsonl(tmp_path)
    path.write_text("\n\n")
    assert common.read_jsonl(path) == []
    with pytest.raises(common.UsageError, match=r"rows.jsonl: no rows$"):
        common.read_jsonl(path, nonempty=True)


def test_writer_recovers_from_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with common.ResumableWriter(path) as w:
        for i in range(3):
            w.write({"id": f"r{i}", "v": i})
    with open(path, "a") as f:
        f.write('{"id": "r3", "v"')  # the process died in the middle of this write
    w = common.ResumableWriter(path)
    assert w.done == {"r0", "r1", "r2"} and "r3" not in w
    for i in range(5):
        w.write({"id": f"r{i}", "v": i})  # a rerun offers everything again
    w.close()
    rows = common.read_jsonl(path)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]


def test_writer_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(common.UsageError, match=r"out.jsonl:2: malformed JSON row"):
        common.ResumableWriter(path)


def test_kill_9_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """A real SIGKILL mid-run: the rerun completes the set exactly once."""
    path = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import common
        with common.ResumableWriter({str(path)!r}) as w:
            for i in range(200):
                if f"r{{i}}" in w:
                    continue
                w.write({{"id": f"r{{i}}", "payload": "x" * 5000}})
                time.sleep(0.005)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 100_000) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(path.read_text().splitlines())
    assert 0 < partial < 200
    subprocess.run([sys.executable, "-c", script], check=True)
    ids = [r["id"] for r in common.read_jsonl(path)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200))
    assert len(ids) == len(set(ids))


def test_atomic_writes_replace_whole_files(tmp_path):
    path = tmp_path / "a.jsonl"
    common.write_jsonl_atomic(path, [{"id": 1}])
    common.write_jsonl_atomic(path, [{"id": 2}, {"id": 3}])
    assert common.read_jsonl(path) == [{"id": 2}, {"id": 3}]
    common.write_json_atomic(tmp_path / "m.json", {"acc": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"acc": 0.5}
    assert not list(tmp_path.glob("*.tmp"))
