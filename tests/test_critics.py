"""common's critics (rules, model, OpenAI-compatible endpoint) and the shared critique -> refine
round that 05, 06 and 07 use."""
import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ChatServer

import common

QUESTION = "Ann has 3 bags of 4 apples. She eats 2. How many apples are left?"
REFERENCE = ["Ann has 3 * 4 = 12 apples.", "After eating 2 she has 12 - 2 = 10 apples.", "The answer is 10."]


def item(steps, id_="p1", **extra):
    return {"id": id_, "question": QUESTION, "steps": steps, "boxed": False,
            "reference_steps": REFERENCE, "gold_answer": "10", **extra}


def critic_args(critic, **kw):
    p = argparse.ArgumentParser()
    common.add_critic_args(p)
    common.add_backend_args(p)
    return p.parse_args(["--critic", critic, *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in kw.items()), [])])


# -----------------------------------------------------------------------------
# The rules critic: exact, reference-aware


def test_rules_critic_finds_the_wrong_step_and_passes_a_right_path():
    critic = common.make_critic(critic_args("rules"))
    assert (critic.name, critic.kind) == ("rules", "rules")
    wrong = ["Ann has 3 * 4 = 13 apples.", "After eating 2 she has 13 - 2 = 11 apples.", "The answer is 11."]
    texts = critic.critique([item(wrong, "w"), item(REFERENCE, "r")])
    bad, good = (common.parse_critique(t, n_steps=3) for t in texts)
    assert bad.ok and bad.first_wrong_step == 1 and bad.final_correct is False
    assert "10" not in bad.final_explanation  # a critic in the loop must not hand over the answer
    assert good.ok and good.first_wrong_step is None and good.final_correct is True


def test_rules_critic_needs_the_reference():
    critic = common.make_critic(critic_args("rules"))
    with pytest.raises(common.UsageError, match="reference_steps"):
        critic.critique([{"id": "x", "question": QUESTION, "steps": ["The answer is 10."]}])


def test_default_critic_missing_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/critic here
    with pytest.raises(common.UsageError, match="no trained critic"):
        common.make_critic(critic_args(common.DEFAULT_CRITIC))


# -----------------------------------------------------------------------------
# critique -> refine with a scripted actor: prompts, results, resume


class ScriptedActor:
    def __init__(self):
        self.prompts = []

    def generate(self, prompts, n=1, **kw):
        self.prompts += prompts
        return [["Ann has 3 * 4 = 12 apples.\n12 - 2 = 10\nThe answer is 10."] * n for _ in prompts]


def test_critique_and_refine_round_and_resume(tmp_path):
    critic = common.make_critic(critic_args("rules"))
    actor = ScriptedActor()
    items = [item(["Ann has 3 * 4 = 12 apples.", "12 - 2 = 9", "The answer is 9."], "a"), item(REFERENCE, "b")]
    with common.ResumableWriter(tmp_path / "c.jsonl") as cw, common.ResumableWriter(tmp_path / "r.jsonl") as rw:
        out = common.critique_and_refine(actor, critic, items, temperature=0.7, max_new_tokens=32,
                                         critique_writer=cw, refine_writer=rw)
    assert [o["verdict"] for o in out] == [False, True]
    assert [o["refined_answer"] for o in out] == ["10", "10"]
    assert out[0]["refined_steps"][-1] == "The answer is 10."
    refine_prompt = actor.prompts[0][-1]["content"]
    assert "12 - 2 = 9" in refine_prompt and out[0]["critique"] in refine_prompt  # critique is passed on
    n_calls = len(actor.prompts)
    with common.ResumableWriter(tmp_path / "c.jsonl") as cw, common.ResumableWriter(tmp_path / "r.jsonl") as rw:
        again = common.critique_and_refine(actor, critic, items, temperature=0.7, max_new_tokens=32,
                                           critique_writer=cw, refine_writer=rw)
        assert len(cw.rows) == len(rw.rows) == 2  # nothing written twice
    assert len(actor.prompts) == n_calls and again == out  # everything from the cache


def test_model_critic_is_greedy_and_shares_the_engine(monkeypatch):
    seen = {}

    class Engine:
        def generate(self, prompts, n=1, temperature=None, **kw):
            seen["temperature"] = temperature
            return [["Step 1: x\nVerdict: Correct. ok\nFinal verdict: Correct. ok"] for _ in prompts]

    engine = Engine()
    monkeypatch.setattr(common, "get_engine", lambda *a, **k: engine)
    critic = common.make_critic(critic_args("some/model"))
    assert critic.kind == "model" and critic.engine is engine and critic.name == "some/model"
    texts = critic.critique([{"id": "1", "question": "q", "steps": ["x"]}])
    assert common.parse_critique(texts[0]).final_correct is True and seen["temperature"] == 0.0


# -----------------------------------------------------------------------------
# An OpenAI-compatible endpoint on 127.0.0.1: retries, a refused prompt, a server that is down


class CountingServer(ChatServer):
    """The first request answers HTTP 500, a prompt with TOO-LONG gets 400, others a critique."""

    def __init__(self):
        self.n = 0
        super().__init__(self.reply)

    def reply(self, body):
        self.n += 1
        if self.n == 1:
            return 500, None
        if "TOO-LONG" in body["messages"][-1]["content"]:
            return 400, None
        return 200, "Step 1: a\nVerdict: Wrong. no\nFinal verdict: Wrong. no"


def test_api_critic_retries_and_counts_a_refused_prompt():
    server = CountingServer()
    try:
        critic = common.make_critic(critic_args("api:judge", critic_url=server.url, critic_concurrency=1))
        critic.engine.retry_wait = 0.01
        assert critic.kind == "api" and critic.name == f"api:judge@{server.url}"
        texts = critic.critique([{"id": "1", "question": "q", "steps": ["a"]},
                                 {"id": "2", "question": "TOO-LONG q", "steps": ["a"]}])
        assert common.parse_critique(texts[0]).final_correct is False  # after one HTTP 500
        assert texts[1] == ""  # refused (400): an unparseable critique, counted by the caller
        assert server.n == 3
    finally:
        server.close()


def test_api_critic_server_down_is_a_usage_error():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as s:
        port = s.server_address[1]  # a port nobody listens on once closed
    critic = common.make_critic(critic_args("api:judge", critic_url=f"http://127.0.0.1:{port}/v1"))
    critic.engine.max_retries, critic.engine.retry_wait = 1, 0.01
    with pytest.raises(common.UsageError, match="cannot reach"):
        critic.critique([{"id": "1", "question": "q", "steps": ["a"]}])
