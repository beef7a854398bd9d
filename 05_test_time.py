"""Stage 5: the critic at test time -- does it spot wrong answers, does its feedback help the
actor, and does critique + refine beat plain majority voting at the same generation budget?

Reads a test split (`--problems`, the stage-0 schema: builtin, gsm8k or math rows) and samples an
actor and a critic on it. Writes under `--out-dir` (default out/test_time):
  generations/{samples,critiques,refinements}.jsonl  raw model text keyed by id (the resume cache;
                                                     metrics are always recomputed from it)
  metrics.json, metrics.md, by_difficulty.png, scaling.png, per_problem.jsonl (answers, verdicts, bin)
With `--processbench SOURCE...` the critic also judges step-labelled solutions (generations/
processbench.jsonl, processbench.json, processbench.md, processbench_predictions.jsonl with one
prediction per row, and a section of metrics.md); `--processbench-only` runs just that. A source
is the hub dataset `Qwen/ProcessBench` (all four splits, or `Qwen/ProcessBench:gsm8k,math`),
loaded with `datasets` when online, a folder laid out like it, or local files: JSON arrays as the
release ships them (gsm8k.json, ...) or JSONL, one subset per file stem unless a row has "subset".
With `--backend openai` the actor is a model served by any OpenAI-compatible server
(`vllm serve MODEL`) at --base-url; a served critic is `--critic api:NAME --critic-url URL`.

What is measured (paper, "Test time"):
1. Discrimination: the critic (`--critic`, common.make_critic; a model critic never sees the
   gold answer) judges the first max(K) actor samples of every problem; its final verdict vs
   the truth, "Wrong" as the positive class.
   Step level: ProcessBench rows {"id", "generator", "problem", "steps", "final_answer_correct",
   "label" (0-based earliest wrong step, -1 if none)} or stage-1 `out/paths.jsonl` rows (rg3:
   label = error_step - 1; a correct rg1/rg2 path: -1; wrong rg1/rg2 paths have no exact label
   and are skipped). The prediction is the first step the critic marks Wrong, -1 if it finds the
   solution correct, none if its critique says neither. Per subset (the split; "subset" field,
   else the file stem): accuracy on erroneous samples (prediction = label) and on correct ones
   (prediction = -1), F1 = their harmonic mean, and the average F1 over subsets (the ProcessBench
   protocol). A solution whose critic prompt plus --critic-max-new-tokens exceeds the critic's
   context is not sent (nothing is cut); it is counted per subset and scored as a miss, like a
   prompt a served critic refuses.
2. Critique -> refine: sample 0 of each problem is critiqued and refined once, the refinement's
   answer replaces the original; the oracle replaces only originally wrong answers (upper bound).
   Broken down by difficulty bins from the actor's pass rate over its first --difficulty-samples.
3. Scaling at equal budget, counting every solve, critique and refinement as one generation:
   actor-only majority vote over 3K samples (3K); parallel, K samples each critiqued and refined,
   majority over the K refinements (3K); sequential, K critique->refine rounds on sample 0, scored
   by majority over the K round answers or by the last round (1 + 2K). One pool of
   max(3K, --difficulty-samples) actor samples serves everything: actor-only takes prefixes,
   parallel the first K, sequential round 1 is parallel's sample 0.

Choices where the paper is silent:
- Difficulty bins are equal-width in pass rate (bin 1 = [0.8, 1], ..., bin 5 = [0, 0.2)), not
  quantiles, so bins mean the same thing for every actor; a weak actor fills bin 5 (counts shown).
- A critique without a final verdict counts as a wrong discrimination and as not flagging
  "Wrong"; the refinement still gets its raw text, as a user would pass it on.
- acc = what a user running the method once gets (prefix majority vote); pass@k / MV@k are the
  lower-variance estimates over the whole pool (common.pass_at_k, common.mv_at_k) where samples
  are exchangeable (actor-only, parallel); sequential rounds are ordered, so they use prefixes.

    python 05_test_time.py --limit 20                      # the trained critic from 04 (out/critic)
    python 05_test_time.py --limit 20 --critic rules       # the exact reference-aware checker (an oracle-like critic)
    python 05_test_time.py --processbench-only --processbench Qwen/ProcessBench --critic out/critic
    python 05_test_time.py --processbench-only --processbench path/to/gsm8k.json path/to/math.json
    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000      # then, in another shell:
    python 05_test_time.py --backend openai --base-url http://localhost:8000/v1 --critic api: \\
        --critic-url http://localhost:8000/v1 --limit 20
    python 05_test_time.py --actor meta-llama/Meta-Llama-3-8B-Instruct --critic out/critic \\
        --backend vllm --limit 0 --k-values 1,2,4,8,16,32 --difficulty-samples 32 \\
        --actor-max-new-tokens 1024 --critic-max-new-tokens 1536
"""
import argparse
import re
import time
from collections import Counter
from pathlib import Path

import common
from common import (ResumableWriter, accuracy_summary, answer_classes, bin_range, check_solution, ci_str,
                    difficulty_bins, f1_score, majority_class, mv_at_k, parse_critique, pass_at_k,
                    processbench_by_subset, processbench_scores, ratio, split_steps)

METHODS = ("actor", "parallel", "sequential", "sequential-last")
LABELS = {"actor": "actor-only MV (3K samples)", "parallel": "parallel: K x (solve, critique, refine), MV",
          "sequential": "sequential: K rounds, MV over rounds",
          "sequential-last": "sequential: K rounds, last round"}

# -----------------------------------------------------------------------------
# The pipeline: one pool of actor samples, then K critique -> refine rounds, each round a few
# batched generate calls over all problems


def load_problems(path: str, limit: int | None) -> list[dict]:
    return common.take(common.read_jsonl(path, required=("id", "question", "answer")), limit)


def round_chains(pids: list[str], r: int, kmax: int) -> list[tuple[str, int]]:
    """(problem, j) pairs of round r: round 1 critiques and refines the first kmax samples
    (parallel); later rounds continue chain 0 only (sequential)."""
    return [(pid, j) for pid in pids for j in (range(kmax) if r == 1 else [0])]


def round_id(pid: str, r: int, j: int) -> str:
    """Key of round r on chain j: its critique and its refinement are cached under it."""
    return f"{pid}:{r}:{j}"


def sample_id(pid: str, j: int) -> str:
    return f"{pid}:sample:{j}"


def plan_engines(actor, critic, n_samples: int, n_rounds: int, args) -> None:
    """Backend "auto" chooses on all the work left (a resumed run has less), not on one chunk.
    The actor writes the samples and one refinement per round; the critic one critique."""
    if critic.kind == "model" and critic.engine is not actor:
        actor.plan(n_samples + n_rounds, args.actor_max_new_tokens)
        critic.engine.plan(n_rounds, args.critic_max_new_tokens)
    else:  # one engine does everything, or the critic is not a local model
        work = n_samples + n_rounds * (2 if critic.kind == "model" else 1)
        actor.plan(work, max(args.actor_max_new_tokens, args.critic_max_new_tokens))


def generate_all(args, problems, critic, pool, kmax) -> dict:
    """{"samples": {sample_id: text}, "critiques" / "refinements": {round_id: text}}."""
    gen_dir = Path(args.out_dir) / "generations"
    common.guard_config(gen_dir / "config.json", {
        "actor": args.actor, "critic": critic.name, "temperature": args.temperature, "seed": args.seed,
        "fewshot": args.fewshot, "fewshot_pool": Path(args.fewshot_pool).name if args.fewshot else None,
        "actor_max_new_tokens": args.actor_max_new_tokens, "critic_max_new_tokens": args.critic_max_new_tokens})
    actor = common.engine_from_args(args, args.actor)
    by_id = {p["id"]: p for p in problems}
    pids = list(by_id)
    with ResumableWriter(gen_dir / "samples.jsonl") as sw, ResumableWriter(gen_dir / "critiques.jsonl") as cw, \
            ResumableWriter(gen_dir / "refinements.jsonl") as rw:
        n_samples = sum(sample_id(pid, j) not in sw for pid in pids for j in range(pool))
        n_rounds = sum(round_id(pid, r, j) not in rw
                       for r in range(1, kmax + 1) for pid, j in round_chains(pids, r, kmax))
        if n_samples + n_rounds:
            print(f"{n_samples} actor samples and {n_rounds} critique -> refine steps to do")
            plan_engines(actor, critic, n_samples, n_rounds, args)
        shots = common.load_fewshot_pool(args)
        jobs = [([sample_id(pid, j) for j in range(pool)], common.solve_messages(p, shots, args.fewshot, args.seed))
                for pid, p in by_id.items()]
        samples = common.cached_generate(actor, sw, jobs, args.chunk_size, "actor samples", args.seed,
                                         temperature=args.temperature, max_new_tokens=args.actor_max_new_tokens)
        for r in range(1, kmax + 1):
            # round 1 judges the actor's samples; round r > 1 the previous round's refinement
            judged = {row["id"]: row["text"] for row in rw.rows}
            items = [{"id": round_id(pid, r, j), "question": by_id[pid]["question"],
                      "steps": split_steps(samples[sample_id(pid, j)] if r == 1 else judged[round_id(pid, r - 1, j)]),
                      "boxed": common.is_boxed_style(by_id[pid]),
                      "reference_steps": by_id[pid].get("reference_steps") or [],
                      "gold_answer": str(by_id[pid]["answer"])}
                     for pid, j in round_chains(pids, r, kmax)]
            common.critique_and_refine(actor, critic, items, temperature=args.temperature,
                                       max_new_tokens=args.actor_max_new_tokens, seed=args.seed + 1000 * r,
                                       critique_writer=cw, refine_writer=rw, chunk_size=args.chunk_size,
                                       desc=f"round {r}")
        return {"samples": samples, "critiques": {row["id"]: row["text"] for row in cw.rows},
                "refinements": {row["id"]: row["text"] for row in rw.rows}}


def grade(texts: list[str], gold: str) -> dict:
    """Answers, correctness and answer classes (equivalent answers share a class) of solutions."""
    answers, correct = zip(*(check_solution(t, gold) for t in texts))
    return {"answers": list(answers), "correct": list(correct), "classes": answer_classes(list(answers))}


def score_problems(problems, gen, pool, kmax, n_diff) -> tuple[list[dict], dict]:
    per, crit_stats = [], {"critiques": 0, "malformed": 0, "no_final_verdict": 0}
    samples, critiques, refined = gen["samples"], gen["critiques"], gen["refinements"]
    for p in problems:
        pid, gold = p["id"], str(p["answer"])
        q = {"id": pid, "samples": grade([samples[sample_id(pid, j)] for j in range(pool)], gold),
             "refined": grade([refined[round_id(pid, 1, j)] for j in range(kmax)], gold),
             "rounds": grade([refined[round_id(pid, r, 0)] for r in range(1, kmax + 1)], gold),
             "verdicts": []}
        q["pass_rate"] = sum(q["samples"]["correct"][:n_diff]) / n_diff
        for r in range(1, kmax + 1):
            for _, j in round_chains([pid], r, kmax):
                judged = samples[sample_id(pid, j)] if r == 1 else refined[round_id(pid, r - 1, j)]
                crit = parse_critique(critiques[round_id(pid, r, j)], n_steps=len(split_steps(judged)))
                crit_stats["critiques"] += 1
                crit_stats["malformed"] += not crit.ok
                crit_stats["no_final_verdict"] += crit.final_correct is None
                if r == 1:  # discrimination: the critic on the actor's own samples
                    q["verdicts"].append(crit.final_correct)
        per.append(q)
    return per, crit_stats


def summarize_metrics(per, ks, kmax, pool, n_bins=5) -> dict:
    n = len(per)
    disc = discrimination_scores([v for q in per for v in q["verdicts"]],
                                 [c for q in per for c in q["samples"]["correct"][:kmax]])
    disc["accuracy_ci"] = accuracy_summary(disc["tp"] + disc["tn"], disc["n"])["ci"]
    bins = difficulty_bins([q["pass_rate"] for q in per], n_bins)
    by_bin = [{"bin": b, "range": bin_range(b, n_bins),
               **refine_effect([q for q, qb in zip(per, bins) if qb == b])} for b in range(1, n_bins + 1)]
    scaling = []
    for k in ks:
        for method in METHODS:
            votes, any_ok = [], []
            for q in per:
                cl, ok = (select_candidates(method, k, q["samples"][f], q["refined"][f], q["rounds"][f])
                          for f in ("classes", "correct"))
                votes.append(vote(cl, ok))
                any_ok.append(any(ok))
            if method in ("actor", "parallel"):  # exchangeable samples: estimate from the whole pool
                src, size, m = ("samples", pool, 3 * k) if method == "actor" else ("refined", kmax, k)
                pass_est = sum(pass_at_k(size, sum(q[src]["correct"]), m) for q in per) / n
                mv_est = sum(mv_at_k(q[src]["classes"], q[src]["correct"], m) for q in per) / n
            else:  # ordered rounds: the prefix is the only honest estimate
                pass_est, mv_est = sum(any_ok) / n, sum(v for v, _ in votes) / n
            scaling.append({"method": method, "K": k, "budget": generation_budget(method, k),
                            "n_answers": len(select_candidates(method, k, [0] * 3 * k, [0] * k, [0] * k)),
                            **accuracy_summary(sum(v for v, _ in votes), n), "any_correct": sum(any_ok) / n,
                            "pass_at_k": pass_est, "mv_at_k": mv_est,
                            "agreement": sum(a for _, a in votes) / n})
    answers = [a for q in per for a in q["samples"]["answers"]]
    return {"discrimination": disc,
            "critique_refine": {"overall": refine_effect(per), "by_difficulty": by_bin,
                                "bin_rule": f"{n_bins} equal-width bins of the actor's pass rate, bin 1 = easiest"},
            "scaling": {"budget_rule": "generations per problem: actor-only 3K, parallel 3K, sequential 1+2K",
                        "rows": scaling},
            "actor_no_answer_rate": sum(a is None for a in answers) / max(1, len(answers))}


# -----------------------------------------------------------------------------
# Metrics: pure functions of answers and verdicts


def refine_effect(group: list[dict]) -> dict:
    """Sample 0 before and after one critique -> refine round; the oracle refines only wrong ones."""
    before = [q["samples"]["correct"][0] for q in group]
    after = [q["refined"]["correct"][0] for q in group]
    return {"n": len(group), "before": accuracy_summary(sum(before), len(group)), "after": accuracy_summary(sum(after), len(group)),
            "oracle": accuracy_summary(sum(b or a for b, a in zip(before, after)), len(group)),
            "wrong_to_correct": sum(a and not b for b, a in zip(before, after)),
            "correct_to_wrong": sum(b and not a for b, a in zip(before, after))}


def generation_budget(method: str, k: int) -> int:
    """Generations per problem; a solve, a critique and a refinement each count as one."""
    if method in ("actor", "parallel"):
        return 3 * k  # actor: 3K samples; parallel: K x (solve, critique, refine)
    if method in ("sequential", "sequential-last"):
        return 1 + 2 * k  # one solve, then K x (critique, refine)
    raise ValueError(f"unknown method {method!r}")


def select_candidates(method: str, k: int, samples: list, refined: list, rounds: list) -> list:
    """The answers a method votes over at K, reusing one pool: prefixes, never fresh draws."""
    if method == "actor":
        return samples[:3 * k]
    if method == "parallel":
        return refined[:k]  # refined[j] is the refinement of samples[j]
    if method == "sequential":
        return rounds[:k]
    if method == "sequential-last":
        return rounds[k - 1:k]
    raise ValueError(f"unknown method {method!r}")


def vote(classes: list, correct: list[bool]) -> tuple[bool, float]:
    """(majority vote is correct, share of candidates in the majority class)."""
    winner = majority_class(classes)
    if winner is None:
        return False, 0.0
    members = [i for i, c in enumerate(classes) if c == winner]
    return any(correct[i] for i in members), len(members) / len(classes)


def discrimination_scores(verdicts: list, truth: list[bool]) -> dict:
    """Critic final verdicts (True = Correct, False = Wrong, None = unparseable) vs whether the
    answer really is correct. Positive class = Wrong. None is a miss: never a true prediction."""
    tp = sum(v is False and not t for v, t in zip(verdicts, truth))
    fp = sum(v is False and t for v, t in zip(verdicts, truth))
    tn = sum(v is True and t for v, t in zip(verdicts, truth))
    fn = sum(v is not False and not t for v, t in zip(verdicts, truth))
    n, none = len(truth), sum(v is None for v in verdicts)
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"n": n, "n_wrong_answers": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": ratio(tp + tn, n), "precision": p, "recall": r, "f1": f1_score(p, r),
            "unparseable": none, "unparseable_rate": ratio(none, n)}


# -----------------------------------------------------------------------------
# Step-level discrimination (ProcessBench: the hub dataset or its files; stage-1 paths with known
# error steps)

HUB_DATASET = re.compile(r"^[\w.-]+/[\w.-]+(?::[\w.,-]+)?$")  # owner/name[:split,split]


def read_step_source(source: str):
    """(where, row, default subset) for every row of one --processbench source: a JSONL file, a
    JSON array file (how ProcessBench's release ships each split), a folder laid out like a hub
    dataset, or a hub dataset `owner/name[:split,...]`. Default subset: file stem, or split."""
    path = Path(source)
    if path.is_file():
        for where, row in common.iter_records(path):
            yield where, row, path.stem
    elif path.is_dir() or Path(source.partition(":")[0]).is_dir() or HUB_DATASET.match(source):
        yield from read_dataset(source)
    else:
        raise common.UsageError(f"{source}: no such file or folder, nor a hub dataset id like Qwen/ProcessBench")


def read_dataset(source: str):
    """read_step_source for `datasets`: every split of a hub dataset (online) or of a local
    folder that mirrors one (its README's `configs` name the split files), or the splits named
    after a colon (`Qwen/ProcessBench:gsm8k,math`)."""
    import datasets
    name, splits = (source, "") if Path(source).is_dir() else source.partition(":")[::2]
    try:
        if splits:
            parts = {s: datasets.load_dataset(name, split=s) for s in splits.split(",")}
        else:
            parts = dict(datasets.load_dataset(name))
    except Exception as e:  # offline, no such dataset, no such split: all end the same way here
        raise common.UsageError(f"cannot load {source} with datasets ({type(e).__name__}: {e}); "
                                "offline, pass its JSON or JSONL files") from None
    for split, ds in parts.items():
        for i, row in enumerate(ds, 1):
            yield f"{source} [{split}] row {i}", row, split


def load_step_labelled(paths: list[str]) -> tuple[list[dict], int]:
    rows, skipped, seen = [], 0, set()
    for path in paths:
        for where, row, default_subset in read_step_source(path):
            if not isinstance(row, dict):
                raise common.UsageError(f"{where}: a row must be a JSON object")
            if "label" in row:
                label, subset = row["label"], row.get("subset") or default_subset
            elif "error_step" in row:
                if row.get("method") == "rg3" and row["error_step"]:
                    label = row["error_step"] - 1
                elif row.get("is_correct"):
                    label = -1
                else:
                    skipped += 1  # a wrong rg1/rg2 path: the earliest error is not known exactly
                    continue
                # one subset per file: like ProcessBench's, it holds erroneous and correct rows
                subset = row.get("subset") or default_subset
            else:
                raise common.UsageError(f"{where}: needs 'label' (ProcessBench) or 'error_step' (paths.jsonl)")
            question, steps = row.get("problem", row.get("question")), row.get("steps")
            if not isinstance(question, str) or not isinstance(steps, list) or not isinstance(label, int) \
                    or "id" not in row:
                raise common.UsageError(f"{where}: needs id, problem/question: str, steps: list, label: int")
            key = f"{subset}:{row['id']}"
            if key in seen:
                raise common.UsageError(f"{where}: id {row['id']!r} appears twice in subset {subset!r}")
            seen.add(key)
            rows.append({"id": key, "source_id": row["id"], "subset": subset, "question": question,
                         "steps": [str(s) for s in steps], "label": label,
                         **{k: row[k] for k in ("reference_steps", "generator") if k in row},
                         **({"gold_answer": str(row["gold_answer"])} if "gold_answer" in row else {})})
    return rows, skipped


def step_prediction(critique) -> int | None:
    """ProcessBench's answer from a critique: the 0-based first step marked Wrong; -1 when it
    finds the solution correct (final verdict Correct, or every step Correct); None when it says
    neither, which the benchmark scores as a miss on erroneous and on correct solutions alike."""
    if critique.first_wrong_step is not None:
        return critique.first_wrong_step - 1
    all_correct = bool(critique.steps) and all(s.correct for s in critique.steps)
    return -1 if critique.final_correct or all_correct else None


def judge_rows(rows: list[dict], fits: list, texts: dict, critic) -> list[dict]:
    """One prediction record per row: status judged, too_long (not sent: its prompt and the
    critique budget exceed the critic's context), refused (a served critic's server refused
    it, e.g. over its context) or unusable (the critique names no step and no verdict)."""
    out = []
    for row, fit in zip(rows, fits):
        text = texts.get(row["id"])
        if fit is False:
            status, pred, ok = "too_long", None, None
        elif critic.kind == "api" and text == "":
            status, pred, ok = "refused", None, None
        else:
            crit = parse_critique(text, n_steps=len(row["steps"]))
            pred, ok = step_prediction(crit), crit.ok
            status = "judged" if pred is not None else "unusable"
        out.append({"id": row["source_id"], "subset": row["subset"], "generator": row.get("generator"),
                    "label": row["label"], "prediction": pred, "match": pred == row["label"],
                    "status": status, "critique_well_formed": ok, "critic": critic.name})
    return out


def run_processbench(args, critic) -> dict:
    rows, skipped = load_step_labelled(args.processbench)
    if not rows:
        raise common.UsageError(f"{', '.join(args.processbench)}: no step-labelled rows")
    out = Path(args.out_dir)
    gen_dir = out / "generations"
    common.guard_config(gen_dir / "processbench.config.json",
                        {"critic": critic.name, "critic_max_new_tokens": args.critic_max_new_tokens})
    with ResumableWriter(gen_dir / "processbench.jsonl") as w:
        todo = sum(r["id"] not in w for r in rows)
        if todo and critic.kind == "model":  # size `auto` on this job, before the first critique
            critic.engine.plan(todo, args.critic_max_new_tokens)
        # a solution too long for the critic is counted, never cut or sent to fail
        fits = critic.fits(rows)
        sent = [r for r, fit in zip(rows, fits) if fit is not False]
        texts = dict(zip([r["id"] for r in sent], critic.critique(sent, w, desc="critic (processbench)")))
    records = judge_rows(rows, fits, texts, critic)
    common.write_jsonl_atomic(out / "processbench_predictions.jsonl", records)
    metrics = {"critic": critic.name, "files": [Path(p).name for p in args.processbench],
               **processbench_by_subset(rows, [r["prediction"] for r in records]), "n": len(rows),
               "skipped_unlabelled": skipped,
               "malformed_critiques": sum(r["critique_well_formed"] is False for r in records),
               "status": dict(Counter(r["status"] for r in records))}
    for name, sub in metrics["subsets"].items():
        sub["status"] = dict(Counter(r["status"] for r in records if r["subset"] == name))
    common.write_json_atomic(out / "processbench.json", metrics)
    lines = ["# ProcessBench-style step-level discrimination", "", *processbench_table(metrics)]
    common.write_text_atomic(out / "processbench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return metrics


# -----------------------------------------------------------------------------
# Report: metrics.md and two figures


def processbench_table(m: dict) -> list[str]:
    pct = common.pct
    lines = [f"critic `{m['critic']}` on {', '.join(m['files'])}: {m['n']} solutions, "
             f"{m['malformed_critiques']} malformed critiques, {m['skipped_unlabelled']} rows skipped "
             "(no exact error step). Prediction = the first step marked Wrong (-1: judged correct); "
             "F1 = harmonic mean of the accuracies on erroneous and on correct solutions. A solution "
             "too long for the critic's context, refused by its server or without a usable critique "
             "has no prediction and counts as a miss.", "",
             "| subset | n | erroneous acc | correct acc | F1 | too long | refused | unusable |",
             "|---|---|---|---|---|---|---|---|"]
    for s, sub in [*m["subsets"].items(), ("average", {**m, "f1": m["average_f1"]})]:
        st = sub["status"]
        accs = "| | |" if s == "average" else (f"| {pct(sub['acc_erroneous'])} ({sub['n_erroneous']}) | "
                                             f"{pct(sub['acc_correct'])} ({sub['n_correct']}) |")
        lines.append(f"| {s} | {sub['n']} {accs} {pct(sub['f1'])} | {st.get('too_long', 0)} | "
                     f"{st.get('refused', 0)} | {st.get('unusable', 0)} |")
    return lines




def write_markdown(path: Path, m: dict) -> None:
    c, d, cr = m["config"], m["discrimination"], m["critique_refine"]
    pct = common.pct
    cs = m["critique_parse"]
    lines = ["# The critic at test time", "",
             f"actor `{c['actor']}`, critic `{c['critic']}`; {c['n_problems']} problems from `{c['problems']}`; "
             f"pool of {c['pool']} actor samples per problem; wall time {m['wall_s']:.0f} s", "",
             "## Discrimination (critic's final verdict vs truth, no gold answer; positive class = Wrong)", "",
             "| answers judged | wrong answers | accuracy [95% CI] | precision | recall | F1 | no verdict |",
             "|---|---|---|---|---|---|---|",
             f"| {d['n']} | {d['n_wrong_answers']} | {pct(d['accuracy'])} [{pct(d['accuracy_ci'][0])}, "
             f"{pct(d['accuracy_ci'][1])}] | {pct(d['precision'])} | {pct(d['recall'])} | {pct(d['f1'])} | "
             f"{pct(d['unparseable_rate'])} |", "",
             f"Critiques: {cs['critiques']}, malformed {cs['malformed']}, without a final verdict "
             f"{cs['no_final_verdict']}. Actor samples without an answer: {pct(m['actor_no_answer_rate'])}%.", "",
             f"## Critique -> refine, one round ({cr['bin_rule']})", "",
             "| bin (pass rate) | n | actor [95% CI] | actor + critic | oracle refine | wrong->right "
             "| right->wrong |",
             "|---|---|---|---|---|---|---|"]
    for b in cr["by_difficulty"] + [{"bin": "all", "range": "", **cr["overall"]}]:
        lines.append(f"| {b['bin']} {b['range']} | {b['n']} | {ci_str(b['before'])} | {ci_str(b['after'])} | "
                     f"{ci_str(b['oracle'])} | {b['wrong_to_correct']} | {b['correct_to_wrong']} |")
    lines += ["", f"## Test-time scaling at equal budget ({m['scaling']['budget_rule']})", "",
              "| method | K | budget | answers voted | acc = MV [95% CI] | any correct | pass@k est. | MV@k est. "
              "| agreement |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in m["scaling"]["rows"]:
        lines.append(f"| {r['method']} | {r['K']} | {r['budget']} | {r['n_answers']} | {ci_str(r)} | "
                     f"{pct(r['any_correct'])} | {pct(r['pass_at_k'])} | {pct(r['mv_at_k'])} | "
                     f"{pct(r['agreement'])} |")
    lines += ["", "Percentages. acc: one run of the method (prefix of the sample pool); pass@k / MV@k: "
              "estimates over the whole pool (actor-only, parallel); agreement: share of votes for the winner."]
    if m.get("step_level"):
        lines += ["", "## Step-level discrimination (ProcessBench protocol)", "",
                  *processbench_table(m["step_level"])]
    common.write_text_atomic(path, "\n".join(lines) + "\n")


def plot_figures(out: Path, m: dict) -> None:
    plt = common.pyplot()
    bins = m["critique_refine"]["by_difficulty"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    bars = [("before", "actor"), ("after", "actor + critic"), ("oracle", "oracle refine")]
    for i, (key, label) in enumerate(bars):
        ax.bar([x + (i - 1) * width for x in range(len(bins))], [100 * b[key]["acc"] for b in bins], width,
               label=label)
    ax.set_xticks(range(len(bins)), [f"bin {b['bin']}\n{b['range']}\nn={b['n']}" for b in bins])
    ax.set(ylabel="accuracy (%)", xlabel="difficulty (actor pass rate; 1 = easiest)", ylim=(0, 100),
           title="Critique -> refine by difficulty")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "by_difficulty.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = m["scaling"]["rows"]
    for method, style in zip(METHODS, ("o-", "s-", "^-", "v--")):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["budget"] for r in mine], [100 * r["acc"] for r in mine], style, label=LABELS[method])
    budgets = sorted({r["budget"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set(xlabel="generations per problem (solve, critique, refine each count 1)", ylabel="accuracy (%)",
           ylim=(0, min(100, max(10, 1.2 * max(100 * r["acc"] for r in rows)))),
           title="Test-time scaling at equal budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="data/builtin_test.jsonl", help="test split in the stage-0 schema")
    p.add_argument("--processbench", nargs="+", metavar="SOURCE",
                   help="step-labelled rows: the hub dataset Qwen/ProcessBench[:split,...] (online), a folder "
                        "mirroring it, its JSON files (arrays) or JSONL files, or stage-1 paths.jsonl; adds "
                        "the step-level critic evaluation to the run")
    p.add_argument("--processbench-only", action="store_true",
                   help="run only the step-level evaluation of --processbench (no actor sampling)")
    p.add_argument("--actor", default=None, help="actor model: embedded name, hub id or folder (default: "
                   f"{common.DEFAULT_MODEL}), or with --backend openai the served name (default: the one served)")
    common.add_critic_args(p)
    common.add_backend_args(p, served=True)
    p.add_argument("--limit", type=common.count, default=0, help="use the first N problems (0 = all)")
    p.add_argument("--out-dir", default="out/test_time", help="where metrics, figures and generations go")
    p.add_argument("--temperature", type=float, default=0.7, help="actor sampling temperature (paper: 0.7)")
    common.add_fewshot_args(p)
    p.add_argument("--actor-max-new-tokens", type=common.positive, default=256,
                   help="actor budget per solution (paper: 1024)")
    p.add_argument("--k-values", type=common.int_list, default=[1, 2],
                   help="comma-separated K for the equal-budget comparison (1,2 keeps a 2-core CPU run "
                        "of 20 problems under 10 minutes; K=4 adds 6 sequential rounds there)")
    p.add_argument("--difficulty-samples", type=common.positive, default=8,
                   help="actor samples per problem whose pass rate sets the difficulty bin")
    p.add_argument("--chunk-size", type=common.positive, default=2048,
                   help="sequences per generate call; a killed run loses at most one chunk")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    if args.processbench_only and not args.processbench:
        p.error("--processbench-only needs --processbench FILE...")
    return args


def main(args):
    start = time.time()
    if args.processbench_only:
        return run_processbench(args, common.make_critic(args))
    ks = sorted(set(args.k_values))
    kmax, n_diff = max(ks), args.difficulty_samples
    pool = max(3 * kmax, n_diff)
    problems = load_problems(args.problems, args.limit)
    if not problems:
        raise common.UsageError(f"{args.problems}: no problems")
    common.resolve_actor(args)
    critic = common.make_critic(args)
    print(f"actor: {args.actor}; critic: {critic.name}; {len(problems)} problems from {args.problems}; "
          f"{pool} samples each; K = {ks}")
    gen = generate_all(args, problems, critic, pool, kmax)
    per, crit_stats = score_problems(problems, gen, pool, kmax, n_diff)
    m = {"config": {"actor": args.actor, "critic": critic.name, "problems": Path(args.problems).name,
                    "n_problems": len(problems), "k_values": ks, "pool": pool, "difficulty_samples": n_diff,
                    "temperature": args.temperature, "actor_max_new_tokens": args.actor_max_new_tokens,
                    "critic_max_new_tokens": args.critic_max_new_tokens, "seed": args.seed},
         **summarize_metrics(per, ks, kmax, pool), "critique_parse": crit_stats}
    if args.processbench:  # after the main phases, so backend "auto" was sized on their work
        m["step_level"] = run_processbench(args, critic)
    m["wall_s"] = round(time.time() - start, 1)
    out = Path(args.out_dir)
    bins = difficulty_bins([q["pass_rate"] for q in per])
    common.write_jsonl_atomic(out / "per_problem.jsonl", [
        {"id": q["id"], "pass_rate": q["pass_rate"], "bin": b, "answers": q["samples"]["answers"],
         "correct": q["samples"]["correct"], "refined_answers": q["refined"]["answers"],
         "refined_correct": q["refined"]["correct"], "round_answers": q["rounds"]["answers"],
         "round_correct": q["rounds"]["correct"], "critic_verdicts": q["verdicts"]}
        for q, b in zip(per, bins)])
    common.write_json_atomic(out / "metrics.json", m)
    write_markdown(out / "metrics.md", m)
    plot_figures(out, m)
    print((out / "metrics.md").read_text(encoding="utf-8"))
    return m


if __name__ == "__main__":
    common.run_cli(main, parse_args)
