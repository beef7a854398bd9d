"""Stage 6: critique-in-the-loop self-improvement vs vanilla self-improvement (paper, "Training time").

The actor trains on its own correct solutions, iteration after iteration. Vanilla
self-improvement keeps only the correct samples. Critique-in-the-loop adds the critic: every
wrong sample (and only those) is critiqued, the actor refines it up to N times, and a correct
refinement joins the training data. Only failed samples get this extra compute, so hard
questions get more exploration and the training data shifts toward them -- the paper's claim,
measured here as the share of training data per difficulty bin.

  iteration 0   the base actor fine-tuned on the training questions' reference solutions
                (common.actor_sft_records); both methods start from it.
  iteration t   sample N solutions per training question with actor t-1 (T=0.7); keep the
                correct ones. critique: critique each wrong sample, refine it up to N times
                (stop at the first correct refinement: at most one per critique), reject
                shortcut refinements (the answer stated with far fewer computations than the
                reference solution, counted by common.find_computations). Fine-tune the BASE
                model on what was kept; evaluate on the test split.
  evaluation    after every iteration, on the test split: greedy accuracy, and accuracy after
                one critique -> refine round at test time (common.critique_and_refine, the
                function stage 05 uses), overall and per difficulty bin, with 95% intervals.

Difficulty bins (05's equal-width rule, bin 1 = easiest) come from the iteration-0 actor's pass
rate over its first --difficulty-samples samples: for training questions (the data share) and
for test problems (accuracy per bin). The bins never move, so the iterations compare.

Reads the stage-0 splits (--train-problems, --test-problems), optionally 03's refine_sft.jsonl
(--refine-data), and the critic (--critic: 04's trained critic by default, any model id/path,
`api:MODEL` with --critic-url for a critic served by `vllm serve` or any OpenAI-compatible server,
or `rules`, the exact reference-aware step checker -- the offline stand-in for the GPT-4-class
feedback the authors' loop used). The actor is trained here every iteration, so it is never a
served model (no --backend openai). Writes under --out-dir
(default out/self_improve); what does not depend on the critic is shared by runs with different
critics, and what does not depend on N by runs with different N:
  iter0/                        sft.jsonl, model/ (safetensors), train_samples.jsonl (the first N
                                are iteration 1's samples for every method), test_samples.jsonl,
                                test_greedy.jsonl, test_critic/<critic>/{critiques,refinements}.jsonl
  n<N>/vanilla/iter<t>/         samples.jsonl (t >= 2), train.jsonl, model/, test_greedy.jsonl,
                                test_critic/<critic>/
  n<N>/critique-<critic>/iter<t>/   the same plus critiques.jsonl and refinements.jsonl
  report-<critic>/              metrics.json, metrics.md, accuracy_vs_iteration.png,
                                data_share.png, accuracy_vs_n.png (a sweep over --n only)
Every .jsonl under a run folder is a resume cache keyed by id (killed anywhere, a rerun finishes
with no lost and no duplicated rows); train.jsonl is rebuilt from the caches and common.sft_train
resumes from its own checkpoints and skips a finished model. Metrics are always recomputed.

Choices where the paper is silent (or where its text and the authors' released script agree):
- Training data of iteration t: the reference solutions plus what iteration t kept, fine-tuned
  from the base model, earlier iterations' data not carried over. The paper fine-tunes "from the
  base model each iteration on what was kept"; the authors' released loop also adds the original
  SFT data every iteration and does not accumulate earlier iterations. --no-add-reference,
  --accumulate and --refine-data (03's critique -> refinement chats) change this.
- A kept refinement is trained on as a plain solution of the question (the prompt a solve uses),
  since the aim is an actor that solves hard questions without a critic.
- Shortcut: fewer than --shortcut-ratio (0.5) times the reference's computations. Duplicates
  (the same steps as another kept solution of the same question) are dropped and counted, for
  samples and refinements alike.
- A refinement chain runs even when the critic calls the wrong sample correct: the loop knows
  the gold answer, the critique is still the only feedback the actor gets. Each round refines
  the original sample again with the same critique.
- Evaluation decodes greedily (refinement too), so one model has one score. With `rules` the
  test-time critic sees the reference solution: that column is an oracle critic, not a fair one.
- The actor solves zero-shot (common.solve_messages with no worked examples): every iteration is
  fine-tuned on exactly that prompt.
- CPU default sizes (2 shared cores, embedded 135M model, --method both --iterations 2):
  16 training questions, N=2, 16 test problems, 2 difficulty samples, 128 actor tokens,
  1 epoch at lr 1e-4 (5e-6 barely moves a 135M model in a few steps). The 135M actor gets almost
  every sample wrong, so critique-in-the-loop refines nearly all Q x N samples up to N times: its
  cost grows as Q x N^2, and N=4 with 24 questions took 4 minutes per refinement round here.

    python 06_self_improve.py --critic rules                          # CPU, embedded actor
    python 06_self_improve.py --critic out/critic                     # 04's critic; reuses iter0, vanilla
    python 06_self_improve.py --actor Qwen/Qwen2.5-1.5B-Instruct --critic out/critic --backend vllm \\
        --train-problems data/gsm8k_train.jsonl --test-problems data/gsm8k_test.jsonl \\
        --train-limit 0 --test-limit 0 --n 2,4,8 --iterations 3 --lr 5e-6 --batch-size 4 --grad-accum 8 \\
        --difficulty-samples 8 --actor-max-new-tokens 1024 --critic-max-new-tokens 1536   # one GPU
"""
import argparse
import re
import time
from pathlib import Path

import common
from common import ResumableWriter, check_solution, join_steps, pct, split_steps

# -----------------------------------------------------------------------------
# What is kept: correct samples, one correct refinement per critique, no shortcuts


def solution_text(text: str) -> str:
    """A sample as training text: one step per line, labels and blank lines removed."""
    return join_steps(split_steps(text))


def n_computations(text: str) -> int:
    """Computations (`a op b = c`) the solution states, read step by step."""
    return sum(len(common.find_computations(step)) for step in split_steps(text))


def is_shortcut(text: str, reference_steps: list[str], ratio: float) -> bool:
    """True when the solution states its answer with far fewer computations than the reference
    (fewer than ratio x the reference's); a reference without computations allows anything."""
    return n_computations(text) < ratio * n_computations(join_steps(reference_steps))


def refinement_chain(texts: list[str], problem: dict, ratio: float) -> dict:
    """One critique's refinements, in round order: the first correct non-shortcut one is kept
    (at most one per critique); correct shortcuts before it are rejected and counted."""
    shortcuts = 0
    for r, text in enumerate(texts):
        if check_solution(text, str(problem["answer"]))[1]:
            if is_shortcut(text, problem["reference_steps"], ratio):
                shortcuts += 1
                continue
            return {"kept": text, "round": r + 1, "shortcuts": shortcuts}
    return {"kept": None, "round": None, "shortcuts": shortcuts}


def chains_to_continue(samples_correct: list[bool], chains: dict[int, list[str]], problem: dict,
                       n: int, ratio: float) -> list[int]:
    """Wrong samples whose chain has no kept refinement yet and fewer than n refinements."""
    return [j for j, ok in enumerate(samples_correct) if not ok
            and refinement_chain(chains.get(j, []), problem, ratio)["kept"] is None
            and len(chains.get(j, [])) < n]


def keep_question(problem: dict, samples: list[str], chains: dict[int, list[str]] | None,
                  ratio: float) -> dict:
    """What one training question contributes: (kind, text) pairs and the counts.
    chains is None for vanilla; else wrong sample index -> its refinements in round order."""
    gold = str(problem["answer"])
    correct = [check_solution(s, gold)[1] for s in samples]
    kept, seen = [], set()
    c = {"samples": len(samples), "correct_samples": sum(correct), "duplicate_samples": 0,
         "wrong_samples": len(samples) - sum(correct), "refinements": 0, "fixed": 0,
         "shortcut_refinements": 0, "duplicate_refinements": 0}
    for s, ok in zip(samples, correct):
        if ok:
            text = solution_text(s)
            if text in seen:
                c["duplicate_samples"] += 1
            else:
                seen.add(text)
                kept.append(("sample", text))
    for j, texts in sorted((chains or {}).items()):
        if correct[j]:
            raise ValueError(f"{problem['id']}: sample {j} is correct and must not be refined")
        chain = refinement_chain(texts, problem, ratio)
        c["refinements"] += len(texts)
        c["shortcut_refinements"] += chain["shortcuts"]
        if chain["kept"] is None:
            continue
        c["fixed"] += 1
        text = solution_text(chain["kept"])
        if text in seen:
            c["duplicate_refinements"] += 1
        else:
            seen.add(text)
            kept.append(("refinement", text))
    return {"kept": kept, "counts": c, "correct": correct}


def data_share(records: list[dict], n_bins: int = 5) -> dict:
    """Self-generated training records (samples and refinements) per difficulty bin: counts and
    shares of the whole, the paper's evidence of the shift toward hard questions."""
    own = [r for r in records if r["kind"] in ("sample", "refinement")]
    count = {b: sum(r["bin"] == b for r in own) for b in range(1, n_bins + 1)}
    by_kind = {k: {b: sum(r["bin"] == b and r["kind"] == k for r in own) for b in range(1, n_bins + 1)}
               for k in ("sample", "refinement")}
    return {"n": len(own), "count": count, "by_kind": by_kind,
            "share": {b: (count[b] / len(own) if own else None) for b in count}}


# -----------------------------------------------------------------------------
# Run folders: iteration 0 and vanilla never depend on the critic, iteration 0 never on N


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "critic"


class Layout:
    def __init__(self, root: str, critic_name: str):
        self.root, self.critic = Path(root), slug(critic_name)

    def iter0(self) -> Path:
        return self.root / "iter0"

    def method_dir(self, n: int, method: str) -> Path:
        return self.root / f"n{n}" / ("vanilla" if method == "vanilla" else f"critique-{self.critic}")

    def iteration(self, n: int, method: str, t: int) -> Path:
        return self.iter0() if t == 0 else self.method_dir(n, method) / f"iter{t}"

    def critic_eval(self, folder: Path) -> Path:
        """The test-time critique -> refine round of the model in `folder`, per critic."""
        return folder / "test_critic" / self.critic

    def report(self) -> Path:
        return self.root / f"report-{self.critic}"


# -----------------------------------------------------------------------------
# Generation through resume caches


def engine_for(model_dir: Path, args, work: int = 0):
    """The engine of one actor model. It is opened once for all the work on that model (the
    evaluation of iteration t, then the sampling and refining of iteration t+1), and `work`
    (sequences) sizes backend `auto` on all of it; engines are closed before every fine-tuning."""
    engine = common.get_engine(str(model_dir), args.backend, args.device)
    if work:
        engine.plan(work, args.actor_max_new_tokens)
    return engine


def critic_stays_open(critic) -> bool:
    return isinstance(critic.engine, common.Engine) and critic.engine.device == "cpu"


def sample_pool(engine, path: Path, problems: list[dict], k: int, args, desc: str) -> dict[str, list[str]]:
    """k actor samples per problem (T = --temperature), cached as `{problem id}:{j}`."""
    jobs = [([f"{p['id']}:{j}" for j in range(k)], common.solve_messages(p, [], 0, args.seed))
            for p in problems]
    with ResumableWriter(path) as w:
        todo = sum(i not in w for ids, _ in jobs for i in ids)
        if todo:
            engine.plan(todo, args.actor_max_new_tokens)
        text = common.cached_generate(engine, w, jobs, args.chunk_size, desc, args.seed,
                                      temperature=args.temperature, max_new_tokens=args.actor_max_new_tokens)
    return {p["id"]: [text[f"{p['id']}:{j}"] for j in range(k)] for p in problems}


def critic_item(problem: dict, text: str, item_id: str) -> dict:
    """What the critic sees; only the `rules` critic reads the reference and the gold answer."""
    return {"id": item_id, "question": problem["question"], "steps": split_steps(text),
            "boxed": common.is_boxed_style(problem), "reference_steps": problem["reference_steps"],
            "gold_answer": str(problem["answer"])}


# -----------------------------------------------------------------------------
# Fine-tuning: always from the base actor (iteration 0 on the reference solutions alone)


def train(records: list[dict], records_path: Path, model_dir: Path, args) -> Path:
    """Write the training set next to the model, then fine-tune the base actor on it
    (common.sft_train resumes from its checkpoints and skips a finished model)."""
    common.write_jsonl_atomic(records_path, records)
    common.sft_train(args.actor, [{"id": r["id"], "messages": r["messages"]} for r in records],
                     model_dir, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                     grad_accum=args.grad_accum, max_length=args.max_length, device=args.device,
                     seed=args.seed, save_steps=args.save_steps, logging_steps=5)
    return model_dir


def reference_records(train_problems: list[dict], bins: dict[str, int] | None) -> list[dict]:
    return [dict(r, kind="reference", question_id=r["id"], id=f"{r['id']}:reference",
                 bin=(bins or {}).get(r["id"]))
            for r in common.actor_sft_records(train_problems)]


# -----------------------------------------------------------------------------
# One iteration of self-improvement: sample, keep the correct; critique and refine the wrong


def explore(method: str, t: int, n: int, train_problems, layout: Layout, critic, args) -> tuple[dict, dict | None]:
    """({question id: keep_question(...)}, critic verdict counts or None) for one method and
    iteration. Iteration 1 reuses iteration 0's samples, so both methods start from the same."""
    folder = layout.iteration(n, method, t)
    engine = engine_for(layout.iteration(n, method, t - 1) / "model", args)
    if t == 1:
        pool = sample_pool(engine, layout.iter0() / "train_samples.jsonl", train_problems,
                           max(n, args.difficulty_samples), args, "iter0 train samples")
        samples = {q: s[:n] for q, s in pool.items()}
    else:
        samples = sample_pool(engine, folder / "samples.jsonl", train_problems, n, args,
                              f"{method} iter{t} samples")
    by_id = {p["id"]: p for p in train_problems}
    chains, verdicts = None, None
    if method == "critique":
        gold_ok = {q: [check_solution(s, str(by_id[q]["answer"]))[1] for s in ss] for q, ss in samples.items()}
        wrong = [(q, j) for q, oks in gold_ok.items() for j, ok in enumerate(oks) if not ok]
        items = [critic_item(by_id[q], samples[q][j], f"{q}:{j}") for q, j in wrong]
        with ResumableWriter(folder / "critiques.jsonl") as cw:
            crit = dict(zip([it["id"] for it in items], critic.critique(items, cw, desc=f"critic iter{t}")))
        verdicts = [common.parse_critique(crit[it["id"]]).final_correct for it in items]
        rid = "{}:{}:r{}".format
        with ResumableWriter(folder / "refinements.jsonl") as w:
            for r in range(1, n + 1):  # round r: every wrong sample still without a kept refinement
                cached = {row["id"]: row["text"] for row in w.rows}
                chains = {q: {j: [cached[i] for k in range(1, r) if (i := rid(q, j, k)) in cached]
                              for j, ok in enumerate(oks) if not ok} for q, oks in gold_ok.items()}
                todo = [(q, j) for q in samples
                        for j in chains_to_continue(gold_ok[q], chains[q], by_id[q], r, args.shortcut_ratio)]
                if not todo:
                    break
                engine.plan(len(todo) * (n - r + 1), args.actor_max_new_tokens)
                jobs = [([rid(q, j, r)], common.refine_messages(
                    by_id[q]["question"], split_steps(samples[q][j]), crit[f"{q}:{j}"],
                    common.is_boxed_style(by_id[q]))) for q, j in todo]
                common.cached_generate(engine, w, jobs, args.chunk_size, f"refine iter{t} round {r}",
                                       args.seed + 1000 * r, temperature=args.temperature,
                                       max_new_tokens=args.actor_max_new_tokens)
            cached = {row["id"]: row["text"] for row in w.rows}
        chains = {q: {j: [cached[i] for k in range(1, n + 1) if (i := rid(q, j, k)) in cached]
                      for j, ok in enumerate(oks) if not ok} for q, oks in gold_ok.items()}
    kept = {q: keep_question(by_id[q], samples[q], chains and chains[q], args.shortcut_ratio) for q in samples}
    critic_stats = None if verdicts is None else {
        "critiques": len(verdicts), "said_correct": sum(v is True for v in verdicts),
        "said_wrong": sum(v is False for v in verdicts), "no_verdict": sum(v is None for v in verdicts)}
    return kept, critic_stats


def iteration_records(t: int, kept: dict, train_problems, bins, earlier: list[dict],
                      refine_data: list[dict], args) -> list[dict]:
    """The fine-tuning set of iteration t, each record tagged with its kind and bin."""
    records = reference_records(train_problems, bins) if args.add_reference else []
    for p in train_problems:
        prompt = common.solve_messages(p, [], 0, args.seed)  # a refinement is trained as a solve
        for i, (kind, text) in enumerate(kept[p["id"]]["kept"]):
            records.append({"id": f"{p['id']}:iter{t}:{kind}:{i}", "question_id": p["id"], "kind": kind,
                            "bin": bins[p["id"]], "messages": prompt + [{"role": "assistant", "content": text}]})
    records += [dict(r, kind="refine_data", bin=None) for r in refine_data]
    return records + earlier


# -----------------------------------------------------------------------------
# Evaluation on the test split: greedy, then one critique -> refine round


def evaluate(model_dir: Path, folder: Path, test_problems, test_bins, layout: Layout, critic, args) -> dict:
    """Greedy solutions of the test problems (folder/test_greedy.jsonl), then one critique ->
    greedy refinement round on each (folder/test_critic/<critic>/), the function 05 uses."""
    engine = engine_for(model_dir, args)
    jobs = [([p["id"]], common.solve_messages(p, [], 0, args.seed)) for p in test_problems]
    crit_dir = layout.critic_eval(folder)
    with ResumableWriter(folder / "test_greedy.jsonl") as w, \
            ResumableWriter(crit_dir / "critiques.jsonl") as cw, ResumableWriter(crit_dir / "refinements.jsonl") as rw:
        n_jobs = sum(p["id"] not in w for p in test_problems) + sum(p["id"] not in rw for p in test_problems)
        if n_jobs:
            engine.plan(n_jobs, args.actor_max_new_tokens)
        greedy = common.cached_generate(engine, w, jobs, args.chunk_size, f"greedy test ({folder.name})",
                                        temperature=0.0, max_new_tokens=args.actor_max_new_tokens)
        refined = common.critique_and_refine(
            engine, critic, [critic_item(p, greedy[p["id"]], p["id"]) for p in test_problems],
            temperature=0.0, max_new_tokens=args.actor_max_new_tokens, seed=args.seed,
            critique_writer=cw, refine_writer=rw, chunk_size=args.chunk_size, desc=f"test ({folder.name})")
    ok = [check_solution(greedy[p["id"]], str(p["answer"]))[1] for p in test_problems]
    ok_crit = [check_solution(r["refinement"], str(p["answer"]))[1] for p, r in zip(test_problems, refined)]
    bins = [test_bins[p["id"]] for p in test_problems]
    verdicts = [r["verdict"] for r in refined]
    return {"greedy": accuracy_by_bin(ok, bins), "with_critic": accuracy_by_bin(ok_crit, bins),
            "critic": critic.name,
            "critic_verdicts": {"correct": sum(v is True for v in verdicts),
                                "wrong": sum(v is False for v in verdicts),
                                "none": sum(v is None for v in verdicts)},
            "wrong_to_right": sum(b and not a for a, b in zip(ok, ok_crit)),
            "right_to_wrong": sum(a and not b for a, b in zip(ok, ok_crit))}


def accuracy(correct: list[bool]) -> dict:
    return common.accuracy_summary(sum(correct), len(correct))


def accuracy_by_bin(correct: list[bool], bins: list[int], n_bins: int = 5) -> dict:
    return {**accuracy(correct), "by_bin": {
        b: accuracy([c for c, cb in zip(correct, bins) if cb == b]) for b in range(1, n_bins + 1)}}


# -----------------------------------------------------------------------------
# The whole loop


def difficulty(engine, path: Path, problems, pool_size: int, args, desc) -> dict[str, int]:
    """Bins from the iteration-0 actor's pass rate over its first --difficulty-samples samples."""
    k = args.difficulty_samples
    pool = sample_pool(engine, path, problems, pool_size, args, desc)
    rates = [sum(check_solution(s, str(p["answer"]))[1] for s in pool[p["id"]][:k]) / k for p in problems]
    return dict(zip([p["id"] for p in problems], common.difficulty_bins(rates)))


def summed(kept: dict) -> dict:
    counts = [v["counts"] for v in kept.values()]
    return {k: sum(c[k] for c in counts) for k in (counts[0] if counts else {})}


def run(args) -> dict:
    fields = ("id", "question", "reference_steps", "answer")
    train_problems = common.take(common.read_jsonl(args.train_problems, fields), args.train_limit)
    test_problems = common.take(common.read_jsonl(args.test_problems, fields), args.test_limit)
    for path, rows in ((args.train_problems, train_problems), (args.test_problems, test_problems)):
        if not rows:
            raise common.UsageError(f"{path}: no problems")
    ns = sorted(set(args.n))
    methods = ["vanilla", "critique"] if args.method == "both" else [args.method]
    critic = common.make_critic(args)
    layout = Layout(args.out_dir, critic.name)
    refine_data = common.read_jsonl(args.refine_data, ("id", "messages")) if args.refine_data else []
    print(f"[06] actor {args.actor}, critic {critic.name}; {len(train_problems)} training questions, "
          f"{len(test_problems)} test problems; methods {methods}; N = {ns}; {args.iterations} iterations")
    # Everything cached under the run folder must come from these settings (N, the method and the
    # critic have folders of their own).
    common.guard_config(layout.root / "config.json", {
        "actor": args.actor, "train_problems": Path(args.train_problems).name, "train_limit": args.train_limit,
        "test_problems": Path(args.test_problems).name, "test_limit": args.test_limit,
        "temperature": args.temperature, "actor_max_new_tokens": args.actor_max_new_tokens,
        "difficulty_samples": args.difficulty_samples, "seed": args.seed,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "shortcut_ratio": args.shortcut_ratio, "add_reference": args.add_reference,
        "accumulate": args.accumulate, "refine_data": Path(args.refine_data).name if args.refine_data else None})
    common.guard_config(layout.report() / "critic.json",
                        {"critic": critic.name, "critic_max_new_tokens": args.critic_max_new_tokens})
    q, m = len(train_problems), len(test_problems)
    n_eval = 2 * m  # greedy + one refinement per test problem

    def work_after(t: int, method: str, n: int) -> int:
        """Sequences the actor of iteration t generates: its evaluation, and iteration t+1's
        samples and (at most) N refinements of each sample."""
        if t >= args.iterations:
            return n_eval
        return n_eval + q * n * (1 + (n if method == "critique" else 0))

    try:
        # --- iteration 0: fine-tune on the references, bin the questions by its pass rate
        iter0 = layout.iter0()
        model0 = train(reference_records(train_problems, None), iter0 / "sft.jsonl", iter0 / "model", args)
        pool = max(max(ns), args.difficulty_samples)
        engine0 = engine_for(model0, args, q * pool + m * args.difficulty_samples
                             + max(work_after(0, meth, n) for meth in methods for n in ns))
        train_bins = difficulty(engine0, iter0 / "train_samples.jsonl", train_problems, pool, args,
                                "iter0 train samples")
        test_bins = difficulty(engine0, iter0 / "test_samples.jsonl", test_problems, args.difficulty_samples,
                               args, "iter0 test samples")
        eval0 = evaluate(model0, iter0, test_problems, test_bins, layout, critic, args)
        print(f"[06 {time.strftime('%H:%M:%S')}] iteration 0: test greedy {common.ci_str(eval0['greedy'])}, "
              f"with the critic {common.ci_str(eval0['with_critic'])}")

        # --- iterations 1..T for every N: explore with actor t-1, fine-tune the base, evaluate
        runs = []
        for n in ns:
            rows = {meth: [{"iteration": 0, "eval": eval0}] for meth in methods}
            earlier = {meth: [] for meth in methods}
            kept = {meth: explore(meth, 1, n, train_problems, layout, critic, args)
                    for meth in methods if args.iterations}
            for t in range(1, args.iterations + 1):
                # An accelerator's memory goes to training. On a CPU the critic's engine stays up:
                # RAM is not short there, and a vLLM restart costs about a minute per iteration.
                common.close_engines(keep=[critic.engine] if critic_stays_open(critic) else [])
                trained = {}
                for meth in methods:
                    folder = layout.iteration(n, meth, t)
                    records = iteration_records(t, kept[meth][0], train_problems, train_bins,
                                                earlier[meth], refine_data, args)
                    trained[meth] = (train(records, folder / "train.jsonl", folder / "model", args), records)
                    if args.accumulate:
                        earlier[meth] = [r for r in records if r["kind"] in ("sample", "refinement")]
                for meth in methods:
                    model, records = trained[meth]
                    folder = layout.iteration(n, meth, t)
                    engine_for(model, args, work_after(t, meth, n))
                    rows[meth].append({
                        "iteration": t, "model": str(model), "train_size": len(records),
                        "by_kind": {k: sum(r["kind"] == k for r in records)
                                    for k in ("reference", "sample", "refinement", "refine_data")},
                        "kept": summed(kept[meth][0]), "critic_on_wrong_samples": kept[meth][1],
                        "data_share": data_share(records),
                        "eval": evaluate(model, folder, test_problems, test_bins, layout, critic, args)})
                    e = rows[meth][-1]["eval"]
                    print(f"[06 {time.strftime('%H:%M:%S')}] N={n} {meth} iteration {t}: {len(records)} "
                          f"training records, test greedy "
                          f"{common.ci_str(e['greedy'])}, with the critic {common.ci_str(e['with_critic'])}")
                    if t < args.iterations:
                        kept[meth] = explore(meth, t + 1, n, train_problems, layout, critic, args)
                    common.get_engine(str(model), args.backend, args.device).close()
            runs += [{"n": n, "method": meth, "iterations": rows[meth]} for meth in methods]
    finally:
        if isinstance(critic.engine, common.Engine):  # closed engines reopen on use, outside get_engine
            critic.engine.close()
    return {"critic": critic.name, "train_bins": train_bins, "test_bins": test_bins, "runs": runs}


# -----------------------------------------------------------------------------
# Report: metrics.json, metrics.md, figures


def bin_counts(bins: dict[str, int], n_bins: int = 5) -> dict[int, int]:
    return {b: sum(v == b for v in bins.values()) for b in range(1, n_bins + 1)}


def write_report(res: dict, args, wall_s: float) -> dict:
    out = Layout(args.out_dir, res["critic"]).report()
    m = {"critic": res["critic"], "actor": args.actor, "config": {
            k: v for k, v in vars(args).items() if not k.startswith("_")},
         "bin_rule": "5 equal-width bins of the iteration-0 actor's pass rate over "
                     f"{args.difficulty_samples} samples, bin 1 = [0.8, 1] (easiest)",
         "train_bins": bin_counts(res["train_bins"]), "test_bins": bin_counts(res["test_bins"]),
         "runs": res["runs"], "wall_s": round(wall_s, 1)}
    common.write_json_atomic(out / "metrics.json", m)
    e0, n_train = m["runs"][0]["iterations"][0]["eval"], sum(m["train_bins"].values())
    lines = [f"# Self-improvement: vanilla vs critique-in-the-loop (critic `{m['critic']}`)", "",
             f"actor `{m['actor']}`; {n_train} training questions (per difficulty bin 1..5: "
             f"{list(m['train_bins'].values())}), {sum(m['test_bins'].values())} test problems (per bin: "
             f"{list(m['test_bins'].values())}); {m['bin_rule']}; wall time {wall_s:.0f} s.", "",
             "## Test accuracy and training data", "",
             "Test accuracy % [95% CI]: greedy, and after one critique -> refine round with the critic at "
             "test time" + (" (the `rules` critic sees the reference solution: an oracle critic)"
                            if m["critic"] == "rules" else "") + ". Own data: the kept samples and "
             "refinements (the reference solutions are added to every iteration"
             + ("" if m["config"]["add_reference"] else " only at iteration 0") + "); its share per "
             "training-question difficulty bin, 1 = easiest.", "",
             "| N | method | iter | train size | own data | own data per bin 1..5 % | greedy | + critic at test |",
             "|---|---|---|---|---|---|---|---|",
             f"| | both | 0 | {n_train} (reference) | | | {common.ci_str(e0['greedy'])} | {common.ci_str(e0['with_critic'])} |"]
    for r in m["runs"]:
        for it in r["iterations"][1:]:
            e, ds = it["eval"], it["data_share"]
            share = " / ".join("-" if v is None else f"{100 * v:.0f}" for v in ds["share"].values())
            lines.append(f"| {r['n']} | {r['method']} | {it['iteration']} | {it['train_size']} | {ds['n']} "
                         f"| {share} | {common.ci_str(e['greedy'])} | {common.ci_str(e['with_critic'])} |")
    lines += ["", "## Exploration: what was kept and rejected", "",
              "| N | method | iter | samples | correct (duplicates) | wrong: critiqued (critic said Wrong / "
              "Correct / no verdict) | refinements generated | fixed (kept) | rejected: shortcuts, duplicates |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in m["runs"]:
        for it in r["iterations"][1:]:
            k, c = it["kept"], it["critic_on_wrong_samples"]
            crit = (f"{k['wrong_samples']}: {c['critiques']} ({c['said_wrong']} / {c['said_correct']} / "
                    f"{c['no_verdict']})") if c else f"{k['wrong_samples']}: -"
            lines.append(f"| {r['n']} | {r['method']} | {it['iteration']} | {k['samples']} "
                         f"| {k['correct_samples']} ({k['duplicate_samples']}) | {crit} | {k['refinements']} "
                         f"| {k['fixed']} ({k['fixed'] - k['duplicate_refinements']}) "
                         f"| {k['shortcut_refinements']}, {k['duplicate_refinements']} |")
    lines += ["", "A wrong sample's refinements stop at the first correct one that is not a shortcut "
              "(at most one kept per critique); a shortcut states the answer with fewer than "
              f"{m['config']['shortcut_ratio']} x the reference's computations.", "",
              "## Test accuracy per difficulty bin after the last iteration (greedy -> with the critic)", "",
              "| N | method | " + " | ".join(f"bin {b} {common.bin_range(b)} n={m['test_bins'][b]}"
                                        for b in range(1, 6)) + " |", "|---|---|" + "---|" * 5,
              "| | iteration 0 | " + " | ".join(_bin_cell(e0, b) for b in range(1, 6)) + " |"]
    for r in m["runs"]:
        e = r["iterations"][-1]["eval"]
        lines.append(f"| {r['n']} | {r['method']} | " + " | ".join(_bin_cell(e, b) for b in range(1, 6)) + " |")
    common.write_text_atomic(out / "metrics.md", "\n".join(lines) + "\n")
    plot_figures(out, m)
    return m


def _bin_cell(e: dict, b: int) -> str:
    g, c = e["greedy"]["by_bin"][b], e["with_critic"]["by_bin"][b]
    return "-" if not g["n"] else f"{pct(g['acc'])} -> {pct(c['acc'])}"


def plot_figures(out: Path, m: dict) -> None:
    plt = common.pyplot()

    def save(fig, ax_list, name):
        for ax in ax_list:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

    ns = sorted({r["n"] for r in m["runs"]})
    fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for r in [r for r in m["runs"] if r["n"] == n]:
            xs = [it["iteration"] for it in r["iterations"]]
            for key, style, label in (("greedy", "o-", ""), ("with_critic", "s--", " + critic at test")):
                ax.plot(xs, [100 * it["eval"][key]["acc"] for it in r["iterations"]], style,
                        label=f"{r['method']}{label}")
        ax.set(xlabel="iteration", ylabel="test accuracy (%)", title=f"N = {n}, critic {m['critic']}")
        ax.set_xticks(range(max(len(r["iterations"]) for r in m["runs"])))
    save(fig, axes[0], "accuracy_vs_iteration.png")

    n = max(ns)
    bars = [(r["method"], it) for r in m["runs"] if r["n"] == n for it in r["iterations"][1:]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(bars))
    for i, (method, it) in enumerate(bars):
        share = it["data_share"]["share"]
        ax.bar([b - 0.4 + (i + 0.5) * width for b in share], [100 * (share[b] or 0) for b in share], width,
               label=f"{method} iter {it['iteration']} (n={it['data_share']['n']})")
    ax.set_xticks(range(1, 6), [f"bin {b}\n({m['train_bins'][b]} q)" for b in range(1, 6)])
    ax.set(xlabel="training-question difficulty (iteration-0 pass rate; 1 = easiest)",
           ylabel="share of own training data (%)", ylim=(0, 100), title=f"Where the kept data comes from (N = {n})")
    save(fig, [ax], "data_share.png")

    if len(ns) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(r["method"] for r in m["runs"]):
            for key, style, label in (("greedy", "o-", ""), ("with_critic", "s--", " + critic at test")):
                rs = [r for r in m["runs"] if r["method"] == method]
                ax.plot([r["n"] for r in rs], [100 * r["iterations"][-1]["eval"][key]["acc"] for r in rs],
                        style, label=f"{method}{label}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(x) for x in ns])
        ax.minorticks_off()
        ax.set(xlabel="N (samples per training question)", ylabel="test accuracy after the last iteration (%)",
               title="Accuracy vs N")
        save(fig, [ax], "accuracy_vs_n.png")


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-problems", default="data/builtin_train.jsonl",
                   help="training split (stage-0 schema): the questions the actor improves on")
    p.add_argument("--test-problems", default="data/builtin_test.jsonl", help="test split for the evaluation")
    p.add_argument("--train-limit", type=common.count, default=16, help="use the first N training questions (0 = all)")
    p.add_argument("--test-limit", type=common.count, default=16, help="use the first N test problems (0 = all)")
    p.add_argument("--actor", default=common.DEFAULT_MODEL,
                   help="base actor (embedded name, hub id or folder); every iteration is fine-tuned from it")
    p.add_argument("--method", default="both", choices=["vanilla", "critique", "both"],
                   help="vanilla self-improvement, critique-in-the-loop, or both side by side")
    p.add_argument("--iterations", type=common.count, default=2, help="self-improvement iterations after iteration 0")
    p.add_argument("--n", type=common.int_list, default=[2],
                   help="samples per training question, and refinements per critique; "
                   "a comma list (2,4,8) runs a sweep in turn (iteration 0 is shared)")
    p.add_argument("--temperature", type=float, default=0.7, help="actor sampling temperature (paper: 0.7)")
    p.add_argument("--difficulty-samples", type=common.positive, default=2,
                   help="iteration-0 samples per question whose pass rate sets its difficulty bin")
    p.add_argument("--shortcut-ratio", type=float, default=0.5,
                   help="a correct refinement with fewer than this times the reference's computations is "
                        "rejected as a shortcut")
    p.add_argument("--add-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="train every iteration on the reference solutions too (the authors' released loop does)")
    p.add_argument("--accumulate", action="store_true",
                   help="carry earlier iterations' kept data into later iterations (off: each iteration "
                        "trains on its own, as in the paper's description)")
    p.add_argument("--refine-data", default=None,
                   help="03's refine_sft.jsonl: add its critique -> refinement chats to every iteration")
    common.add_critic_args(p)
    p.add_argument("--actor-max-new-tokens", type=common.positive, default=128,
                   help="actor budget per solution (paper: 1024)")
    p.add_argument("--epochs", type=float, default=1, help="epochs per fine-tuning (the authors: 1)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak learning rate, cosine, no warmup (paper: 5e-6 at 8B; 1e-4 moves a 135M model)")
    p.add_argument("--batch-size", type=common.positive, default=4, help="per-device batch size")
    p.add_argument("--grad-accum", type=common.positive, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=common.positive, default=2048,
                   help="longer training examples are dropped and counted")
    p.add_argument("--save-steps", type=common.positive, default=50, help="checkpoint every N optimizer steps (resume)")
    common.add_backend_args(p)
    p.add_argument("--chunk-size", type=common.positive, default=256,
                   help="sequences per generate call; a killed run loses at most one chunk")
    p.add_argument("--out-dir", default="out/self_improve", help="run folder (see the layout above)")
    p.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    return p.parse_args(argv)


def main(args):
    start = time.time()
    res = run(args)
    m = write_report(res, args, time.time() - start)
    print((Layout(args.out_dir, res["critic"]).report() / "metrics.md").read_text(encoding="utf-8"))
    return m


if __name__ == "__main__":
    common.run_cli(main, parse_args)
