"""Training throughput: the kit's SFT (common.sft_train) beside a plain fp32 Trainer run.

Every variant trains the same model from the same weights on the same critic rows, tokenized
the same way (common.tokenize_sft_records), with the same lr, batch, schedule and seed, one
after another in one process. It reports trained tokens/s (tokens of the examples, never
padding, divided by the Trainer's train_runtime), seconds per example, the ratio to the plain
run, and the loss curve of each against the plain run's (same rows in the same order, so the
per-step losses are comparable). Ratios from one run are what to compare: absolute figures move
with the machine's load.

  plain     what one writes first: transformers Trainer, fp32, right-padded random batches
  kit       common.sft_train as the stages call it (auto: packed batches, and on a CPU with
            AMX/AVX512-BF16 bf16 weights with fp32 master weights in the optimizer)
  kit-fp32, kit-autocast   the kit with packing but another precision (where the speed comes from)
  kit-padded               the kit's precision without packing (length-grouped padded batches)

    python bench/bench_sft.py --data out/default/critic_sft.jsonl            # 32 rows, 4 variants
    python bench/bench_sft.py --data out/default/critic_sft.jsonl --variants plain,kit --rows 64
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

VARIANTS = ("plain", "kit", "kit-fp32", "kit-autocast", "kit-padded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="out/default/critic_sft.jsonl", help="critic SFT rows (stage 03)")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="model to fine-tune")
    p.add_argument("--rows", type=int, default=32, help="rows to train on (the first N, 0 = all)")
    p.add_argument("--epochs", type=float, default=1, help="epochs of each variant")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine, no warmup)")
    p.add_argument("--variants", default="plain,kit,kit-fp32,kit-autocast",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def plain_trainer(model, examples, args, work: Path) -> tuple[float, list[float]]:
    """(train_runtime, per-step losses) of a plain fp32 Trainer run on padded batches."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    targs = TrainingArguments(output_dir=str(work / "plain"), num_train_epochs=args.epochs,
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
                              per_device_train_batch_size=args.batch_size, logging_steps=1,
                              save_strategy="no", report_to="none", use_cpu=True, seed=0,
                              data_seed=0, remove_unused_columns=False)
    net = AutoModelForCausalLM.from_pretrained(common.resolve_model(model), dtype=torch.float32)
    net.config.use_cache = False
    tok = common.load_tokenizer(model)
    trainer = Trainer(model=net, args=targs, train_dataset=examples, processing_class=tok,
                      data_collator=common.SFTCollator(tok.pad_token_id))
    result = trainer.train()
    return result.metrics["train_runtime"], [h["loss"] for h in trainer.state.log_history if "loss" in h]


def kit_sft(model, records, args, work: Path, variant: str) -> tuple[float, list[float]]:
    precision = {"kit": "auto", "kit-fp32": "fp32", "kit-autocast": "autocast",
                 "kit-padded": "auto"}[variant]
    out = work / variant
    common.sft_train(model, records, out, epochs=args.epochs, lr=args.lr,
                     batch_size=args.batch_size, logging_steps=1, save_steps=10_000,
                     packing=variant != "kit-padded", precision=precision, resume=False)
    done = json.loads((out / common.SFT_DONE).read_text())
    return done["metrics"]["train_runtime"], [h["loss"] for h in done["log_history"] if "loss" in h]


def main(args):
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        raise common.UsageError(f"--variants: choose from {', '.join(VARIANTS)}, not {args.variants!r}")
    records = common.take(common.read_jsonl(args.data, required=["messages"], nonempty=True), args.rows)
    tok = common.load_tokenizer(args.model)
    examples, dropped = common.tokenize_sft_records(tok, records, 4096)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    n_reply = sum(sum(x != common.IGNORE_INDEX for x in e["labels"]) for e in examples)
    print(f"{len(examples)} rows ({dropped} too long), {n_tokens} tokens ({n_reply} in replies), "
          f"batch {args.batch_size}, {args.epochs} epoch(s); bf16 fast on this CPU: "
          f"{common.cpu_has_fast_bf16()}; kit precision: {common.sft_precision('cpu')}")
    results, work = {}, Path(tempfile.mkdtemp(prefix="bench_sft_"))
    try:
        for v in variants:
            start = time.time()
            if v == "plain":
                runtime, losses = plain_trainer(args.model, examples, args, work)
            else:
                runtime, losses = kit_sft(args.model, records, args, work, v)
            results[v] = {"train_runtime_s": runtime, "wall_s": time.time() - start,
                          "tokens_per_s": n_tokens * args.epochs / runtime,
                          "s_per_example": runtime / (len(examples) * args.epochs), "losses": losses}
            print(f"[{v}] {runtime:.1f} s, {results[v]['tokens_per_s']:.1f} tokens/s, "
                  f"losses {[round(x, 3) for x in losses]}")
            shutil.rmtree(work / v, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref = results.get("plain") or next(iter(results.values()))
    lines = ["| method | trained tokens/s | s/example | vs plain | first loss | last loss "
             "| mean loss, last half | max per-step loss gap to plain |", "|---|---|---|---|---|---|---|---|"]
    for v, r in results.items():
        ls, rl = r["losses"], ref["losses"]
        half = ls[len(ls) // 2:]
        gap = max((abs(a - b) for a, b in zip(ls, rl)), default=0.0)
        lines.append(f"| {v} | {r['tokens_per_s']:.1f} | {r['s_per_example']:.2f} "
                     f"| {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {ls[0]:.3f} | {ls[-1]:.3f} "
                     f"| {sum(half) / len(half):.3f} | {gap:.3f} |")
    table = "\n".join(lines)
    print(f"\n{len(examples)} critic rows, {n_tokens} tokens, batch {args.batch_size}, lr {args.lr}:\n{table}")
    if args.out:
        common.write_json_atomic(args.out, {"rows": len(examples), "tokens": n_tokens,
                                            "reply_tokens": n_reply, "batch_size": args.batch_size,
                                            "lr": args.lr, "epochs": args.epochs, "results": results})
    return results


if __name__ == "__main__":
    common.run_cli(main, parse_args)
