"""Stage 04: train the critic by supervised fine-tuning, then measure its final verdicts.

Reads  out/critic_sft.jsonl (stage 03): {"id", "messages": [system, user, assistant critique],
       "problem_id", "method", "is_correct", "difficulty"}.
Writes out/critic/                          the critic: safetensors + tokenizer + sft_done.json
       out/critic/eval.json, eval.md, eval.png   final-verdict accuracy on held-out problems
       out/critic/eval_generations.jsonl    every critique the evaluation read (resumable)

Paper (Llama-3-8B-Instruct critic): full fine-tuning, lr 5e-6, cosine schedule, no warmup,
global batch 256, max length 4096, 5 epochs; loss on the critique only; the critic decodes
greedily with up to 1536 new tokens.
Where the paper is silent, chosen here:
- a validation split by problem (--val-fraction of the problems, picked by a hash of the problem
  id), so every path of a held-out problem is unseen and the score measures generalization;
- the score: does the critique's "Final verdict" match the path's true correctness? A critique
  with no readable final verdict counts as wrong, and is counted. Two references: the untrained
  base model with the same prompt, and always answering the training split's majority class.
- CPU defaults (135M model on 2 cores): lr 1e-4, 2 epochs, batch 4, no accumulation. The
  paper's 5e-6 suits an 8B model at batch 256 over thousands of steps; it barely moves a 135M
  model in a few dozen steps.
- --balance (on in run_all's CPU presets) trains on as many correct as flawed paths; the
  held-out paths keep their natural mix, and the table adds balanced accuracy (the mean of the
  two per-class accuracies) next to plain accuracy, since always answering "Wrong" already scores
  the flawed share of the held-out paths.
- the trained critic is also scored per source of the held-out path (actor samples, inserted
  mistakes, reference solutions), so a critic that calls one writer's style Correct without
  reading the steps shows, and at step level on the held-out paths whose first error is known
  (inserted mistakes, correct paths), by 05's ProcessBench rule.
- training uses common.sft_train's fast path (packed batches; bf16 autocast on CPUs with
  AMX/AVX512-BF16); no loss pass over the held-out rows unless --eval-loss.

  python 04_train_critic.py                                  # CPU, embedded SmolLM2-135M
  torchrun --nproc_per_node 8 04_train_critic.py --model meta-llama/Meta-Llama-3-8B-Instruct \
      --lr 5e-6 --epochs 5 --batch-size 4 --grad-accum 8 --deepspeed configs/ds_zero3.json \
      --gradient-checkpointing            # then rerun without torchrun to evaluate (vLLM)
  accelerate launch --config_file configs/fsdp.yaml 04_train_critic.py \
      --model meta-llama/Meta-Llama-3-8B-Instruct --lr 5e-6 --epochs 5 --batch-size 4 --grad-accum 8
  python 04_train_critic.py --model Qwen/Qwen2.5-3B-Instruct --lora --lr 1e-4 --backend vllm
"""
import argparse
import gc
import json
import math
import os
import random
from pathlib import Path

import common

# -----------------------------------------------------------------------------
# Data split


def split_by_problem(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val): a fixed share of problems, chosen by hash, holds all of its paths out."""
    problems = sorted({r["problem_id"] for r in rows}, key=common.stable_seed)
    n_val = math.ceil(val_fraction * len(problems)) if val_fraction > 0 else 0
    n_val = min(n_val, len(problems) - 1)  # keep at least one problem to train on
    held_out = set(problems[:max(n_val, 0)])
    return ([r for r in rows if r["problem_id"] not in held_out],
            [r for r in rows if r["problem_id"] in held_out])


def sample_train_rows(rows: list[dict], max_rows: int, balance: bool, seed: int) -> list[dict]:
    """A seeded sample of at most max_rows (0 = no cap).

    With balance, correct and flawed paths get equal shares as far as the rarer class allows:
    flawed paths outnumber correct ones several times over, and a small critic trained on that
    mix learns the prior ("Wrong") before it learns to read the steps.
    """
    rng = random.Random(seed)
    if not balance:
        return rng.sample(rows, max_rows) if 0 < max_rows < len(rows) else rows
    correct = [r for r in rows if r["is_correct"]]
    flawed = [r for r in rows if not r["is_correct"]]
    per_class = min(len(correct), len(flawed))
    if max_rows:
        per_class = min(per_class, max_rows // 2)
    picked = rng.sample(correct, per_class) + rng.sample(flawed, per_class)
    rng.shuffle(picked)
    return picked


# -----------------------------------------------------------------------------
# Evaluation: the final verdict against the truth


def critique_rows(engine, rows: list[dict], tag: str, max_new_tokens: int, writer,
                  chunk: int = 64) -> list[dict]:
    """Greedy critiques of the held-out paths; written as they come, so a rerun resumes."""
    todo = [r for r in rows if f"{tag}|{r['id']}" not in writer]
    for b in range(0, len(todo), chunk):
        part = todo[b:b + chunk]
        texts = engine.generate([r["messages"][:-1] for r in part], n=1, temperature=0.0,
                                max_new_tokens=max_new_tokens, desc=f"critique ({tag})")
        for r, [text] in zip(part, texts):
            crit = common.parse_critique(text)
            writer.write({"key": f"{tag}|{r['id']}", "id": r["id"], "critique": text,
                          "final_correct": crit.final_correct, "well_formed": crit.ok,
                          "is_correct": bool(r["is_correct"])})
    done = {g["key"]: g for g in writer.rows}
    return [done[f"{tag}|{r['id']}"] for r in rows]


def score(predictions: list[bool | None], truth: list[bool]) -> dict:
    """Accuracy with Wilson 95% CI, per true class, and how many verdicts were unreadable."""
    hits = [p is not None and p == t for p, t in zip(predictions, truth)]
    acc, lo, hi = common.accuracy_ci(sum(hits), len(hits))

    def acc_on(cls: bool):
        sel = [h for h, t in zip(hits, truth) if t == cls]
        return sum(sel) / len(sel) if sel else None

    per_class = [a for a in (acc_on(True), acc_on(False)) if a is not None]
    return {"n": len(hits), "correct": sum(hits), "accuracy": acc, "ci95": [lo, hi],
            "acc_on_correct_paths": acc_on(True), "acc_on_flawed_paths": acc_on(False),
            # The mean of the two per-class accuracies: always answering one class scores 50%.
            "balanced_accuracy": sum(per_class) / len(per_class) if per_class else None,
            "unparseable": sum(p is None for p in predictions)}


SOURCES = {"rg1": "actor samples", "rg2": "actor samples", "rg3": "inserted mistakes",
           "reference": "reference solutions"}


def step_label(row: dict) -> int | None:
    """0-based first wrong step (-1: none) where it is known exactly, as 05 reads paths: correct
    paths and inserted mistakes (rg3, whose annotation starts at the inserted step); None for
    actor paths that end wrong (rg1/rg2: only the answer is known to be wrong)."""
    if row["is_correct"]:
        return -1
    if row.get("method") != "rg3":
        return None
    first = common.parse_critique(row["messages"][-1]["content"]).first_wrong_step
    return None if first is None else first - 1


def predicted_step(critique: str) -> int:
    first = common.parse_critique(critique).first_wrong_step
    return -1 if first is None else first - 1


def score_by_source(rows: list[dict], gens: list[dict]) -> dict:
    """Per source of the path (actor samples, inserted mistakes, reference solutions): the
    final-verdict accuracy and, on step-labelled rows, how often the first step the critic
    marks Wrong is the true first error (-1 on correct paths). A critic that tells the
    reference's style from the actor's, rather than reading the steps, fails one source here."""
    out = {}
    for source in dict.fromkeys(SOURCES.get(r.get("method"), str(r.get("method"))) for r in rows):
        sel = [(r, g) for r, g in zip(rows, gens)
               if SOURCES.get(r.get("method"), str(r.get("method"))) == source]
        labelled = [(step_label(r), predicted_step(g["critique"])) for r, g in sel
                    if step_label(r) is not None]
        out[source] = {"n": len(sel), "share_correct_paths": sum(r["is_correct"] for r, _ in sel) / len(sel),
                       "verdict_accuracy": sum(g["final_correct"] == bool(r["is_correct"]) for r, g in sel) / len(sel),
                       "n_step_labelled": len(labelled),
                       "first_error_found": (sum(p == l for l, p in labelled) / len(labelled)) if labelled else None}
    return out


def step_level(rows: list[dict], gens: list[dict]) -> dict | None:
    """ProcessBench-style scores over the held-out rows whose first error step is known."""
    pairs = [(step_label(r), predicted_step(g["critique"])) for r, g in zip(rows, gens)
             if step_label(r) is not None]
    return common.processbench_scores([p for _, p in pairs], [l for l, _ in pairs]) if pairs else None


def write_report(result: dict, out_dir: Path) -> str:
    pct = common.pct
    lines = ["| verdicts from | accuracy % [95% CI] | on correct paths % | on flawed paths % "
             "| balanced accuracy % | unparseable |", "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {pct(r['accuracy'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}] "
                     f"| {pct(r['acc_on_correct_paths'])} | {pct(r['acc_on_flawed_paths'])} "
                     f"| {pct(r['balanced_accuracy'])} | {r['unparseable']}/{r['n']} |")
    src = ["", "Trained critic per source of the held-out path:", "",
           "| source | paths | correct paths % | final verdict right % | step-labelled "
           "| first error step found % |", "|---|---|---|---|---|---|"]
    for name, r in (result.get("by_source") or {}).items():
        src.append(f"| {name} | {r['n']} | {pct(r['share_correct_paths'])} | {pct(r['verdict_accuracy'])} "
                   f"| {r['n_step_labelled']} | {pct(r['first_error_found'])} |")
    sl = result.get("step_level")
    if sl:
        src += ["", f"Step level (ProcessBench protocol, {sl['n']} step-labelled held-out paths): "
                f"erroneous {pct(sl['acc_erroneous'])} ({sl['n_erroneous']}), correct "
                f"{pct(sl['acc_correct'])} ({sl['n_correct']}), F1 {pct(sl['f1'])}."]
    table = "\n".join(lines + src)
    common.write_text_atomic(
        out_dir / "eval.md", f"Critic final-verdict accuracy on {result['n_eval']} held-out paths "
        f"({result['n_val_problems']} unseen problems).\n\n{table}\n")
    plt = common.pyplot()
    names = list(result["rows"])
    accs = [100 * result["rows"][k]["accuracy"] for k in names]
    errs = [[a - 100 * result["rows"][k]["ci95"][0] for k, a in zip(names, accs)],
            [100 * result["rows"][k]["ci95"][1] - a for k, a in zip(names, accs)]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, accs, yerr=errs, capsize=6, color=["tab:blue", "tab:gray", "tab:orange"])
    ax.set_ylabel("final-verdict accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Critic on {result['n_eval']} held-out paths (95% CI)")
    fig.tight_layout()
    fig.savefig(out_dir / "eval.png", dpi=120)
    plt.close(fig)
    return table


def score_critics(args, critic_path: str, train: list[dict], val: list[dict]) -> dict:
    out_dir = Path(args.out_dir)
    rows = sorted(val, key=lambda r: common.stable_seed(r["id"]))
    if args.max_eval_rows:
        rows = rows[:args.max_eval_rows]
    truth = [bool(r["is_correct"]) for r in rows]
    done = json.loads((out_dir / common.SFT_DONE).read_text())
    # Keys carry what produced a critique, so a retrained critic never reuses stale ones.
    trained_tag = f"trained:{common.stable_seed(json.dumps(done['config'], sort_keys=True)):08x}:{args.eval_max_new_tokens}"
    base_tag = f"base:{args.model}:{args.eval_max_new_tokens}"
    results = {}
    with common.ResumableWriter(out_dir / "eval_generations.jsonl", key="key") as writer:
        for name, path, tag in [("trained critic", critic_path, trained_tag),
                                ("base model", args.model, base_tag)]:
            # A fresh engine each, freed after use: two big models need not share the memory.
            engine = common.Engine(path, args.backend, args.device)
            todo = sum(f"{tag}|{r['id']}" not in writer for r in rows)
            if todo:
                engine.plan(todo, args.eval_max_new_tokens)
            gens = critique_rows(engine, rows, tag, args.eval_max_new_tokens, writer)
            engine.close()
            del engine
            gc.collect()
            results[name] = score([g["final_correct"] for g in gens], truth)
            results[name]["well_formed"] = sum(g["well_formed"] for g in gens)
            if name == "trained critic":
                by_source, steps = score_by_source(rows, gens), step_level(rows, gens)
    # The majority class of all training rows, before any balancing: the stronger baseline.
    n_true = sum(bool(r["is_correct"]) for r in train)
    majority = n_true > len(train) - n_true  # a tie answers Wrong
    results[f"majority class ({'Correct' if majority else 'Wrong'})"] = score([majority] * len(rows), truth)
    return {"n_eval": len(rows), "n_val_rows": len(val),
            "n_val_problems": len({r["problem_id"] for r in val}),
            "n_train_rows": len(train), "eval_max_new_tokens": args.eval_max_new_tokens,
            "train_share_correct_paths": n_true / len(train), "rows": results,
            "by_source": by_source, "step_level": steps}


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="out/critic_sft.jsonl", help="critic SFT rows from stage 03")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="base model to fine-tune (name, hub id or folder)")
    p.add_argument("--out-dir", default="out/critic", help="where the critic and its evaluation go")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of problems held out (all their paths) for validation")
    p.add_argument("--epochs", type=float, default=2, help="training epochs (paper: 5)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak learning rate, cosine decay, no warmup (paper: 5e-6 for 8B at global "
                        "batch 256; 1e-4 is what moves a 135M model in a few CPU steps)")
    p.add_argument("--batch-size", type=common.positive, default=4, help="per-device batch size")
    p.add_argument("--grad-accum", type=common.positive, default=1,
                   help="gradient accumulation steps (paper: global batch 256 = batch x accum x GPUs)")
    p.add_argument("--max-length", type=common.positive, default=4096,
                   help="longer examples are dropped and counted, never truncated (paper: 4096)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter, merged into the weights at the end")
    p.add_argument("--lora-r", type=common.positive, default=16, help="LoRA rank")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config json, e.g. configs/ds_zero3.json")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (needed for 8B at length 4096)")
    p.add_argument("--max-train-rows", type=common.count, default=0,
                   help="train on at most this many rows (a seeded sample; 0 = all)")
    p.add_argument("--balance", action="store_true",
                   help="train on equal numbers of correct and flawed paths (as far as the rarer "
                        "class allows); the evaluation keeps the held-out mix as it is")
    p.add_argument("--save-steps", type=common.positive, default=100, help="checkpoint every N optimizer steps")
    p.add_argument("--max-eval-rows", type=common.count, default=200,
                   help="critique at most this many held-out paths (a fixed hash-ordered subset; 0 = all)")
    p.add_argument("--eval-max-new-tokens", type=common.positive, default=768,
                   help="critique length limit at evaluation (paper: 1536)")
    p.add_argument("--eval-loss", action="store_true",
                   help="also compute the loss on the held-out rows after every epoch (a forward "
                        "pass over them; the verdict evaluation after training is the score)")
    p.add_argument("--skip-eval", action="store_true", help="train only")
    common.add_backend_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed for the data order and sampling of rows")
    return p.parse_args(argv)


def main(args):
    rows = common.read_jsonl(args.data, ("id", "messages", "problem_id", "is_correct"), nonempty=True)
    train_all, val = split_by_problem(rows, args.val_fraction)
    train = sample_train_rows(train_all, args.max_train_rows, args.balance, args.seed)
    n_correct = sum(bool(r["is_correct"]) for r in train)
    print(f"[04] {len(train)} training rows ({n_correct} correct / {len(train) - n_correct} flawed "
          f"paths, of {len(train_all)}), {len(val)} held-out rows "
          f"({len({r['problem_id'] for r in val})} problems)")

    critic = common.sft_train(
        args.model, train, args.out_dir, eval_records=val if args.eval_loss else None, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, lora=args.lora, lora_r=args.lora_r, device=args.device,
        seed=args.seed, save_steps=args.save_steps, logging_steps=5, deepspeed=args.deepspeed,
        extra_args={"gradient_checkpointing": True} if args.gradient_checkpointing else None)
    done = json.loads((Path(critic) / common.SFT_DONE).read_text())
    print(f"[04] critic saved to {critic}: {done['global_step']} steps, train loss "
          f"{done['train_loss']:.4f}, eval loss by epoch "
          f"{[round(e['eval_loss'], 4) for e in done['eval_loss_by_epoch']]}, "
          f"{done['dropped_too_long']} examples dropped as too long")

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("RANK", "0")) == 0:
            print("[04] distributed run: evaluate with the same command without torchrun/accelerate")
        return
    if args.skip_eval or not val:
        print("[04] no evaluation (--skip-eval or no held-out problems)")
        return
    result = score_critics(args, critic, train_all, val)
    result["n_train_rows_used"] = len(train)
    result["train_share_correct_paths_used"] = n_correct / len(train)
    result["training"] = {k: done[k] for k in ["config", "train_examples", "dropped_too_long",
                                              "global_step", "train_loss", "eval_loss_by_epoch"]}
    result["training"]["train_runtime_s"] = done["metrics"].get("train_runtime")
    common.write_json_atomic(Path(args.out_dir) / "eval.json", result)
    table = write_report(result, Path(args.out_dir))
    print(f"\nCritic final-verdict accuracy, {result['n_eval']} held-out paths:\n{table}")
    return result


if __name__ == "__main__":
    common.run_cli(main, parse_args)
