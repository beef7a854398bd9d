"""Stage 3 of AutoMathCritique: keep only the critiques that help the actor.

For every (question, flawed path, critique) the actor refines the path N times with the critique
in its prompt (common.refine_messages); the critique is kept iff at least k refinements reach the
gold answer. Correct paths with their all-correct critiques need no test and pass straight
through (flagged `"passthrough": true`), so the critic also learns to say "Correct".

Reads `out/annotations.jsonl` (stage 2) and, when present, `out/annotations.stats.json` and
`out/paths.stats.json` (only for the table). Writes into `--out-dir` (default `out/`):
  refinements.jsonl  progress, one row per refined critique {"id", "answers", "n_correct", "kept",
                     "refinement" (the first correct one or null)}; a killed run resumes
                     from it and the SFT files below are rebuilt from it at the end, so a rerun
                     never duplicates a row. `kept` is recomputed with the current --k, so changing
                     k alone needs no new generation. refinements.config.json holds the actor
                     settings it was made with; other settings on the same folder are refused.
  critic_sft.jsonl   {"id", "messages": critic_messages + [assistant: critique], "problem_id",
                     "method", "is_correct", "difficulty", "passthrough"}: the critic's SFT data.
  refine_sft.jsonl   {"id", "messages": refine_messages + [assistant: a correct refinement],
                     "problem_id", "difficulty"}: the actor's refinement data (one per kept critique).
  critic_sft.stats.json / .md / .png   paths per method, annotation validity, kept rate per
                     method and per difficulty, verdict balance of the critic data (stats of a
                     stage sit next to its main output as `<stem>.stats.*`, as in 01 and 02).

Where the paper is silent: it does not publish N or k. Defaults N=4, k=1 (one correct refinement
is enough evidence that the critique points somewhere useful); at scale N=8, k=2 is stricter.
A weak actor (the embedded 135M model) almost never refines correctly, so with k >= 1 nearly every
flawed critique is dropped: that is the honest paper rule and the kept rate says so. `--k 0`
turns the filter off: every valid critique is kept and the refinement pass is skipped entirely;
use it to build critic data when the actor is too weak to judge helpfulness.

    python 03_filter.py                       # CPU, embedded actor, N=4, k=1
    python 03_filter.py --k 0                 # no filter: keep every valid critique
    python 03_filter.py --actor meta-llama/Meta-Llama-3-8B-Instruct --backend vllm --n 8 --k 2
"""
import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import common

FIELDS = ["id", "problem_id", "question", "steps", "gold_answer", "method", "is_correct",
          "difficulty", "critique"]

# -----------------------------------------------------------------------------
# The filter rule and the refinement kept for training

def keep_critique(n_correct: int, k: int) -> bool:
    """Paper rule: a critique is helpful iff at least k of the N refinements are correct."""
    if k < 0 or n_correct < 0:
        raise ValueError(f"n_correct and k must be >= 0, got {n_correct}, {k}")
    return n_correct >= k


def select_refinement(texts: list[str], correct: list[bool]) -> str | None:
    """The first correct refinement (at most one per critique, as in the paper), else None."""
    return next((t for t, ok in zip(texts, correct) if ok), None)


def refinement_record(row: dict, texts: list[str], k: int) -> dict:
    """(annotation row, its N refinement texts) -> the progress record."""
    checks = [common.check_solution(t, row["gold_answer"]) for t in texts]
    correct = [ok for _, ok in checks]
    n_correct = sum(correct)
    return {"id": row["id"], "answers": [a for a, _ in checks], "n_correct": n_correct,
            "kept": keep_critique(n_correct, k), "refinement": select_refinement(texts, correct)}


def classify(row: dict) -> str:
    """'passthrough', 'flawed' (to be refined) or 'unusable: <why>' (label and critique disagree)."""
    crit = common.parse_critique(row["critique"], len(row["steps"]))
    if not crit.ok:
        return "unusable: malformed critique"
    if row["is_correct"]:
        all_ok = crit.final_correct and crit.first_wrong_step is None
        return "passthrough" if all_ok else "unusable: correct path judged wrong"
    if crit.final_correct is not False:
        return "unusable: flawed path judged correct"
    return "flawed"


# -----------------------------------------------------------------------------
# SFT data and statistics (pure: annotations + progress records -> rows / numbers)

def build_sft(annotations: list[dict], records: dict, k: int) -> tuple[list[dict], list[dict]]:
    critic, refine = [], []
    for row in annotations:
        kind = classify(row)
        rec = records.get(row["id"])
        if kind == "flawed":
            kept = k == 0 or (rec is not None and keep_critique(rec["n_correct"], k))
        else:
            kept = kind == "passthrough"
        if not kept:
            continue
        critic.append({"id": row["id"],
                       "messages": common.critic_messages(row["question"], row["steps"])
                       + [{"role": "assistant", "content": row["critique"]}],
                       "problem_id": row["problem_id"], "method": row["method"],
                       "is_correct": row["is_correct"], "difficulty": row["difficulty"],
                       "passthrough": kind == "passthrough"})
        if kind == "flawed" and rec is not None and rec.get("refinement"):
            boxed = common.is_boxed_style(row)
            msgs = common.refine_messages(row["question"], row["steps"], row["critique"], boxed)
            refine.append({"id": row["id"],
                           "messages": msgs + [{"role": "assistant", "content": rec["refinement"]}],
                           "problem_id": row["problem_id"], "difficulty": row["difficulty"]})
    return critic, refine


def _rate(kept: int, n: int) -> float | None:
    return round(kept / n, 4) if n else None


def compute_stats(annotations: list[dict], records: dict, k: int, critic_rows: list[dict],
                  refine_rows: list[dict], paths_stats: dict | None = None,
                  ann_stats: dict | None = None, filter_label: str = "") -> dict:
    by_method = defaultdict(lambda: defaultdict(int))
    by_diff = defaultdict(lambda: defaultdict(int))
    by_md = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    unusable = defaultdict(int)
    kept_ids = {r["id"] for r in critic_rows}
    for row in annotations:
        kind, m, d = classify(row), row["method"], str(row["difficulty"] or "none")
        by_method[m]["annotations"] += 1
        if kind.startswith("unusable"):
            unusable[kind.split(": ", 1)[1]] += 1
            by_method[m]["unusable"] += 1
        elif kind == "passthrough":
            by_method[m]["passthrough"] += 1
        else:
            judged = k == 0 or row["id"] in records
            kept = row["id"] in kept_ids
            for bucket in (by_method[m], by_diff[d], by_md[m][d]):
                bucket["flawed"] += 1
                bucket["judged"] += judged
                bucket["kept"] += kept
    cells = (b for v in by_md.values() for b in v.values())
    for bucket in [*by_method.values(), *by_diff.values(), *cells]:
        bucket["kept_rate"] = _rate(bucket["kept"], bucket["judged"])
    verdicts = [common.parse_critique(r["messages"][-1]["content"]).final_correct for r in critic_rows]
    paths = {}
    for src in (paths_stats, ann_stats):  # paths per method: stage 1's count, else stage 2's
        for m, v in ((src or {}).get("by_method") or {}).items():
            n = v if isinstance(v, int) else (v or {}).get("paths")
            if isinstance(n, int):
                paths.setdefault(m, n)
    as_dict = lambda d: {key: dict(v) for key, v in sorted(d.items())}
    return {"filter": filter_label, "k": k, "paths_by_method": paths,
            "annotation": {key: ann_stats.get(key) for key in
                           ("paths", "kept", "dropped", "dropped_reasons", "by_method")}
            if ann_stats else None,
            "by_method": as_dict(by_method), "by_difficulty": as_dict(by_diff),
            "by_method_difficulty": {m: as_dict(v) for m, v in sorted(by_md.items())},
            "unusable": dict(unusable),
            "critic_sft": {"rows": len(critic_rows), "verdict_correct": verdicts.count(True),
                           "verdict_wrong": verdicts.count(False),
                           "share_wrong": _rate(verdicts.count(False), len(verdicts))},
            "refine_sft": {"rows": len(refine_rows)}}


def stats_markdown(s: dict) -> str:
    fmt = common.pct
    ann = (s["annotation"] or {}).get("by_method") or {}
    judged = "refined" if s["k"] else "judged"  # filter off: nothing is refined
    lines = [f"# Stage 3 filter: {s['filter']}", "",
             "| method | paths | annotated valid | annotation dropped | passthrough (correct) "
             f"| flawed | {judged} | kept | kept rate % |", "|---|---|---|---|---|---|---|---|---|"]
    for m, b in s["by_method"].items():
        a = ann.get(m) or {}
        lines.append(f"| {m} | {s['paths_by_method'].get(m, '-')} | {a.get('kept', b['annotations'])} "
                     f"| {a.get('dropped', '-')} | {b.get('passthrough', 0)} | {b.get('flawed', 0)} "
                     f"| {b.get('judged', 0)} | {b.get('kept', 0)} | {fmt(b.get('kept_rate'))} |")
    lines += ["", f"| difficulty | flawed | {judged} | kept | kept rate % |", "|---|---|---|---|---|"]
    for d, b in sorted(s["by_difficulty"].items()):
        lines.append(f"| {d} | {b['flawed']} | {b['judged']} | {b['kept']} | {fmt(b['kept_rate'])} |")
    c = s["critic_sft"]
    lines += ["", f"Critic data: {c['rows']} rows, final verdict Correct {c['verdict_correct']} / "
              f"Wrong {c['verdict_wrong']} (share Wrong {fmt(c['share_wrong'])}%). "
              f"Refinement data: {s['refine_sft']['rows']} rows."]
    if s["annotation"]:
        lines.append(f"Annotation (stage 2): {s['annotation']['kept']} valid, "
                     f"{s['annotation']['dropped']} dropped {s['annotation']['dropped_reasons'] or ''}.")
    if s["unusable"]:
        lines.append(f"Skipped here (critique disagrees with the label): {s['unusable']}.")
    return "\n".join(lines) + "\n"


def plot_stats(s: dict, path: Path) -> None:
    plt = common.pyplot()
    diffs = sorted({d for v in s["by_method_difficulty"].values() for d in v})
    methods = list(s["by_method_difficulty"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        rates = [(s["by_method_difficulty"][m].get(d) or {}).get("kept_rate") or 0 for d in diffs]
        ax.bar([x + i * width for x in range(len(diffs))], [100 * r for r in rates], width, label=m)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(diffs))], diffs)
    ax.set(xlabel="difficulty", ylabel="kept critiques (%)", ylim=(0, 105),
           title=f"Flawed-path critiques kept ({s['filter']})")
    if methods:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", default="out/annotations.jsonl", help="stage 2 output")
    p.add_argument("--annotation-stats", default=None,
                   help="stage 2 stats (default: annotations.stats.json next to --annotations)")
    p.add_argument("--paths-stats", default=None,
                   help="stage 1 stats (default: paths.stats.json next to --annotations)")
    p.add_argument("--out-dir", default="out", help="where the SFT files, progress and stats go")
    p.add_argument("--actor", default=common.DEFAULT_MODEL, help="model that refines the paths")
    common.add_backend_args(p)
    p.add_argument("--n", type=common.positive, default=4, help="refinements per critique (paper's N)")
    p.add_argument("--k", type=common.count, default=1,
                   help="keep a critique iff >= k refinements are correct; 0 = filter off")
    p.add_argument("--temperature", type=float, default=0.7, help="actor sampling temperature")
    p.add_argument("--max-new-tokens", type=common.positive, default=256,
                   help="length limit of one refinement")
    p.add_argument("--chunk-size", type=common.positive, default=64,
                   help="critiques per generate call (progress is saved per chunk)")
    p.add_argument("--seed", type=int, default=0, help="base seed, mixed with each chunk's row ids")
    p.add_argument("--limit", type=common.count, default=0,
                   help="use only the first N annotation rows (0 = all)")
    return p.parse_args(argv)


def read_optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def main(args):
    start = time.time()
    ann_path, out = Path(args.annotations), Path(args.out_dir)
    annotations = common.take(common.read_jsonl(ann_path, FIELDS, nonempty=True), args.limit)
    ids = [r["id"] for r in annotations]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise common.UsageError(f"{ann_path}: duplicate id {dup!r}")

    # Refine every flawed path N times with its critique; progress is saved per chunk.
    with common.ResumableWriter(out / "refinements.jsonl") as writer:
        if args.k > 0:
            common.guard_config(out / "refinements.config.json", {
                "actor": args.actor, "n": args.n, "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens})
            todo = [r for r in annotations if classify(r) == "flawed" and r["id"] not in writer]
            print(f"refining {len(todo)} critiques x {args.n} ({len(writer.rows)} done before)")
            if todo:
                engine = common.get_engine(args.actor, args.backend, args.device)
                engine.plan(len(todo) * args.n, args.max_new_tokens)
            for c in range(0, len(todo), args.chunk_size):
                rows = todo[c:c + args.chunk_size]
                prompts = [common.refine_messages(r["question"], r["steps"], r["critique"],
                                                  common.is_boxed_style(r)) for r in rows]
                outs = engine.generate(prompts, n=args.n, temperature=args.temperature,
                                       max_new_tokens=args.max_new_tokens,
                                       seed=args.seed + common.stable_seed(*(r["id"] for r in rows)),
                                       desc=f"refine {c + len(rows)}/{len(todo)}")
                for r, texts in zip(rows, outs):
                    writer.write(refinement_record(r, texts, args.k))
        records = {r["id"]: r for r in writer.rows}

    # Rebuild the outputs from annotations + progress (whole files, write-then-rename).
    critic_rows, refine_rows = build_sft(annotations, records, args.k)
    common.write_jsonl_atomic(out / "critic_sft.jsonl", critic_rows)
    common.write_jsonl_atomic(out / "refine_sft.jsonl", refine_rows)
    label = "filter off (k=0, every valid critique kept)" if args.k == 0 else \
        f"N={args.n}, k={args.k}, actor {args.actor}"
    paths_stats = Path(args.paths_stats or ann_path.with_name("paths.stats.json"))
    ann_stats = Path(args.annotation_stats or ann_path.with_name(ann_path.stem + ".stats.json"))
    stats = compute_stats(annotations, records, args.k, critic_rows, refine_rows,
                          read_optional_json(paths_stats), read_optional_json(ann_stats), label)
    common.write_json_atomic(out / "critic_sft.stats.json", stats)
    common.write_text_atomic(out / "critic_sft.stats.md", stats_markdown(stats))
    plot_stats(stats, out / "critic_sft.stats.png")
    print(stats_markdown(stats))
    print(f"done in {time.time() - start:.1f}s -> {out}/critic_sft.jsonl, refine_sft.jsonl")
    return stats


if __name__ == "__main__":
    common.run_cli(main, parse_args)
