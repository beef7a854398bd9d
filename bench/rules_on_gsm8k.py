"""The rules checker (02_annotate.py's rules annotator) on real GSM8K reference solutions.

Reads a GSM8K-format JSONL file (fields question, answer: the original `<<a*b=c>>` / `#### N`
layout) and converts it as 00_prepare_data.py does. Two measurements:

  false alarms  every reference solution judged as a correct path (as 02 and the `rules` critic
                see one): a reference with any step judged Wrong is a false alarm (target: 0).
  location      for each reference and each mistake type, 01_generate_errors.py's program
                inserter rewrites one `a op b = c` and carries the wrong value forward
                (`--rg3-continue program`); paths whose answer stays right are skipped, as 01
                drops them. The first step judged Wrong must be the inserted one: reported
                per type as located / early (a correct step flagged before it) / late.

Location is scored two ways: as the critic of 05/06/07 sees a path (gold answer and reference
known, error location not: the ProcessBench protocol) and as 02 annotates an RG3 path (the
location and type are known too). The ProcessBench F1 over references (label -1) and inserted
mistakes is printed for the critic view. Nothing is evaluated as code; the checker is exact.

    python bench/rules_on_gsm8k.py path/to/gsm8k_train.jsonl
    python bench/rules_on_gsm8k.py path/to/gsm8k_train.jsonl --limit 500 --show 10 --json out/rules_gsm8k.json
"""
import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

prep = common.load_stage_module("00_prepare_data")
errors = common.load_stage_module("01_generate_errors")
annotate = common.load_stage_module("02_annotate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="GSM8K-format JSONL (question, answer ending in '#### N')")
    p.add_argument("--limit", type=common.count, default=0, help="first N problems only (0 = all)")
    p.add_argument("--types", default=",".join(errors.MISTAKES),
                   help="comma list of mistake types for the program inserter")
    p.add_argument("--seed", type=int, default=0, help="seed of the inserter's random choices")
    p.add_argument("--show", type=common.count, default=5,
                   help="print this many examples of each kind of miss (false alarm, early, late)")
    p.add_argument("--json", help="also write the counts (and the shown examples) to this JSON file")
    return p.parse_args(argv)


def reference_path(problem: dict) -> dict:
    """The reference solution as 01 writes it as a path (method `reference`)."""
    steps = [errors.normalize_step(s) for s in problem["reference_steps"]]
    answer, ok = common.check_solution(common.join_steps(steps), problem["answer"])
    return {"id": problem["id"], "question": problem["question"], "reference_steps": problem["reference_steps"],
            "gold_answer": problem["answer"], "method": "reference", "steps": steps, "answer": answer,
            "is_correct": ok, "error_step": None, "error_type": None}


def inserted_path(ref: dict, kind: str, rng: random.Random) -> dict | None:
    """ref with one mistake of `kind` inserted and carried forward, or None when the type does
    not apply to any step or the carried-forward answer is still right."""
    found = errors.program_insert(ref["steps"], ref["question"], [kind], rng)
    if found is None:
        return None
    k, new, used, _ = found
    steps = errors.carry_forward(ref["steps"], k, new)
    answer, ok = common.check_solution(common.join_steps(steps), ref["gold_answer"])
    if ok:
        return None
    return {**ref, "method": "rg3", "steps": steps, "answer": answer, "is_correct": False,
            "error_step": k, "error_type": used}


def first_wrong(row: dict) -> int | None:
    review = annotate.rules_review(row)
    return next((i for i, ok in enumerate(review.step_correct, 1) if not ok), None)


def example(row: dict, first: int | None, k: int | None) -> dict:
    return {"id": row["id"], "type": row.get("error_type"), "inserted_at": k,
            "first_wrong": first, "steps": row["steps"],
            "explanation": annotate.rules_review(row).explanations[first - 1] if first else None}


def main(args):
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in errors.MISTAKES]
    if unknown:
        raise common.UsageError(f"--types: the program inserter knows {list(errors.MISTAKES)}, not {unknown}")
    raw = common.take(list(common.iter_jsonl(args.data, prep.REQUIRED["gsm8k"])), args.limit)
    problems = [dict(prep.convert_gsm8k(row, where), id=f"gsm8k-{i}") for i, (where, row) in enumerate(raw)]
    start = time.time()
    counts = {"references": len(problems), "reference_answer_unmatched": 0, "false_alarms": 0,
              "false_alarm_steps": 0, "steps": 0}
    by_type = {view: defaultdict(Counter) for view in ("critic", "annotator")}
    shown = defaultdict(list)
    preds, labels = [], []
    for p in problems:
        ref = reference_path(p)
        counts["steps"] += len(ref["steps"])
        counts["reference_answer_unmatched"] += not ref["is_correct"]
        verdicts = annotate.rules_review(ref).step_correct
        wrong = [i for i, ok in enumerate(verdicts, 1) if not ok]
        counts["false_alarms"] += bool(wrong)
        counts["false_alarm_steps"] += len(wrong)
        preds.append(wrong[0] - 1 if wrong else -1)
        labels.append(-1)
        if wrong and len(shown["false alarm"]) < args.show:
            shown["false alarm"].append(example(ref, wrong[0], None))
        for kind in types:
            row = inserted_path(ref, kind, random.Random(common.stable_seed(args.seed, p["id"], kind)))
            if row is None:
                by_type["critic"][kind]["not inserted"] += 1
                continue
            k = row["error_step"]
            for view, seen in (("critic", {**row, "method": "sample", "error_step": None}), ("annotator", row)):
                first = first_wrong(seen)
                outcome = "located" if first == k else "early" if first is not None and first < k else "late"
                by_type[view][row["error_type"]][outcome] += 1
                if view == "critic":
                    preds.append(first - 1 if first else -1)
                    labels.append(k - 1)
                    if outcome != "located" and len(shown[outcome]) < args.show:
                        shown[outcome].append(example(seen, first, k))
    counts["seconds"] = round(time.time() - start, 1)
    pb = common.processbench_scores(preds, labels)

    n = counts["references"]
    print(f"{n} reference solutions ({counts['steps']} steps, {counts['seconds']} s): "
          f"{counts['false_alarms']} false alarms ({common.pct(common.ratio(counts['false_alarms'], n))}%), "
          f"{counts['false_alarm_steps']} steps judged Wrong; "
          f"{counts['reference_answer_unmatched']} references whose answer did not match their gold")
    for view in ("critic", "annotator"):
        print(f"\ninserted mistakes, {view} view (located / early / late of inserted; not inserted):")
        for kind in types:
            c = by_type[view][kind]
            made = c["located"] + c["early"] + c["late"]
            print(f"  {kind:28} {c['located']:>6} / {c['early']:>5} / {c['late']:>5} of {made:>6}"
                  f"  ({common.pct(common.ratio(c['located'], made))}% located)"
                  + (f"; {by_type['critic'][kind]['not inserted']} not inserted" if view == "critic" else ""))
    print(f"\nProcessBench protocol, critic view: erroneous {common.pct(pb['acc_erroneous'])}%, "
          f"correct {common.pct(pb['acc_correct'])}%, F1 {common.pct(pb['f1'])}")
    for what, rows in shown.items():
        print(f"\n-- {what}, {len(rows)} examples")
        for r in rows:
            print(f"{r['id']} ({r['type'] or 'reference'}, inserted at {r['inserted_at']}, first Wrong {r['first_wrong']}):")
            for i, s in enumerate(r["steps"], 1):
                print(f"   {i}{'*' if i == r['first_wrong'] else ' '} {s}")
            print(f"   -> {r['explanation']}")
    if args.json:
        common.write_json_atomic(args.json, {**counts, "processbench": pb, "examples": shown,
                                             "by_type": {v: {k: dict(c) for k, c in t.items()}
                                                         for v, t in by_type.items()}})
    return counts, by_type, pb


if __name__ == "__main__":
    common.run_cli(main, parse_args)
