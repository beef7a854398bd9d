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


def records(n=8):
    return [{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"{i} + 1 = {i + 1}\nThe answer is {i + 1}."}]}
        for i in range(n)]


def losses(out_dir):
    done = json.loads((out_dir / common.SFT_DONE).read_text())
    return done, [h["loss"] for h in done["log_history"] if "loss" in h]


def test_sft_learns_and_saves_a_plain_model(tiny_model_path, tmp_path):
    out = tmp_path / "sft"
    path = common.sft_train(tiny_model_path, records(), out, eval_records=records(2), epochs=4,
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
    assert common.sft_train(tiny_model_path, records(), out, eval_records=records(2), epochs=4,
                            lr=1e-2, batch_size=8) == str(out)
    with pytest.raises(common.UsageError, match="other settings"):
        common.sft_train(tiny_model_path, records(), out, epochs=5, lr=1e-2, batch_size=8)


def test_sft_resumes_after_a_kill(tiny_model_path, tmp_path, monkeypatch):
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
            common.sft_train(tiny_model_path, records(), out, **kw)
    # Nothing looks final after the kill, and the checkpoint of step 2 is complete.
    assert not (out / "config.json").exists() and not (out / common.SFT_DONE).exists()
    assert common.last_complete_checkpoint(out / "checkpoints").endswith("checkpoint-2")
    with pytest.raises(common.UsageError, match="other settings"):  # never resume someone else's run
        common.sft_train(tiny_model_path, records(), out, **{**kw, "lr": 2e-3})
    counter = StepCounter()
    with monkeypatch.context() as m:
        m.setattr(transformers, "Trainer", trainer_with(counter))
        common.sft_train(tiny_model_path, records(), out, **kw)
    assert counter.steps == [3, 4]  # resumed: steps 1-2 are not trained again
    done, _ = losses(out)
    assert done["resumed_from"] == "checkpoint-2" and done["global_step"] == 4
    assert (out / "model.safetensors").exists()


def test_lora_is_merged_into_a_plain_model(tiny_model_path, tmp_path):
    out = tmp_path / "lora"
    common.sft_train(tiny_model_path, records(4), out, epochs=1, lr=1e-2, batch_size=4, lora=True,
                     lora_r=4, save_steps=100)
    assert not list(out.glob("adapter_*"))
    model, _ = common.load_model(str(out), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"


# -----------------------------------------------------------------------------
# Stage 04 end to end


def test_stage04_end_to_end(tiny_model_path, tmp_path):
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
    args = stage.parse_args(["--data", str(data), "--model", tiny_model_path, "--out-dir", str(out),
                             "--val-fraction", "0.34", "--epochs", "1", "--batch-size", "4",
                             "--eval-max-new-tokens", "8", "--backend", "hf"])
    stage.main(args)
    result = json.loads((out / "eval.json").read_text())
    assert list(result["rows"]) == ["trained critic", "base model", "majority class (Wrong)"]
    assert result["n_eval"] == 6
    # 8 new tokens from a random model cannot reach a final verdict: unparseable, counted wrong.
    # The held-out half is 3 correct + 3 flawed paths, so always answering Wrong scores 3/6.
    for name, correct, unparseable in [("trained critic", 0, 6), ("base model", 0, 6),
                                       ("majority class (Wrong)", 3, 0)]:
        r = result["rows"][name]
        assert (r["n"], r["correct"], r["unparseable"]) == (6, correct, unparseable), name
        assert [r["accuracy"], *r["ci95"]] == list(common.accuracy_ci(correct, 6))
    assert result["rows"]["majority class (Wrong)"]["balanced_accuracy"] == 0.5
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


# -----------------------------------------------------------------------------
# Packing and bf16 master weights (the fast CPU path of sft_train)


def test_packed_batch_gives_the_padded_batch_loss(tiny_model_path):
    """Packed examples must not see each other: the loss of one packed row equals the loss of
    the same examples right-padded (the attention mask is built per example)."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening
    tok = common.load_tokenizer(tiny_model_path)
    exs, _ = common.tokenize_sft_records(tok, records(3), 512)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    net.config.use_cache = False  # as sft_load_model sets it: with a cache, packing is not detected
    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=common.IGNORE_INDEX)(exs)
    padded = common.SFTCollator(tok.pad_token_id)(exs)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        lp, lq = net(**packed).loss, net(**padded).loss
        # and a wrong mask (one causal sequence over all three) changes the loss: the test can fail
        lx = net(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    assert abs(lp.item() - lq.item()) < 1e-4, (lp, lq)
    assert abs(lx.item() - lq.item()) > 1e-4
    # The kit's per-example attention over the packed row (what sft_train uses) gives it too.
    varlen = DataCollatorWithFlattening(return_position_ids=True, separator_id=common.IGNORE_INDEX,
                                        return_flash_attn_kwargs=True)(exs)
    assert common.use_varlen_attention(net) == "sdpa"
    with torch.no_grad():
        lv = net(**varlen).loss
    assert abs(lv.item() - lq.item()) < 1e-4, (lv, lq)


def test_master_weights_keep_small_updates_that_bf16_rounds_away():
    import torch
    torch.manual_seed(0)
    w = torch.nn.Parameter((0.05 + 0.01 * torch.rand(64)).to(torch.bfloat16))
    plain = torch.nn.Parameter(w.detach().clone())
    start = w.detach().float().clone()
    opt = common.master_weight_adamw([w], lr=1e-5)
    opt_plain = torch.optim.AdamW([plain], lr=1e-5, weight_decay=0.0)
    for _ in range(20):
        for p, o in ((w, opt), (plain, opt_plain)):
            o.zero_grad()
            (p.float() * torch.ones(64)).sum().backward()  # gradient 1: every step moves -lr
            o.step()
    assert torch.equal(plain.detach().float(), start)  # bf16 AdamW: 20 steps of 1e-5 lost
    moved = (start - w.detach().float()).abs().mean().item()
    assert 1e-4 < moved < 4e-4, moved  # master copy: 20 x 1e-5 = 2e-4, rounded to bf16
    # The master copy travels in state_dict, so a resumed optimizer continues exactly.
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = common.master_weight_adamw([w2], lr=1e-5)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.param_groups[0]["params"][0], opt.param_groups[0]["params"][0])
