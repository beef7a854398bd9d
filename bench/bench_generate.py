"""Generation throughput: the kit's Engine (each backend) beside a plain per-prompt HF loop.

Samples n completions for each of P actor prompts with every method in one process, counts the
generated tokens with the model's tokenizer (same rule for all), and prints tokens/s and the
ratio to the plain loop. Ratios from one run are what to compare: absolute figures move with the
machine's load.

    python bench/bench_generate.py                           # 32 prompts x 8 samples, 64 tokens
    python bench/bench_generate.py --backends hf --prompts 8   # quick, no vLLM start
    python bench/bench_generate.py --model Qwen/Qwen2.5-1.5B-Instruct --max-new-tokens 256
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="model id, path or embedded name")
    p.add_argument("--prompts", type=int, default=32, help="number of distinct prompts")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sample")
    p.add_argument("--backends", default="plain,hf,vllm", help="comma list of plain, hf, vllm")
    p.add_argument("--device", default=None, help="cuda / cpu (default: best available)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def make_prompts(k):
    import importlib
    prep = importlib.import_module("00_prepare_data")
    return [common.actor_messages(row["question"]) for row in prep.generate_builtin(k, seed=123)]


def count_tokens(tokenizer, outputs):
    return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for o in outputs for t in o)


def plain_loop(engine, prompts, args):
    """What one writes first: one generate call per prompt, n samples each, no batching."""
    import torch
    model, tok = common.load_model(engine.path, engine.device, engine.dtype)
    outputs = []
    for i, p in enumerate(prompts):
        enc = tok(engine.render(p), return_tensors="pt", add_special_tokens=False).to(engine.device)
        torch.manual_seed(i)
        with torch.inference_mode():
            gen = model.generate(**enc, do_sample=True, temperature=0.7, top_k=None,
                                 max_new_tokens=args.max_new_tokens,
                                 num_return_sequences=args.n, pad_token_id=tok.pad_token_id)
        outputs.append(tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return outputs


def main(args):
    prompts = make_prompts(args.prompts)
    results = {}
    for name in args.backends.split(","):
        t0 = time.time()
        engine = common.Engine(args.model, backend="hf" if name == "plain" else name, device=args.device)
        if name == "plain":
            load = 0.0
            t1 = time.time()
            outputs = plain_loop(engine, prompts, args)
        else:
            engine.generate(prompts[:1], n=1, max_new_tokens=4)  # start the backend, warm it up
            load = time.time() - t0
            t1 = time.time()
            outputs = engine.generate(prompts, n=args.n, temperature=0.7,
                                      max_new_tokens=args.max_new_tokens, desc=name)
        seconds = time.time() - t1
        tokens = count_tokens(engine.tokenizer, outputs)
        results[name] = {"tokens": tokens, "seconds": round(seconds, 2),
                         "tok_s": round(tokens / seconds, 1), "load_s": round(load, 1)}
        engine.close()
    base = results.get("plain", next(iter(results.values())))["tok_s"]
    print(f"\n{args.prompts} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, "
          f"model {args.model}, device {common.pick_device(args.device)}")
    print("| method | tokens | seconds | tokens/s | vs plain loop | start (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tok_s']} | "
              f"{r['tok_s'] / base:.2f}x | {r['load_s']} |")
    if args.out:
        common.write_json_atomic(args.out, results)
    return results


if __name__ == "__main__":
    main(parse_args())
