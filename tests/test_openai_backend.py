"""The `openai` generation backend against real HTTP servers on 127.0.0.1: Engine.generate's call
and result shape, the model named by the server, retries, bounded concurrency, refused prompts,
context checks, and one `error:` line with exit status 2 when the server is down."""
import argparse
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import common
from conftest import ROOT, ChatServer

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def echo(body):
    """One text per asked-for choice, naming the request's seed and the choice."""
    return 200, [f"answer {body['seed']}.{k} STOP tail" for k in range(body["n"])]


@pytest.fixture
def server():
    s = ChatServer(echo, models=["served-model"])
    yield s
    s.close()


def dead_url() -> str:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as s:
        port = s.server_address[1]  # nobody listens there once it is closed
    return f"http://127.0.0.1:{port}/v1"


def test_served_engine_has_the_local_backends_shape(server):
    engine = common.Engine(None, "openai", base_url=server.url)
    assert engine.model_name == "served-model" and engine.backend_name == "openai"  # named by the server
    out = engine.generate([CHAT, CHAT, "raw text"], n=3, temperature=1.0, stop=["STOP"], seed=5)
    assert out == [[f"answer {5 + i}.{k} " for k in range(3)] for i in range(3)]  # a seed per prompt, cut at stop
    paths = [p for p, _ in server.log]
    assert paths.count("/v1/chat/completions") == 2 and paths.count("/v1/completions") == 1
    raw = next(b for p, b in server.log if p == "/v1/completions")
    assert raw["prompt"] == "raw text" and raw["n"] == 3 and raw["model"] == "served-model"

    server.log.clear()
    greedy = engine.generate([CHAT], n=4, temperature=0)
    assert greedy == [["answer 0.0 STOP tail"] * 4] and server.log[0][1]["n"] == 1  # asked once, copied

    server.log.clear()
    engine.generate([CHAT], n=1, prefixes=["Step 1: 2 + 3 = 5.\n"])
    body = server.log[0][1]  # the prefix is continued inside the assistant's turn
    assert body["messages"][-1] == {"role": "assistant", "content": "Step 1: 2 + 3 = 5.\n"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert engine.generate([], n=2) == []


def test_engine_from_args_and_get_engine_share_a_served_engine(server):
    args = argparse.Namespace(backend="openai", device=None, base_url=server.url, api_key="k",
                              concurrency=2, max_retries=0)
    engine = common.engine_from_args(args, None)
    try:
        assert common.engine_from_args(args, "served-model") is engine  # found under the served name
        assert common.local_backend(args) == "auto"
        args.actor = None
        assert common.resolve_actor(args) == "served-model"
        assert engine._backend.client.api_key == "k"
    finally:
        engine.close()
    assert engine not in common._ENGINES.values()


def test_model_name_checks():
    two = ChatServer(echo, models=["a", "b"])
    unlisted = ChatServer(echo)  # answers 404 on /v1/models
    try:
        with pytest.raises(common.UsageError, match=r"lists \['a', 'b'\]: name the model"):
            common.Engine(None, "openai", base_url=two.url)
        with pytest.raises(common.UsageError, match=r"serves \['a', 'b'\], not 'c'"):
            common.Engine("c", "openai", base_url=two.url)
        assert common.Engine("b", "openai", base_url=two.url).model_name == "b"
        assert common.Engine("any", "openai", base_url=unlisted.url).generate([CHAT])[0][0].startswith("answer")
        with pytest.raises(common.UsageError, match="lists no models"):
            common.Engine(None, "openai", base_url=unlisted.url)
        with pytest.raises(common.UsageError, match="needs --base-url"):
            common.Engine(None, "openai")
    finally:
        two.close()
        unlisted.close()


class FlakyServer(ChatServer):
    """Answers HTTP 503 to the first `failures` requests, then like echo."""

    def __init__(self, failures):
        self.failures, self.seen = failures, 0
        super().__init__(self.reply, models=["m"])

    def reply(self, body):
        self.seen += 1
        return (503, None) if self.seen <= self.failures else echo(body)


def test_retries_with_exponential_backoff():
    s = FlakyServer(failures=2)
    try:
        engine = common.Engine(None, "openai", base_url=s.url, max_retries=2)
        engine._backend.retry_wait = 0.05
        start = time.time()
        assert engine.generate([CHAT], n=1, temperature=0) == [["answer 0.0 STOP tail"]]
        assert s.seen == 3 and time.time() - start >= 0.05 + 0.1  # waited 0.05, then 0.1
        s.seen, engine._backend.max_retries = 0, 1  # two failures, one retry: the server keeps failing
        with pytest.raises(common.UsageError, match=r"kept failing \(HTTP 503\)"):
            engine.generate([CHAT])
    finally:
        s.close()


def test_concurrency_is_bounded():
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow(body):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return echo(body)

    s = ChatServer(slow, models=["m"])
    try:
        engine = common.Engine(None, "openai", base_url=s.url, concurrency=3)
        out = engine.generate([CHAT] * 12, n=1, seed=0)
        assert [o[0] for o in out] == [f"answer {i}.0 STOP tail" for i in range(12)]  # in prompt order
        assert state["most"] == 3
    finally:
        s.close()


def test_a_refused_prompt_is_empty_and_counted():
    s = ChatServer(lambda b: (400, None) if "TOO-LONG" in b["messages"][-1]["content"] else echo(b), models=["m"])
    try:
        engine = common.Engine(None, "openai", base_url=s.url)
        out = engine.generate([CHAT, [{"role": "user", "content": "TOO-LONG"}]], n=2, temperature=1.0)
        assert out[0] == ["answer 0.0 STOP tail", "answer 0.1 STOP tail"] and out[1] == ["", ""]
        assert engine._backend.refused == 1
    finally:
        s.close()


def test_prompt_fits_uses_the_served_window(tiny_model_path):
    """A served folder: its tokenizer is here, and vLLM's /v1/models reports max_model_len."""
    s = ChatServer(echo, models={tiny_model_path: 256})
    other = ChatServer(echo, models={"elsewhere/model": 256})
    try:
        engine = common.Engine(None, "openai", base_url=s.url)
        long_chat = [{"role": "user", "content": "seven " * 300}]
        assert engine.prompt_fits([CHAT, long_chat], 64) == [True, False]
        n = common.prompt_lengths(common.load_tokenizer(tiny_model_path), [CHAT])[0]
        assert engine.prompt_fits([CHAT], 256 - n) == [True] and engine.prompt_fits([CHAT], 257 - n) == [False]
        assert common.Engine(None, "openai", base_url=other.url).prompt_fits([CHAT], 8) == [None]  # no tokenizer here
    finally:
        s.close()
        other.close()


def test_local_engine_prompt_fits(tiny_model_path):
    engine = common.Engine(tiny_model_path, backend="hf", device="cpu")
    assert engine.context_window() == 2048  # the tiny Llama's max_position_embeddings
    engine.backend_name = "vllm"
    assert engine.context_window() == 2048 and common.Engine(tiny_model_path, "auto", "cpu",
                                                              max_model_len=512).context_window() == 512
    n = common.prompt_lengths(engine.tokenizer, [CHAT])[0]
    assert engine.prompt_fits([CHAT, CHAT], 2048 - n) == [True, True]
    assert engine.prompt_fits([CHAT], 2049 - n) == [False]


def test_server_down_is_one_error_line_and_exit_2(tmp_path):
    problems = tmp_path / "p.jsonl"
    common.write_jsonl_atomic(problems, [{"id": "a", "question": "What is 2 + 3?", "answer": "5",
                                          "reference_steps": ["2 + 3 = 5.", "The answer is 5."]}])
    for script in ("05_test_time.py", "solve.py"):
        extra = ["--critic", "rules", "--out-dir", str(tmp_path / "out")] if script.startswith("05") else []
        proc = subprocess.run([sys.executable, str(Path(ROOT) / script), "--problems", str(problems),
                               "--backend", "openai", "--base-url", dead_url(), "--max-retries", "1",
                               "--fewshot", "0", *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot reach http://127.0.0.1:")
        assert "is the server up?" in lines[0] and "Traceback" not in proc.stderr
