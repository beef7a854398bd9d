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
    """A 2-layer random-weight Llama with the SmolLM2 tokenizer: real code paths, no download."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
