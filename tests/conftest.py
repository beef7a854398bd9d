"""Make the top-level stage scripts and common.py importable from tests."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_stage(name: str):
    """Stage files start with a digit (00_prepare_data.py), so they are imported by name."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def embedded_model_path():
    import common
    return common.resolve_model(common.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, embedded_model_path):
    """A 2-layer random-weight Llama with the SmolLM2 tokenizer: real code paths, no download.
    The one small model of the suite (generation, filter, training and test-time tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


class ChatServer:
    """A real OpenAI-style server on 127.0.0.1 for tests: POST /v1/chat/completions and
    /v1/completions, GET /v1/models. `reply(body)` gets a request's JSON and returns (HTTP
    status, text), or (status, [text, ...]) for several choices; non-200 has no body.
    `models`: the ids /v1/models lists (each card with `max_model_len` when given as a dict
    {id: max_model_len}); None answers 404 there, as a server without the listing does.
    Every request is kept in .log as (path, body)."""

    def __init__(self, reply, models=None):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.log = log = []
        cards = models if isinstance(models, dict) else dict.fromkeys(models or [])

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def send(self, status, obj):
                data = b"" if obj is None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models" or models is None:
                    return self.send(404, {"error": {"message": "not found"}})
                self.send(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "owned_by": "test",
                     **({"max_model_len": n} if n else {})} for m, n in cards.items()]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                log.append((self.path, body))
                status, texts = reply(body)
                if status != 200:
                    return self.send(status, None)
                texts = texts if isinstance(texts, list) else [texts]
                if self.path.endswith("/chat/completions"):
                    kind, choices = "chat.completion", [
                        {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
                        for i, t in enumerate(texts)]
                else:
                    kind, choices = "text_completion", [
                        {"index": i, "finish_reason": "stop", "text": t} for i, t in enumerate(texts)]
                self.send(200, {"id": "cmpl-1", "object": kind, "created": 0, "model": body["model"],
                                      "choices": choices,
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
