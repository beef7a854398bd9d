"""Stage 7: self-talk -- one model that critiques itself step by step inside its own solution,
against trajectory-level self-correction and the two-player (actor + critic) setup.

The paper's last section, in its three phases, then training and a comparison:
1. Inline feedback: each annotated path from 01-03 gets its step-level critique written right
   after each step (step, verdict + reason, step, verdict + reason, ...).
2. Iterative correction: at the first step marked Wrong the prefix before it is kept, the actor
   regenerates from there with that step's critique in its prompt (--candidates samples), the
   critic checks the new steps, and this repeats until no step is wrong and the final answer
   matches the gold answer.
   Chains still wrong after --max-rounds, or whose critique cannot be read, are dropped and counted.
3. Rewrite into self-talk: the stiff chain becomes first-person reflection ("Wait, 12 * 8 is 96,
   not 86. Let me fix it."), by a deterministic template rewriter with varied phrasings (offline
   default) or by a rewriting model / endpoint. A rewrite is kept only if its last stated answer
   is still the gold answer and the steps it keeps check out (common.arithmetic_slips).
4. Train and compare: from the same base model (--actor) and the same chains, common.sft_train
   makes a self-talk model and a trajectory-level self-correction model (whole solution, then a
   critique of it, then a revised solution). On the test split: both models alone, and the
   two-player setup (the base actor, then one critique -> refine round with the critic through
   common.critique_and_refine, as in 05).

Reads `--annotations` (02's rows: question, steps, critique, gold_answer, reference_steps, ...),
`--problems` (a test split, stage-0 schema) and `--fewshot-pool`. Writes under `--out-dir`
(default out/self_talk):
  generations/*.jsonl      raw model text keyed by id: the resume cache (everything below is
                           rebuilt from it, so a killed run reruns to the same files)
  chains.jsonl             one row per path: inline feedback, every correction round, status
  self_talk_sft.jsonl, trajectory_sft.jsonl   the two training sets (same chains, same size)
  data_stats.json          what was kept and dropped in phases 1-3, and why
  models/self_talk/, models/trajectory/       the two fine-tuned models (safetensors)
  per_problem.jsonl, metrics.json, metrics.md, comparison.png   the comparison
The critic (--critic: the trained critic, any model, `api:MODEL`, or `rules`) is named in every
output; --eval-critic gives the two-player setup another one.

Choices where the paper is silent:
- A correction round keeps the verified steps before the first Wrong one as a prefix the actor
  continues (Engine.generate with prefixes); the wrong step and its critique go into the prompt.
  The critic then judges the whole new solution, but only its verdicts on the new steps count:
  the prefix was checked already. Of the --candidates continuations the chain keeps one that ends
  right, else one with a Wrong step (it can go on) and the most new correct steps: a 135M actor
  rarely repairs a chain in one sample (1 of 24 chains in 3 rounds with one sample here). The
  chain keeps the wrong step, its reason and the new steps,
  so the rewrite can show the mistake and the reflection. A chain whose critic marks no step
  Wrong but whose answer is not the gold answer is dropped (nothing to reflect on).
- Paths are chosen before the loop (--max-paths): up to a quarter already-correct paths (they
  teach the model to go on without reflecting), the rest flawed, in a fixed seeded order.
- The template rewriter writes every step as it is and, after a Wrong step, one reflection line:
  an opener ("Wait,", "Hmm,", "Hold on:", ...), the critique's reason turned into the first
  person, and a closer ("Let me fix it.", ...), drawn by a seed per chain. A reflection is a line
  that starts with one of these openers (REFLECTION); that is also how the trained model's
  reflections are counted at test time.
- Trajectory-level data from the same chains: the original path, "Let me check my solution step
  by step.", its 02 critique, and for a flawed path "Revised solution:" with the corrected steps.
  Both models get the zero-shot actor prompt (the one they were trained on) and the same token
  budget; the answer of either is the last one it states. The two-player actor is the untrained
  base model with the few-shot prompt of 05 (common.solve_messages).
- A reflection "turns a wrong step right" when the step before it has an arithmetic slip and the
  step after it has none (common.arithmetic_slips); "right step wrong" the other way round;
  steps without a computation cannot be judged and are counted apart.
- Accuracy is sample 1 of each problem with a Wilson 95% interval (what one run gives); Pass@k
  and MV@k are estimated from all --samples samples (common.pass_at_k, common.mv_at_k).

    python 07_self_talk.py --critic rules --limit 12       # CPU default: 32 paths, 12 test problems
    python 07_self_talk.py --critic out/critic --limit 12 --rewriter Qwen/Qwen2.5-1.5B-Instruct
    python 07_self_talk.py --actor meta-llama/Meta-Llama-3-8B-Instruct --critic out/critic \\
        --rewriter api:Qwen2.5-72B-Instruct --rewriter-url http://localhost:8000/v1 --backend vllm \\
        --max-paths 0 --limit 0 --samples 8 --epochs 3 --lr 5e-6 --batch-size 8 --grad-accum 32 \\
        --max-new-tokens 1024 --critic-max-new-tokens 1536
"""
import argparse
import hashlib
import random
import re
import time
from argparse import Namespace
from collections import Counter
from pathlib import Path

import common
from common import (ResumableWriter, UsageError, accuracy_ci, actor_messages, answer_classes,
                    answers_match, extract_answer, join_steps, parse_critique, pct,
                    split_steps)

FIELDS = ["id", "question", "steps", "critique", "gold_answer", "reference_steps"]

# -----------------------------------------------------------------------------
# Phase 1: inline feedback -- each step followed by its verdict and reason


def inline_feedback(steps: list[str], critique: str) -> list[dict] | None:
    """The path as a chain of events {step, correct, reason, round}, each step with its own
    verdict; None when the critique does not give exactly one readable verdict per step."""
    crit = parse_critique(critique, n_steps=len(steps))
    if not steps or crit.problems:
        return None
    return [{"step": s, "correct": v.correct, "reason": v.explanation, "round": 0}
            for s, v in zip(steps, crit.steps)]


def render_inline(events: list[dict]) -> str:
    """The stiff chain as text: a step, then 'Verdict: Correct.|Wrong. <reason>', and so on."""
    lines = []
    for e in events:
        lines += [e["step"], f"Verdict: {'Correct' if e['correct'] else 'Wrong'}. {e['reason']}".rstrip()]
    return "\n".join(lines)


def up_to_first_wrong(events: list[dict]) -> list[dict]:
    """Events up to and including the first Wrong one: what comes after it is discarded."""
    for i, e in enumerate(events):
        if not e["correct"]:
            return events[:i + 1]
    return events


def solution_steps(events: list[dict]) -> list[str]:
    """The current solution: every step still standing (a Wrong step was replaced by what
    followed it, so the correct steps in order are the solution)."""
    return [e["step"] for e in events if e["correct"]]


# -----------------------------------------------------------------------------
# Phase 2: iterative correction (actor regenerates from the first Wrong step, critic checks)


def new_chain(row: dict) -> dict:
    """A chain's state before any correction round."""
    events = inline_feedback(row["steps"], row["critique"])
    chain = {"id": row["id"], "problem_id": row.get("problem_id", row["id"]),
             "question": row["question"], "gold_answer": str(row["gold_answer"]),
             "reference_steps": row["reference_steps"], "source": row.get("source", "builtin"),
             "method": row.get("method"), "original_steps": row["steps"],
             "original_critique": row["critique"], "events": None, "rounds": 0,
             "status": "open", "drop_reason": None}
    if events is None:
        chain.update(status="dropped", drop_reason="critique unreadable")
    else:
        chain.update(events=up_to_first_wrong(events), inline=render_inline(events))
    return chain


def settle(chain: dict, max_rounds: int) -> None:
    """Close a chain that is finished: right (no Wrong step, gold answer) or out of options."""
    if chain["status"] != "open":
        return
    # a round appends steps up to its first Wrong one, so a mistake still standing is the last event
    if chain["events"][-1]["correct"]:
        ok = answers_match(chain["gold_answer"], extract_answer(join_steps(solution_steps(chain["events"]))))
        chain.update(status="done") if ok else chain.update(
            status="dropped", drop_reason="no step marked Wrong but the answer is wrong")
    elif chain["rounds"] >= max_rounds:
        chain.update(status="dropped", drop_reason="still wrong after the round limit")


def continue_messages(chain: dict, shots: list[dict], k: int, seed: int = 0) -> list[dict]:
    """The actor's prompt for a correction round: the kit's solve prompt (k worked examples)
    with the step that was wrong and why; the verified steps before it are the assistant prefix
    the actor continues."""
    wrong = chain["events"][-1]
    problem = {"id": chain["problem_id"], "question": chain["question"], "source": chain["source"]}
    messages = common.solve_messages(problem, shots, k, seed)
    messages[-1]["content"] = (
        f"{chain['question']}\n\nA teacher checked an earlier attempt. This step was wrong:\n"
        f"{wrong['step']}\nWhy: {wrong['reason'] or 'it is not correct.'}\n"
        "Write the solution again, one step per line, fixing that step and continuing to the answer.")
    return messages


def judge_candidate(chain: dict, new_steps: list[str], critique: str, round_no: int) -> list[dict] | None:
    """A candidate continuation as events, with the critic's verdicts on the new steps only (the
    prefix was checked already), up to the first Wrong one; None if the critique is unreadable."""
    prefix = solution_steps(chain["events"])
    crit = parse_critique(critique, n_steps=len(prefix) + len(new_steps))
    if crit.problems:
        return None
    added = [{"step": s, "correct": v.correct, "reason": v.explanation, "round": round_no}
             for s, v in zip(new_steps, crit.steps[len(prefix):])]
    return up_to_first_wrong(added)


def best_candidate(chain: dict, candidates: list[list[dict]]) -> list[dict]:
    """The candidate to keep: one that ends right (no Wrong step, gold answer), else one that can
    still be corrected (it has a Wrong step) with the most new correct steps; the first on ties."""
    def score(added):
        clean = added[-1]["correct"]
        right = clean and answers_match(chain["gold_answer"], extract_answer(
            join_steps(solution_steps(chain["events"] + added))))
        return right, not clean, sum(e["correct"] for e in added)
    return max(candidates, key=score)  # max keeps the first of equal scores


def apply_round(chain: dict, candidates: list[list[str]], critiques: list[str], round_no: int) -> None:
    """Replace what followed the first Wrong step by the best judged candidate."""
    chain["rounds"] = round_no
    written = [(s, c) for s, c in zip(candidates, critiques) if s]
    if not written:
        return  # nothing written: the next round tries again with another seed
    judged = [a for a in (judge_candidate(chain, s, c, round_no) for s, c in written) if a is not None]
    if not judged:
        chain.update(status="dropped", drop_reason="critique of a correction unreadable")
        return
    chain["events"] = chain["events"] + best_candidate(chain, judged)


def correct_chains(chains: list[dict], regenerate, critique, max_rounds: int) -> list[dict]:
    """Run correction rounds until every chain is done or dropped.

    regenerate(round, chains) -> per chain a list of candidate continuations (new steps after
    the kept prefix); critique(round, jobs) -> for each job (chain, candidate number, whole new
    solution) the critique text. Both are called once per round on every chain still open, so a
    round is one batched generate call and one batch of critiques."""
    for chain in chains:
        settle(chain, max_rounds)
    for round_no in range(1, max_rounds + 1):
        todo = [c for c in chains if c["status"] == "open"]
        if not todo:
            break
        candidates = regenerate(round_no, todo)
        jobs = [(i, j) for i, cands in enumerate(candidates) for j, steps in enumerate(cands) if steps]
        texts = critique(round_no, [(todo[i], j, solution_steps(todo[i]["events"]) + candidates[i][j])
                                    for i, j in jobs]) if jobs else []
        by_job = dict(zip(jobs, texts))
        for i, chain in enumerate(todo):
            apply_round(chain, candidates[i], [by_job.get((i, j), "") for j in range(len(candidates[i]))],
                        round_no)
            settle(chain, max_rounds)
    return chains


def choose_paths(rows: list[dict], max_paths: int, seed: int) -> list[dict]:
    """Up to a quarter already-correct paths, the rest flawed, in a seeded order (0 = all)."""
    order = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    if not max_paths:
        return order
    right = [r for r in order if r.get("is_correct")]
    flawed = [r for r in order if not r.get("is_correct")]
    n_right = min(len(right), max_paths // 4)
    chosen = right[:n_right] + flawed[:max_paths - n_right]
    return chosen + right[n_right:max_paths - len(chosen) + n_right]  # fill up if flaws are few


# -----------------------------------------------------------------------------
# Phase 3: rewrite the chain into first-person self-talk, then check the rewrite

OPENERS = ["Wait, {r}", "Hmm, {r}", "Hold on: {r}", "Let me check that: {r}", "Actually, {r}",
           "Oops, {r}"]
CLOSERS = ["Let me fix it.", "So let me redo that step.", "I'll correct that.", "Let me try that again.",
           "So that step needs redoing.", "Let me work it out again."]
REFLECTION = re.compile(r"^\s*(wait|hmm|hold on|hang on|oops|actually|on second thought|"
                        r"let me (?:re-?)?check|let me double-check|that'?s not right|no,)\b", re.IGNORECASE)
# The rules critic writes its reasons about "it" (the step) and, being reference-aware, names the
# gold answer; the speaker of self-talk owns the reasons and cannot know the gold answer.
_PAST = {"uses": "used", "carries": "carried", "needs": "needed", "counts": "counted",
         "leaves": "left", "combines": "combined"}
_FIRST_PERSON = [(re.compile(r"\.\s+Also,.*$", re.I | re.S), "."),  # the first, most definite finding
                 (re.compile(r"\s*;\s*the (correct answer is|question asks for) [^;]*?(?=[.;]?$)", re.I), ""),
                 (re.compile(r"\bdoes not match the correct answer \S+?(?=[.;]?$)", re.I), "cannot be right"),
                 (re.compile(r"^the solution never states\b", re.I), "I never stated"),
                 # "It uses 5, ...", and after 02's redone step "...: it uses the wrong operation."
                 (re.compile(r"(?:^|(?<=: )|(?<=where ))it (uses|carries|needs|counts|leaves|combines)\b", re.I),
                  lambda m: "I " + _PAST[m.group(1).lower()]),
                 (re.compile(r"^it does not\b", re.I), "I did not"),
                 (re.compile(r"^(it|this step)\b", re.I), "that step"),
                 (re.compile(r"\bthe student\b", re.I), "I"),
                 (re.compile(r"\bfrom step \d+\b", re.I), "from an earlier step")]


def first_person(reason: str) -> str:
    """A critique reason as the speaker's own thought: 'It uses 5, but ...' -> 'I used 5, but ...';
    only its first finding, and never the gold answer."""
    text = reason.strip()
    for pattern, repl in _FIRST_PERSON:
        text = pattern.sub(repl, text).strip()
    text = text.rstrip(" ;,") or "that step is not right"
    if text[0].isupper() and not re.match(r"^(I\b|[A-Z]{2})", text):
        text = text[0].lower() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def template_self_talk(events: list[dict], key: str) -> str:
    """The deterministic rewriter: every step as written, a reflection line after each Wrong one."""
    rng = random.Random(f"self-talk:{key}")
    lines = []
    for e in events:
        lines.append(e["step"])
        if not e["correct"]:
            lines.append(rng.choice(OPENERS).format(r=first_person(e["reason"])) + " " + rng.choice(CLOSERS))
    return "\n".join(lines)


def rewriter_messages(chain: dict) -> list[dict]:
    """A rewriting model's prompt: the checked chain and how self-talk reads."""
    system = ("You rewrite a checked math solution as a student thinking aloud. Copy every step "
              "marked Correct as its own line. Right after a step marked Wrong, copy that step and "
              "then write one line that starts with 'Wait,' and says in the first person what is "
              "wrong with it; then go on with the steps that follow. Write no verdict lines and "
              "nothing else. Keep every number as it is; the last line states the final answer.")
    user = f"Problem:\n{chain['question']}\n\nChecked solution:\n{render_inline(chain['events'])}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_self_talk(text: str) -> dict:
    """Steps and reflections of a self-talk text. A reflection is about the step just before it;
    the solution it ends with is the steps minus the ones reflected on."""
    steps, reflections = [], []
    for line in split_steps(text or ""):
        if REFLECTION.match(line) and steps:
            reflections.append({"line": line, "before": len(steps) - 1})
        else:
            steps.append(line)
    retracted = {r["before"] for r in reflections}
    for r in reflections:
        r["after"] = r["before"] + 1 if r["before"] + 1 < len(steps) else None
    return {"steps": steps, "reflections": reflections,
            "final_steps": [s for i, s in enumerate(steps) if i not in retracted]}


# A small actor echoes its correction prompt ("This step was wrong ..."); such a line is no step.
META = re.compile(r"\b(teacher|wrong|incorrect|mistakes?|correct answer)\b", re.IGNORECASE)


def check_rewrite(text: str, gold: str, corrected: bool) -> str | None:
    """Why a rewrite must be dropped (None: keep it). It must still end on the gold answer, the
    steps it keeps must be steps (no talk about mistakes outside a reflection), they and the
    reflections must have no arithmetic slip, and a corrected chain must still show a reflection."""
    talk = parse_self_talk(text)
    if not talk["steps"]:
        return "empty rewrite"
    answer = extract_answer(text)
    if answer is None:
        return "no final answer"
    if not answers_match(gold, answer):
        return "final answer changed"
    if any(META.search(step) for step in talk["final_steps"]):
        return "talk about a mistake outside a reflection"
    if common.arithmetic_slips(talk["final_steps"]):
        return "arithmetic slip in a kept step"
    if common.arithmetic_slips([r["line"] for r in talk["reflections"]]):
        return "arithmetic slip in a reflection"
    if corrected and not talk["reflections"]:
        return "reflection lost"
    return None


# -----------------------------------------------------------------------------
# Training data: the same chains as self-talk and as trajectory-level self-correction

CHECK_LINE = "Let me check my solution step by step."
REVISED_LINE = "Revised solution:"


def trajectory_text(chain: dict) -> str:
    """Whole solution -> critique of it -> revised solution (only when the first one was wrong)."""
    parts = [join_steps(chain["original_steps"]), CHECK_LINE + "\n" + chain["original_critique"]]
    final = solution_steps(chain["events"])
    if final != chain["original_steps"]:
        parts.append(REVISED_LINE + "\n" + join_steps(final))
    return "\n\n".join(parts)


def sft_record(chain: dict, reply: str) -> dict:
    return {"id": chain["id"], "problem_id": chain["problem_id"], "rounds": chain["rounds"],
            "messages": actor_messages(chain["question"], chain["source"] == "math")
            + [{"role": "assistant", "content": reply}]}


def trajectory_answer(text: str) -> tuple[str | None, bool]:
    """(answer before the critique, whether a revision was written) of a trajectory output."""
    first = text.split(CHECK_LINE)[0]
    return extract_answer(first), REVISED_LINE in text


# -----------------------------------------------------------------------------
# Test-time measures: scores per system, and what the self-talk model's reflections do


def step_state(step: str) -> str | None:
    """'right' / 'wrong' by the arithmetic reader, None when the step computes nothing."""
    if not common.find_computations(step):
        return None
    return "wrong" if common.arithmetic_slips([step]) else "right"


def reflection_effects(texts: list[str]) -> dict:
    """How often outputs reflect, and what each reflection does to the step it is about."""
    effects = Counter()
    n_reflecting = n_reflections = 0
    for text in texts:
        talk = parse_self_talk(text)
        n_reflecting += bool(talk["reflections"])
        n_reflections += len(talk["reflections"])
        for r in talk["reflections"]:
            before = step_state(talk["steps"][r["before"]])
            after = step_state(talk["steps"][r["after"]]) if r["after"] is not None else None
            effects["unjudged" if before is None or after is None else f"{before}_to_{after}"] += 1
    return {"outputs": len(texts), "outputs_reflecting": n_reflecting,
            "reflect_rate": n_reflecting / len(texts) if texts else None, "reflections": n_reflections,
            **{k: effects[k] for k in ("wrong_to_right", "right_to_wrong", "wrong_to_wrong",
                                       "right_to_right", "unjudged")}}


def score_system(answers: list[list[str | None]], golds: list[str], ks: list[int]) -> dict:
    """answers[problem][sample] -> acc of sample 1 with a 95% CI, Pass@k and MV@k estimates."""
    correct = [[answers_match(g, a) for a in row] for row, g in zip(answers, golds)]
    n = len(answers)
    acc, lo, hi = accuracy_ci(sum(c[0] for c in correct), n)
    out = {"n": n, "acc": acc, "ci": [lo, hi], "correct_first": sum(c[0] for c in correct),
           "no_answer": sum(a is None for row in answers for a in row) / max(1, sum(map(len, answers)))}
    for k in ks:
        out[f"pass@{k}"] = sum(common.pass_at_k(len(c), sum(c), k) for c in correct) / max(1, n)
        if k > 1:  # a vote of one is pass@1
            out[f"mv@{k}"] = sum(common.mv_at_k(answer_classes(row), c, k)
                                 for row, c in zip(answers, correct)) / max(1, n)
    return out


# -----------------------------------------------------------------------------
# Running it: phases 1-3 on the annotated paths, training, evaluation on the test split


def load_annotations(path: str) -> list[dict]:
    rows = common.read_jsonl(path, FIELDS)
    if not rows:
        raise UsageError(f"{path}: no annotated paths (run 01-02 first)")
    return rows


def build_chains(args, critic, gen: Path) -> list[dict]:
    """Phases 1 and 2: inline feedback, then correction rounds with cached actor and critic text."""
    rows = choose_paths(load_annotations(args.annotations), args.max_paths, args.seed)
    chains = [new_chain(r) for r in rows]
    actor = common.engine_from_args(args, args.actor)
    shots = common.read_jsonl(args.fewshot_pool) if args.fewshot else []
    assemble = common.load_stage_module("01_generate_errors").assemble
    with ResumableWriter(gen / "correction_actor.jsonl") as aw, \
            ResumableWriter(gen / "correction_critic.jsonl") as cw:

        def regenerate(round_no, todo):
            prefixes = [solution_steps(c["events"]) for c in todo]
            ids = [[f"{c['id']}:r{round_no}:{j}" for j in range(args.candidates)] for c in todo]
            missing = [i for i, row_ids in enumerate(ids) if any(r not in aw for r in row_ids)]
            if missing:  # size `auto` on every round this job may still need
                actor.plan(len(missing) * args.candidates * (args.max_rounds - round_no + 1), args.max_new_tokens)
            for s in range(0, len(missing), args.chunk_size):
                part = missing[s:s + args.chunk_size]
                outs = actor.generate([continue_messages(todo[i], shots, args.fewshot, args.seed) for i in part],
                                      n=args.candidates, temperature=args.temperature,
                                      max_new_tokens=args.max_new_tokens, seed=args.seed + 1000 * round_no + s,
                                      prefixes=[join_steps(prefixes[i]) + "\n" if prefixes[i] else "" for i in part],
                                      desc=f"correction round {round_no}")
                for i, texts in zip(part, outs):
                    for row_id, text in zip(ids[i], texts):
                        aw.write({"id": row_id, "text": text})  # ids already there are kept as they are
            text = {r["id"]: r["text"] for r in aw.rows}
            return [[assemble(p, text[r])[len(p):] for r in row_ids] for p, row_ids in zip(prefixes, ids)]

        def critique(round_no, jobs):
            items = [{"id": f"{c['id']}:r{round_no}:{j}", "question": c["question"], "steps": steps,
                      "reference_steps": c["reference_steps"], "gold_answer": c["gold_answer"]}
                     for c, j, steps in jobs]
            return critic.critique(items, cw, desc=f"critique round {round_no}")

        correct_chains(chains, regenerate, critique, args.max_rounds)
    return chains


def rewrite_chains(args, chains: list[dict], gen: Path) -> tuple[list[dict], Counter]:
    """Phase 3: a self-talk text per finished chain, checked; -> kept chains, drop reasons."""
    done = [c for c in chains if c["status"] == "done"]
    if args.rewriter == "template":
        texts = {c["id"]: template_self_talk(c["events"], f"{args.seed}:{c['id']}") for c in done}
    else:
        if args.rewriter.startswith("api:"):
            engine = common.OpenAIChat(args.rewriter[len("api:"):], args.rewriter_url)
        else:
            engine = common.get_engine(args.rewriter, common.local_backend(args), args.device)
        with ResumableWriter(gen / "rewrites.jsonl") as w:
            texts = common.cached_generate(engine, w, [([c["id"]], rewriter_messages(c)) for c in done],
                                           args.chunk_size, "rewrite", args.seed, temperature=0.0,
                                           max_new_tokens=2 * args.max_new_tokens)
    drops = Counter()
    kept = []
    for c in done:
        corrected = any(not e["correct"] for e in c["events"])
        why = check_rewrite(texts.get(c["id"], ""), c["gold_answer"], corrected)
        c["self_talk"], c["rewrite_drop"] = texts.get(c["id"]), why
        if why:
            drops[why] += 1
        else:
            kept.append(c)
    return kept, drops


def data_stats(chains: list[dict], kept: list[dict], rewrite_drops: Counter, args, critic_name: str) -> dict:
    done = [c for c in chains if c["status"] == "done"]
    return {"critic": critic_name, "rewriter": args.rewriter, "max_rounds": args.max_rounds,
            "candidates": args.candidates,
            "paths": len(chains),
            "already_right": sum(c["status"] == "done" and c["rounds"] == 0 for c in chains),
            "corrected": sum(c["status"] == "done" and c["rounds"] > 0 for c in chains),
            "corrected_by_rounds": dict(sorted(Counter(c["rounds"] for c in done if c["rounds"]).items())),
            "dropped_in_correction": dict(Counter(c["drop_reason"] for c in chains
                                                  if c["status"] == "dropped").most_common()),
            "rewrites_dropped": dict(rewrite_drops.most_common()),
            "training_examples": len(kept),
            "training_examples_with_reflection": sum(any(not e["correct"] for e in c["events"]) for c in kept)}


def train_models(args, records: dict, out: Path) -> dict:
    """Both models from the same base, same chains, same settings (sft_train resumes itself)."""
    paths = {}
    for name, recs in records.items():
        paths[name] = common.sft_train(args.actor, recs, out / "models" / name, epochs=args.epochs,
                                       lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                       max_length=args.max_length, device=args.device, seed=args.seed)
    return paths


def plan(engine, writer, n_rows: int, per_row: int, max_new_tokens: int) -> None:
    """Size `auto` on the generations still missing from a cache (nothing missing: no backend)."""
    missing = n_rows - len(writer.done)
    if missing > 0:
        engine.plan(missing * per_row, max_new_tokens)


def evaluate(args, problems: list[dict], models: dict, critic, gen: Path) -> tuple[dict, dict]:
    """Samples of every system on the test problems (cached); -> answers and raw texts by system."""
    k, shots = args.samples, common.read_jsonl(args.fewshot_pool) if args.fewshot else []
    sampling = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    ids = {p["id"]: [f"{p['id']}:{j}" for j in range(k)] for p in problems}
    texts, answers = {}, {}
    for name, path in models.items():
        engine = common.get_engine(path, common.local_backend(args), args.device)
        # the trajectory model writes a solution, a critique of it and a revision
        budget = dict(sampling, max_new_tokens=args.trajectory_max_new_tokens) if name == "trajectory" else sampling
        with ResumableWriter(gen / f"eval_{name}.jsonl") as w:
            plan(engine, w, len(problems) * k, 1, budget["max_new_tokens"])
            jobs = [(ids[p["id"]], actor_messages(p["question"], common.is_boxed_style(p))) for p in problems]
            got = common.cached_generate(engine, w, jobs, args.chunk_size, f"eval {name}", args.seed, **budget)
        texts[name] = [[got[i] for i in ids[p["id"]]] for p in problems]
        answers[name] = [[extract_answer(t) for t in row] for row in texts[name]]
        engine.close()
    actor = common.engine_from_args(args, args.actor)
    with ResumableWriter(gen / "eval_actor.jsonl") as w:
        plan(actor, w, len(problems) * k, 2, args.max_new_tokens)  # samples, then as many refinements
        jobs = [(ids[p["id"]], common.solve_messages(p, shots, args.fewshot, args.seed)) for p in problems]
        got = common.cached_generate(actor, w, jobs, args.chunk_size, "eval actor", args.seed, **sampling)
    texts["actor"] = [[got[i] for i in ids[p["id"]]] for p in problems]
    answers["actor"] = [[extract_answer(t) for t in row] for row in texts["actor"]]
    items = [{"id": i, "question": p["question"], "steps": split_steps(t), "boxed": common.is_boxed_style(p),
              "reference_steps": p["reference_steps"], "gold_answer": str(p["answer"])}
             for p, row in zip(problems, texts["actor"]) for i, t in zip(ids[p["id"]], row)]
    with ResumableWriter(gen / "two_player_critiques.jsonl") as cw, \
            ResumableWriter(gen / "two_player_refinements.jsonl") as rw:
        refined = common.critique_and_refine(actor, critic, items, seed=args.seed + 1, critique_writer=cw,
                                             refine_writer=rw, chunk_size=args.chunk_size,
                                             desc="two-player", **sampling)
    answers["two_player"] = [[r["refined_answer"] for r in refined[j * k:(j + 1) * k]] for j in range(len(problems))]
    texts["two_player_verdicts"] = [[r["verdict"] for r in refined[j * k:(j + 1) * k]] for j in range(len(problems))]
    return answers, texts


# -----------------------------------------------------------------------------
# Report: metrics.md and comparison.png

LABELS = {"self_talk": "self-talk model alone", "trajectory": "trajectory-level self-correction",
          "two_player": "two-player: actor + critic, critique -> refine", "actor": "actor alone (base, few-shot)"}


def write_report(out: Path, m: dict) -> None:
    c, s, ks = m["config"], m["data"], m["config"]["ks"]
    lines = ["# Self-talk vs trajectory-level self-correction vs two-player", "",
             f"base model `{c['actor']}`; data critic `{c['critic']}`; two-player critic `{c['eval_critic']}`; "
             f"rewriter `{c['rewriter']}`; {m['n_problems']} test problems from `{c['problems']}`, "
             f"{c['samples']} samples each at temperature {c['temperature']}; wall time {m['wall_s']:.0f} s", "",
             "## Training data (phases 1-3)", "",
             f"{s['paths']} annotated paths: {s['already_right']} right already, {s['corrected']} corrected "
             f"(rounds: {s['corrected_by_rounds'] or '-'}), dropped in correction {s['dropped_in_correction'] or '-'}; "
             f"rewrites dropped {s['rewrites_dropped'] or '-'}. Both models train on the same "
             f"{s['training_examples']} chains ({s['training_examples_with_reflection']} with a reflection), "
             f"{c['epochs']} epoch(s), lr {c['lr']}.", "",
             "## Test split", "",
             "| system | acc % [95% CI] (sample 1) | " + " | ".join(f"Pass@{k}" for k in ks) + " | "
             + " | ".join(f"MV@{k}" for k in ks[1:]) + " | no answer % |",
             "|---|---|" + "---|" * (2 * len(ks) - 1) + "---|"]
    for name in ("self_talk", "trajectory", "two_player", "actor"):
        r = m["systems"][name]
        lines.append(f"| {LABELS[name]} | {pct(r['acc'])} [{pct(r['ci'][0])}, {pct(r['ci'][1])}] | "
                     + " | ".join(pct(r[f"pass@{k}"]) for k in ks) + " | "
                     + " | ".join(pct(r[f"mv@{k}"]) for k in ks[1:]) + f" | {pct(r['no_answer'])} |")
    rf, tr = m["reflection"], m["trajectory_revisions"]
    lines += ["", "Pass@k and MV@k are estimates over all samples of a problem (common.pass_at_k, common.mv_at_k).", "",
              "## What the self-talk model's reflections do", "",
              f"{rf['outputs_reflecting']} of {rf['outputs']} outputs reflect ({pct(rf['reflect_rate'])}%), "
              f"{rf['reflections']} reflections. Judged by the arithmetic reader on the step before and the "
              f"step after a reflection: wrong -> right {rf['wrong_to_right']}, right -> wrong {rf['right_to_wrong']}, "
              f"wrong -> wrong {rf['wrong_to_wrong']}, right -> right {rf['right_to_right']}, "
              f"no computation to judge {rf['unjudged']}.", "",
              f"Trajectory model: {tr['revised']} of {tr['outputs']} outputs write a revised solution; "
              f"{tr['answer_changed']} of them change the answer ({tr['wrong_to_right']} wrong -> right, "
              f"{tr['right_to_wrong']} right -> wrong)."]
    common.write_text_atomic(out / "metrics.md", "\n".join(lines) + "\n")


def plot(out: Path, m: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["self_talk", "trajectory", "two_player", "actor"]
    ks = m["config"]["ks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    accs = [100 * m["systems"][n]["acc"] for n in names]
    errs = [[a - 100 * m["systems"][n]["ci"][0] for a, n in zip(accs, names)],
            [100 * m["systems"][n]["ci"][1] - a for a, n in zip(accs, names)]]
    axes[0].bar(range(len(names)), accs, yerr=errs, capsize=4, color=["C0", "C1", "C2", "C7"])
    axes[0].set_xticks(range(len(names)), [LABELS[n].split(":")[0] for n in names], rotation=15, fontsize=8)
    axes[0].set(ylabel="accuracy % (sample 1, 95% CI)", ylim=(0, 100), title=f"n = {m['n_problems']} problems")
    for n, color in zip(names, ["C0", "C1", "C2", "C7"]):
        r = m["systems"][n]
        axes[1].plot(ks, [100 * r[f"pass@{k}"] for k in ks], "o-", color=color, label=f"{LABELS[n].split(':')[0]} Pass@k")
        axes[1].plot(ks[1:], [100 * r[f"mv@{k}"] for k in ks[1:]], "s--", color=color, alpha=0.6)
    axes[1].set(xlabel="k (solid: Pass@k, dashed: MV@k)", ylabel="%", ylim=(0, 100), xticks=ks)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", default="out/annotations.jsonl", help="02's annotated paths")
    p.add_argument("--problems", default="data/builtin_test.jsonl", help="test split for the comparison")
    p.add_argument("--out-dir", default="out/self_talk", help="where data, models, generations and metrics go")
    p.add_argument("--actor", default=None,
                   help="the actor that regenerates, the base both models are trained from, the two-player "
                        f"actor (default: {common.DEFAULT_MODEL}; with --backend openai, the model served)")
    common.add_critic_args(p)
    p.add_argument("--eval-critic", default=None, help="critic of the two-player setup (default: --critic)")
    p.add_argument("--rewriter", default="template",
                   help="template (offline, deterministic), a model (HF id or folder) or api:MODEL")
    p.add_argument("--rewriter-url", default="http://localhost:8000/v1", help="api rewriter: server base URL")
    # --backend openai: the actor is served (its weights are still needed here for training);
    # the models this stage trains, a critic folder and a rewriter model run here
    common.add_backend_args(p, served=True)
    common.add_fewshot_args(p)
    p.add_argument("--max-paths", type=common.count, default=32,
                   help="annotated paths that enter the correction loop (0 = all)")
    p.add_argument("--max-rounds", type=common.positive, default=4, help="correction rounds per chain")
    p.add_argument("--candidates", type=common.positive, default=4,
                   help="continuations the actor samples per chain and round; the critic's best is kept")
    p.add_argument("--limit", type=common.count, default=0, help="use the first N test problems (0 = all)")
    p.add_argument("--samples", type=common.positive, default=4, help="samples per test problem (k of Pass@k, MV@k)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every actor call")
    p.add_argument("--max-new-tokens", type=common.positive, default=192, help="tokens per actor generation")
    p.add_argument("--trajectory-max-new-tokens", type=common.count, default=0,
                   help="tokens per output of the trajectory-level model (0 = twice --max-new-tokens: "
                        "it writes a solution, a critique of it and a revision)")
    p.add_argument("--epochs", type=float, default=3, help="SFT epochs (both models)")
    p.add_argument("--lr", type=float, default=1e-4, help="SFT learning rate (paper: 5e-6 at 8B scale)")
    p.add_argument("--batch-size", type=common.positive, default=8, help="SFT per-device batch size")
    p.add_argument("--grad-accum", type=common.positive, default=1, help="SFT gradient accumulation")
    p.add_argument("--max-length", type=common.positive, default=1024, help="SFT max tokens per example")
    p.add_argument("--chunk-size", type=common.positive, default=256,
                   help="sequences per generate call; a killed run loses at most one chunk")
    p.add_argument("--seed", type=int, default=0, help="seed of path choice, sampling, rewriter and SFT")
    return p.parse_args(argv)


def main(args):
    start = time.time()
    out, gen = Path(args.out_dir), Path(args.out_dir) / "generations"
    args.trajectory_max_new_tokens = args.trajectory_max_new_tokens or 2 * args.max_new_tokens
    common.resolve_actor(args)
    critic = common.make_critic(args)
    eval_critic = critic if not args.eval_critic or args.eval_critic == args.critic else \
        common.make_critic(Namespace(**{**vars(args), "critic": args.eval_critic}))
    problems = common.take(common.read_jsonl(args.problems, ["id", "question", "answer", "reference_steps"]),
                           args.limit)
    if not problems:
        raise UsageError(f"{args.problems}: no test problems")
    config = {"actor": args.actor, "critic": critic.name, "eval_critic": eval_critic.name,
              "rewriter": args.rewriter, "annotations": Path(args.annotations).name,
              "max_paths": args.max_paths, "max_rounds": args.max_rounds, "candidates": args.candidates,
              "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "trajectory_max_new_tokens": args.trajectory_max_new_tokens,
              "fewshot": args.fewshot, "seed": args.seed}
    gen.mkdir(parents=True, exist_ok=True)
    common.guard_config(gen / "config.json", config)
    print(f"self-talk: actor {args.actor}, critic {critic.name}, rewriter {args.rewriter}")

    # --- phases 1 and 2: inline feedback, iterative correction
    chains = build_chains(args, critic, gen)
    # --- phase 3: rewrite into self-talk, keep what still checks out
    kept, rewrite_drops = rewrite_chains(args, chains, gen)
    common.write_jsonl_atomic(out / "chains.jsonl", [{k: v for k, v in c.items() if k != "reference_steps"}
                                                      for c in chains])
    stats = data_stats(chains, kept, rewrite_drops, args, critic.name)
    common.write_json_atomic(out / "data_stats.json", stats)
    print(f"data: {stats}")
    if not kept:
        raise UsageError("no chain survived correction and rewriting: nothing to train on "
                         f"(see {out / 'data_stats.json'}); try more --max-paths or --max-rounds")
    records = {"self_talk": [sft_record(c, c["self_talk"]) for c in kept],
               "trajectory": [sft_record(c, trajectory_text(c)) for c in kept]}
    for name, recs in records.items():
        common.write_jsonl_atomic(out / f"{name}_sft.jsonl", recs)

    # --- training: same base, same chains, same settings
    models = train_models(args, records, out)
    # --- the comparison on the test split
    answers, texts = evaluate(args, problems, models, eval_critic, gen)
    golds = [str(p["answer"]) for p in problems]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32) if k <= args.samples} | {args.samples})
    traj = [(trajectory_answer(t), a, g) for row, arow, g in zip(texts["trajectory"], answers["trajectory"], golds)
            for t, a in zip(row, arow)]
    revised = [(first, a, g) for (first, rev), a, g in traj if rev]
    changed = [(f, a, g) for f, a, g in revised if f != a and not answers_match(f, a)]
    m = {"config": {**config, "problems": Path(args.problems).name, "samples": args.samples, "ks": ks,
                    "epochs": args.epochs, "lr": args.lr},
         "n_problems": len(problems), "data": stats,
         "systems": {name: score_system(answers[name], golds, ks) for name in ("self_talk", "trajectory",
                                                                             "two_player", "actor")},
         "reflection": reflection_effects([t for row in texts["self_talk"] for t in row]),
         "trajectory_revisions": {
             "outputs": len(traj), "revised": len(revised), "answer_changed": len(changed),
             "wrong_to_right": sum(answers_match(g, a) and not answers_match(g, f) for f, a, g in changed),
             "right_to_wrong": sum(answers_match(g, f) and not answers_match(g, a) for f, a, g in changed)}}
    m["wall_s"] = round(time.time() - start, 1)
    common.write_jsonl_atomic(out / "per_problem.jsonl", [
        {"id": p["id"], "gold": g, **{f"{n}_answers": answers[n][i] for n in answers},
         "two_player_verdicts": texts["two_player_verdicts"][i]} for i, (p, g) in enumerate(zip(problems, golds))])
    common.write_json_atomic(out / "metrics.json", m)
    write_report(out, m)
    plot(out, m)
    print((out / "metrics.md").read_text(encoding="utf-8"))
    return m


if __name__ == "__main__":
    common.run_cli(main, parse_args)
