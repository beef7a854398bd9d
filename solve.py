"""Sample the actor on a problem file and report its accuracy: the baseline every stage builds on.

Reads problems in 00's schema; writes one row per (problem, sample) to --out (resumable) and
prints accuracy with a 95% interval, majority-vote accuracy when --n > 1, and how many samples
stated no answer at all.

    python 00_prepare_data.py && python solve.py --limit 8
    python solve.py --problems data/gsm8k_test.jsonl --n 4 --out out/solve_gsm8k.jsonl
    python solve.py --actor Qwen/Qwen2.5-1.5B-Instruct --backend vllm --n 16 --max-new-tokens 1024
    python solve.py --backend openai --base-url http://localhost:8000/v1 --n 4   # after `vllm serve MODEL`
"""
import argparse
from collections import defaultdict

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="data/builtin_test.jsonl", help="problems JSONL (00's schema)")
    p.add_argument("--limit", type=common.count, default=0, help="only the first N problems (0 = all)")
    p.add_argument("--actor", default=None, help="HF model id, local path or 'smollm2-135m' (the default); "
                   "with --backend openai the served model's name (default: the one served)")
    common.add_backend_args(p, served=True)
    p.add_argument("--n", type=common.positive, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=common.positive, default=256, help="generation budget per sample")
    common.add_fewshot_args(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="write every sample here (JSONL, resumable)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    return p.parse_args(argv)


def main(args):
    problems = common.take(common.read_jsonl(args.problems, ("id", "question", "answer"),
                                             nonempty=True), args.limit)
    pool = common.load_fewshot_pool(args)
    writer = common.ResumableWriter(args.out) if args.out else None
    done = writer.done if writer else set()
    # A problem's n samples are written together; the last one marks the problem done.
    todo = [p for p in problems if f"{p['id']}:{args.n - 1}" not in done]
    new_rows = []
    if todo:
        engine = common.engine_from_args(args, args.actor, trust_remote_code=args.trust_remote_code)
        prompts = [common.solve_messages(p, pool, args.fewshot, args.seed) for p in todo]
        outputs = engine.generate(prompts, n=args.n, temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed, desc="solve")
        for p, texts in zip(todo, outputs):
            for j, text in enumerate(texts):
                pred, ok = common.check_solution(text, p["answer"])
                row = {"id": f"{p['id']}:{j}", "problem_id": p["id"], "solution": text,
                       "answer": pred, "is_correct": ok, "difficulty": p.get("difficulty")}
                new_rows.append(row)
                if writer:
                    writer.write(row)
    if writer:
        writer.close()

    by_problem = defaultdict(dict)
    for row in (writer.rows if writer else new_rows):
        by_problem[row["problem_id"]][row["id"]] = row
    groups = [list(by_problem[p["id"]].values())[:args.n] for p in problems]
    rows = [r for g in groups for r in g]
    acc, lo, hi = common.accuracy_ci(sum(r["is_correct"] for r in rows), len(rows))
    no_answer = sum(r["answer"] is None for r in rows)
    print(f"{len(problems)} problems x {args.n} samples: accuracy {acc:.1%} "
          f"[{lo:.1%}, {hi:.1%}], no answer stated in {no_answer}/{len(rows)}")
    result = {"accuracy": acc, "n": len(rows), "no_answer": no_answer}
    if args.n > 1:
        mv = sum(common.answers_match(p["answer"], common.majority_vote([r["answer"] for r in g]))
                 for p, g in zip(problems, groups))
        result["majority_vote"] = mv / max(len(problems), 1)
        print(f"majority vote over {args.n}: {mv}/{len(problems)} = {result['majority_vote']:.1%}")
    return result


if __name__ == "__main__":
    common.run_cli(main, parse_args)
