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
    """A real OpenAI-style /v1/chat/completions server on 127.0.0.1 for tests. `reply(body)`
    gets the request's JSON and returns (HTTP status, assistant text); non-200 has no body."""

    def __init__(self, reply):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = reply(body)
                data = b"" if status != 200 else json.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
