"""Critic learning curve: train on 50, 100, 200, 400, 800, ... rows, score each on the same unseen problems.

Trains the critic (common.sft_train, as stage 04 does: balanced correct/flawed rows, one seeded
sample per size, each size from the base model) on growing subsets of a critic SFT file, and
scores every point on the same step-labelled paths of problems that never appear in training
(stage 01 paths of the test split: inserted mistakes at known steps, reference solutions, and
actor paths where given). Per point it reports:
  - final-verdict balanced accuracy (mean of the accuracies on correct and on flawed paths),
  - ProcessBench-protocol step-level F1 (common.processbench_scores, as 05: the first step the critic
    marks Wrong must be the labelled first error; correct paths must get none),
  - detection per mistake type (first error step found) and per source of the path, so a
    critic that passes one writer's style without reading the steps shows.
Stops before a size whose estimated training + scoring time would pass --time-limit. Writes
curve.json, curve.md and curve.png into --out-dir (and one model folder per size, resumable).

    python bench/critic_curve.py --train out/default/critic_sft.jsonl \
        --eval out/default/test_paths.jsonl --time-limit 1500           # CPU, ~25 min
    python bench/critic_curve.py --train out/paper/critic_sft.jsonl --eval test_paths.jsonl \
        --sizes 1000,2000,5000,10000,20000,50000 --model Qwen/Qwen2.5-1.5B-Instruct --backend vllm
"""
import argparse
import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

stage04 = importlib.import_module("04_train_critic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="out/default/critic_sft.jsonl", help="critic SFT rows (stage 03)")
    p.add_argument("--eval", nargs="+", default=["out/default/test_paths.jsonl"],
                   help="stage 01 path files of problems the critic never trains on")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="base model of the critic")
    p.add_argument("--sizes", default="50,100,200,400,800,1600,3200",
                   help="training rows per point (comma list, ascending)")
    p.add_argument("--epochs", type=float, default=1, help="epochs at every point")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine, no warmup)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--time-limit", type=float, default=1500,
                   help="seconds for the whole curve; a point that would end past it is not started")
    p.add_argument("--max-new-tokens", type=int, default=384, help="critique length limit when scoring")
    p.add_argument("--out-dir", default="out/curve", help="models and the curve's files")
    common.add_backend_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the row samples and training")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Held-out paths and their labels


def source_of(row: dict) -> str:
    if row["method"] == "rg3":
        return f"inserted mistakes ({'program' if row.get('continuation') == 'program' else 'actor'} continuation)"
    return stage04.SOURCES.get(row["method"], row["method"])


def load_eval(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        for r in common.read_jsonl(path, ("id", "problem_id", "question", "steps", "is_correct", "method"),
                                   nonempty=True):
            label = -1 if r["is_correct"] else (r["error_step"] - 1 if r["method"] == "rg3" else None)
            rows.append({**r, "key": f"{Path(path).stem}:{r['id']}", "label": label,
                         "continuation": "program" if "program" in Path(path).stem else "actor"})
    return rows


# -----------------------------------------------------------------------------
# One point: train, critique the held-out paths, score


def score_point(rows: list[dict], critiques: list[str]) -> dict:
    crits = [common.parse_critique(c, len(r["steps"])) for r, c in zip(rows, critiques)]
    verdict = stage04.score([c.final_correct for c in crits], [bool(r["is_correct"]) for r in rows])
    preds = [-1 if c.first_wrong_step is None else c.first_wrong_step - 1 for c in crits]
    lab = [(p, r["label"]) for p, r in zip(preds, rows) if r["label"] is not None]
    steps = common.processbench_scores([p for p, _ in lab], [l for _, l in lab])
    by_type, by_source = defaultdict(list), defaultdict(list)
    for r, p, c in zip(rows, preds, crits):
        if r["method"] == "rg3":
            by_type[r["error_type"]].append(p == r["label"])
        by_source[source_of(r)].append(c.final_correct == bool(r["is_correct"]))
    return {"balanced_accuracy": verdict["balanced_accuracy"], "verdict": verdict, "step_level": steps,
            "first_error_found_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            "verdict_accuracy_by_source": {s: sum(v) / len(v) for s, v in sorted(by_source.items())},
            "n_by_source": {s: len(v) for s, v in sorted(by_source.items())},
            "malformed": sum(not c.ok for c in crits)}


def run_point(args, n, train_rows, eval_rows, writer) -> dict:
    rows = stage04.sample_train_rows(train_rows, n, True, args.seed)
    folder = Path(args.out_dir) / f"critic-{n}"
    t0 = time.time()
    common.sft_train(args.model, rows, folder, epochs=args.epochs, lr=args.lr,
                     batch_size=args.batch_size, seed=args.seed, logging_steps=10, save_steps=100,
                     device=args.device)
    t_train = time.time() - t0
    done = json.loads((folder / common.SFT_DONE).read_text())
    engine = common.Engine(str(folder), args.backend, args.device)
    tag = f"{n}:{common.sft_data_hash(rows)}:{args.max_new_tokens}"
    t1 = time.time()
    gens = stage04.critique_rows(engine, [{"id": r["key"], "is_correct": r["is_correct"],
                                           "messages": common.critic_messages(r["question"], r["steps"])
                                           + [{"role": "assistant", "content": ""}]} for r in eval_rows],
                                 tag, args.max_new_tokens, writer)
    engine.close()
    point = score_point(eval_rows, [g["critique"] for g in gens])
    point.update(rows=len(rows), train_s=done["metrics"].get("train_runtime") or t_train,
                 score_s=time.time() - t1, train_loss=done["train_loss"])
    return point


# -----------------------------------------------------------------------------
# Report


def write_report(out: Path, points: dict, meta: dict) -> str:
    pct = common.pct
    types = sorted({t for p in points.values() for t in p["first_error_found_by_type"]})
    sources = sorted({s for p in points.values() for s in p["verdict_accuracy_by_source"]})
    head = ["rows", "train s", "balanced acc %", "step F1", "erroneous %", "correct %"] + \
        [f"{t} %" for t in types] + [f"verdict right: {s} %" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, p in points.items():
        sl = p["step_level"]
        cells = [str(n), f"{p['train_s']:.0f}", pct(p["balanced_accuracy"]), pct(sl["f1"]),
                 pct(sl["acc_erroneous"]), pct(sl["acc_correct"])]
        cells += [pct(p["first_error_found_by_type"].get(t)) for t in types]
        cells += [pct(p["verdict_accuracy_by_source"].get(s)) for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    first = next(iter(points.values()), None)
    n_src = ", ".join(f"{s} {c}" for s, c in (first or {}).get("n_by_source", {}).items())
    text = (f"# Critic learning curve\n\nBase model `{meta['model']}`, {meta['epochs']} epoch(s), "
            f"lr {meta['lr']}, batch {meta['batch_size']}, balanced rows from `{meta['train']}` "
            f"({meta['n_train_problems']} problems). Scored on {meta['n_eval']} paths of "
            f"{meta['n_eval_problems']} problems never trained on ({n_src}); "
            f"{meta['n_step_labelled']} step-labelled. Majority class: 50.0% balanced accuracy.\n"
            f"Columns per mistake type: the first error step found (ProcessBench: exact step).\n\n{table}\n")
    common.write_text_atomic(out / "curve.md", text)
    plt = common.pyplot()
    xs = list(points)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [100 * (points[n]["balanced_accuracy"] or 0) for n in xs], "o-", label="final verdict, balanced acc")
    ax.plot(xs, [100 * (points[n]["step_level"]["f1"] or 0) for n in xs], "s-", label="step-level F1 (ProcessBench)")
    for t in types:
        ax.plot(xs, [100 * (points[n]["first_error_found_by_type"].get(t) or 0) for n in xs], ":",
                alpha=0.7, label=f"found: {t}")
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="training rows", ylabel="%", ylim=(0, 100), title="Critic learning curve")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    return table


def main(args):
    start = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(common.int_list(args.sizes))
    train = common.read_jsonl(args.train, ("id", "messages", "problem_id", "is_correct"), nonempty=True)
    eval_rows = load_eval(args.eval)
    # Held-out problems never appear in training: neither by id nor by question text.
    seen = {r["problem_id"] for r in train}
    questions = {m["content"].split("\n\nStudent's solution")[0] for r in train for m in r["messages"]
                 if m["role"] == "user"}
    leaked = [r["id"] for r in eval_rows
              if r["problem_id"] in seen or f"Problem:\n{r['question']}" in questions]
    if leaked:
        raise common.UsageError(f"{len(leaked)} held-out paths are of problems in --train (e.g. {leaked[0]})")
    meta = {"model": args.model, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "train": args.train, "n_train_problems": len({r["problem_id"] for r in train}),
            "n_eval": len(eval_rows), "n_eval_problems": len({r["problem_id"] for r in eval_rows}),
            "n_step_labelled": sum(r["label"] is not None for r in eval_rows)}
    points, per_row_s, score_s = {}, None, 0.0
    with common.ResumableWriter(out / "generations.jsonl", key="key") as writer:
        for n in sizes:
            n_rows = len(stage04.sample_train_rows(train, n, True, args.seed))
            if points and n_rows == points[max(points)]["rows"]:
                break  # the data holds no more balanced rows
            if per_row_s is not None:
                eta = per_row_s * n_rows + score_s
                if time.time() - start + eta > args.time_limit:
                    print(f"[curve] stop before {n} rows: about {eta:.0f} s more would pass "
                          f"--time-limit {args.time_limit:.0f} s")
                    break
            p = run_point(args, n, train, eval_rows, writer)
            points[n] = p
            per_row_s, score_s = p["train_s"] / p["rows"], p["score_s"]
            print(f"[curve] {n} rows: balanced acc {common.pct(p['balanced_accuracy'])}, step F1 "
                  f"{common.pct(p['step_level']['f1'])}, train {p['train_s']:.0f} s, score {p['score_s']:.0f} s")
            common.write_json_atomic(out / "curve.json", {"meta": meta, "points": points})
            write_report(out, points, meta)
    if points:
        print(write_report(out, points, meta))
    meta["wall_s"] = time.time() - start
    common.write_json_atomic(out / "curve.json", {"meta": meta, "points": points})
    return points


if __name__ == "__main__":
    common.run_cli(main, parse_args)
