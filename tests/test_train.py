"""Supervised fine-tuning: loss masking, the Trainer loop, resume, LoRA merge, stage 04."""
import json
import math

import pytest

import common
from conftest import load_stage

SYSTEM = "SYSTEMWORDS stay unlabeled"
USER = "USERWORDS stay unlabeled too"
REPLY = "Step 1: 2 + 3 = 5\nVerdict: Correct. Fine.\nFinal verdict: Correct. The answer is right."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
        {"role": "assistant", "content": REPLY}]


def labeled_text(tok, ex) -> str:
    return tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != common.IGNORE_INDEX])


@pytest.fixture(scope="module")
def smol_tokenizer(embedded_model_path):
    return common.load_tokenizer(embedded_model_path)


# -----------------------------------------------------------------------------
# Masking


def test_mask_with_chat_template(smol_tokenizer):
    tok = smol_tokenizer
    ex = common.tokenize_chat_for_sft(tok, CHAT, 4096)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"])
    # Exactly the reply plus the template's end-of-turn token carries loss.
    assert labeled_text(tok, ex) == REPLY + "<|im_end|>"
    # The labeled span is one block: prompt before it, only the template's newline after it.
    span = [i for i, l in enumerate(labels) if l != common.IGNORE_INDEX]
    assert span == list(range(span[0], span[-1] + 1))
    assert tok.decode(ids[:span[0]]) == common.render_chat(tok, CHAT[:-1])
    assert tok.decode(ids[span[-1] + 1:]) == "\n"
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert "SYSTEMWORDS" not in labeled_text(tok, ex) and "USERWORDS" not in labeled_text(tok, ex)
    assert all(l == t for l, t in zip(labels[span[0]:], ids[span[0]:span[-1] + 1]))


def test_mask_without_chat_template(smol_tokenizer):
    tok = common.load_tokenizer(common.resolve_model("smollm2-135m"))
    tok.chat_template = None
    ex = common.tokenize_chat_for_sft(tok, CHAT, 4096)
    assert labeled_text(tok, ex) == REPLY + tok.eos_token
    prompt = f"System: {SYSTEM}\n\nUser: {USER}\n\nAssistant: "
    assert tok.decode(ex["input_ids"]) == prompt + REPLY + tok.eos_token
    first = next(i for i, l in enumerate(ex["labels"]) if l != common.IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][:first]) == prompt  # the prompt Engine.render gives


def test_too_long_examples_are_dropped_and_counted(smol_tokenizer):
    n = len(common.tokenize_chat_for_sft(smol_tokenizer, CHAT, 4096)["input_ids"])
    assert common.tokenize_chat_for_sft(smol_tokenizer, CHAT, n) is not None
    assert common.tokenize_chat_for_sft(smol_tokenizer, CHAT, n - 1) is None
    long_chat = CHAT[:-1] + [{"role": "assistant", "content": REPLY * 20}]
    kept, dropped = common.tokenize_sft_records(
        smol_tokenizer, [{"messages": CHAT}, {"messages": long_chat}], n + 5)
    assert (len(kept), dropped) == (1, 1)
    with pytest.raises(ValueError, match="id='x'"):
        common.tokenize_sft_records(smol_tokenizer, [{"id": "x", "messages": CHAT[:-1]}], 4096)


def test_collator_pads_labels_with_ignore_index():
    batch = common.SFTCollator(pad_token_id=7)([
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "attention_mask": [1, 1, 1]},
        {"input_ids": [4], "labels": [4], "attention_mask": [1]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_actor_sft_records():
    rows = common.actor_sft_records([
        {"id": "p1", "source": "builtin", "question": "What is 2 + 3?",
         "reference_steps": ["2 + 3 = 5", "The answer is 5."], "answer": "5"}])
    msgs = rows[0]["messages"]
    assert rows[0]["id"] == "p1"
    assert msgs[:-1] == common.actor_messages("What is 2 + 3?", False)
    assert msgs[-1] == {"role": "assistant", "content": "2 + 3 = 5\nThe answer is 5."}


# -----------------------------------------------------------------------------
# Training with a tiny random Llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, embedded_model_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = common.load_tokenizer(embedded_model_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok),
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def records(n=8):
    return [{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"{i} + 1 = {i + 1}\nThe answer is {i + 1}."}]}
        for i in range(n)]


def losses(out_dir):
    done = json.loads((out_dir / common.SFT_DONE).read_text())
    return done, [h["loss"] for h in done["log_history"] if "loss" in h]


def test_sft_learns_and_saves_a_plain_model(tiny_model, tmp_path):
    out = tmp_path / "sft"
    path = common.sft_train(tiny_model, records(), out, eval_records=records(2), epochs=4,
                            lr=1e-2, batch_size=8, logging_steps=1, save_steps=100)
    assert path == str(out)
    done, ls = losses(out)
    assert done["global_step"] == 4 and len(ls) == 4
    assert all(math.isfinite(x) for x in ls)
    assert ls[-1] < ls[0] - 0.5, ls  # the same batch 4 times at a high lr must be learned
    assert len(done["eval_loss_by_epoch"]) == 4
    for name in ["model.safetensors", "config.json", "tokenizer.json", common.SFT_DONE]:
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists() and not (out / ".final-tmp").exists()
    assert not (out / "training_args.bin").exists()
    model, tok = common.load_model(str(out), device="cpu")
    assert model.config.use_cache and tok.eos_token == "<|im_end|>"
    # The same settings again return at once; other settings refuse to overwrite silently.
    assert common.sft_train(tiny_model, records(), out, eval_records=records(2), epochs=4,
                            lr=1e-2, batch_size=8) == str(out)
    with pytest.raises(SystemExit, match="other settings"):
        common.sft_train(tiny_model, records(), out, epochs=5, lr=1e-2, batch_size=8)


def test_sft_resumes_after_a_kill(tiny_model, tmp_path, monkeypatch):
    import transformers
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed  # as if kill -9 hit right after checkpoint-2 was written

    class StepCounter(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(state.global_step)

    def trainer_with(callback):
        class PatchedTrainer(transformers.Trainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.add_callback(callback)
        return PatchedTrainer

    out = tmp_path / "sft"
    kw = dict(epochs=2, lr=1e-3, batch_size=4, logging_steps=1, save_steps=2)  # 4 steps
    with monkeypatch.context() as m:
        m.setattr(transformers, "Trainer", trainer_with(KillAfterFirstSave()))
        with pytest.raises(Killed):
            common.sft_train(tiny_model, records(), out, **kw)
    # Nothing looks final after the kill, and the checkpoint of step 2 is complete.
    assert not (out / "config.json").exists() and not (out / common.SFT_DONE).exists()
    assert common.last_complete_checkpoint(out / "checkpoints").endswith("checkpoint-2")
    with pytest.raises(SystemExit, match="other settings"):  # never resume someone else's run
        common.sft_train(tiny_model, records(), out, **{**kw, "lr": 2e-3})
    counter = StepCounter()
    with monkeypatch.context() as m:
        m.setattr(transformers, "Trainer", trainer_with(counter))
        common.sft_train(tiny_model, records(), out, **kw)
    assert counter.steps == [3, 4]  # resumed: steps 1-2 are not trained again
    done, _ = losses(out)
    assert done["resumed_from"] == "checkpoint-2" and done["global_step"] == 4
    assert (out / "model.safetensors").exists()


def test_lora_is_merged_into_a_plain_model(tiny_model, tmp_path):
    out = tmp_path / "lora"
    common.sft_train(tiny_model, records(4), out, epochs=1, lr=1e-2, batch_size=4, lora=True,
                     lora_r=4, save_steps=100)
    assert not list(out.glob("adapter_*"))
    model, _ = common.load_model(str(out), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"


# -----------------------------------------------------------------------------
# Stage 04 end to end


def test_stage04_end_to_end(tiny_model, tmp_path):
    stage = load_stage("04_train_critic")
    rows = []
    for p in range(6):
        for j, ok in enumerate([True, False]):
            steps = [f"{p} + 1 = {p + 1 if ok else p + 2}", f"The answer is {p + 1 if ok else p + 2}."]
            crit = common.format_critique(steps, [ok, ok], ["", ""], ok, "")
            rows.append({"id": f"p{p}-{j}", "problem_id": f"p{p}", "method": "rg1",
                         "is_correct": ok, "difficulty": None,
                         "messages": common.critic_messages(f"What is {p} + 1?", steps)
                         + [{"role": "assistant", "content": crit}]})
    data = tmp_path / "critic_sft.jsonl"
    common.write_jsonl_atomic(data, rows)
    train, val = stage.split_by_problem(rows, 0.34)
    assert {r["problem_id"] for r in train}.isdisjoint({r["problem_id"] for r in val})
    assert len({r["problem_id"] for r in val}) == 3  # ceil(0.34 * 6)
    assert stage.split_by_problem(rows, 0.34) == (train, val)

    out = tmp_path / "critic"
    args = stage.parse_args(["--data", str(data), "--model", tiny_model, "--output-dir", str(out),
                             "--val-fraction", "0.34", "--epochs", "1", "--batch-size", "4",
                             "--eval-max-new-tokens", "8", "--backend", "hf"])
    stage.main(args)
    result = json.loads((out / "eval.json").read_text())
    assert list(result["rows"]) == ["trained critic", "base model", "majority class (Wrong)"]
    assert result["n_eval"] == 6
    for r in result["rows"].values():
        assert r["n"] == 6 and 0 <= r["accuracy"] <= 1 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    # 8 new tokens from a random model cannot reach a final verdict: unparseable, counted wrong.
    assert result["rows"]["trained critic"]["unparseable"] == 6
    assert result["rows"]["trained critic"]["accuracy"] == 0
    assert result["rows"]["majority class (Wrong)"]["accuracy"] == 0.5
    assert (out / "eval.md").exists() and (out / "eval.png").exists()
    assert len(common.read_jsonl(out / "eval_generations.jsonl")) == 12


def test_balanced_sample_and_balanced_accuracy():
    stage = load_stage("04_train_critic")
    rows = [{"id": i, "is_correct": i < 3} for i in range(20)]  # 3 correct, 17 flawed
    picked = stage.sample_train_rows(rows, 0, balance=True, seed=0)
    assert sorted(r["is_correct"] for r in picked) == [False] * 3 + [True] * 3
    picked = stage.sample_train_rows(rows, 4, balance=True, seed=0)
    assert sorted(r["is_correct"] for r in picked) == [False, False, True, True]
    assert len({r["id"] for r in stage.sample_train_rows(rows, 10, balance=False, seed=0)}) == 10
    assert stage.sample_train_rows(rows, 0, balance=False, seed=0) == rows
    assert stage.sample_train_rows(rows, 6, True, 1) == stage.sample_train_rows(rows, 6, True, 1)

    # truth: 2 correct, 6 wrong paths; None = no readable verdict, always a miss
    truth = [True, True] + [False] * 6
    always_wrong = stage.score([False] * 8, truth)
    assert always_wrong["accuracy"] == 0.75 and always_wrong["balanced_accuracy"] == 0.5
    mixed = stage.score([True, None, False, False, False, True, None, False], truth)
    assert mixed["acc_on_correct_paths"] == 0.5 and mixed["acc_on_flawed_paths"] == 4 / 6
    assert mixed["balanced_accuracy"] == (0.5 + 4 / 6) / 2 and mixed["unparseable"] == 2
