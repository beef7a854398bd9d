"""Stage 1 of AutoMathCritique: flawed reasoning paths for the critic to learn from.

Reads problems (00_prepare_data.py's output, default `data/builtin_train.jsonl`) and writes
`out/paths.jsonl`, one reasoning path per row (id = problem-method-j, question, reference, gold_answer, steps,
answer, is_correct, error_step, error_type, inserter), with three generators from the paper:

  rg1  sample the actor from scratch at a high temperature; keep the wrong paths and a share of
       the right ones (the critic must learn both verdicts). Known: only the final answer is wrong.
  rg2  keep steps 1..k-1 of a correct path and resample from step k at temperature 1.0; keep only
       wrong endings. Known: the first error is at or after step k (error_step = k).
  rg3  rewrite step k with a named mistake, let the actor continue from step k+1; keep only wrong
       endings. Known: location and type (error_step = k, error_type, inserter).
       `--rg3-continue program` skips the actor: the later steps of the template are recomputed
       from the wrong value (carry_forward), so thousands of paths cost no model call.
  reference  (opt-in) the reference solution as a known-correct path, for actors too weak to
       write correct paths themselves; without it the critic would only ever see "Wrong".

Where the paper is silent we chose:
- rg1 temperature 1.0: the paper says "high" and its only stated number (rg2) is 1.0.
- The rg2/rg3 template is the problem's first correct rg1 sample; a weak actor rarely has one,
  then the reference solution. k is uniform over steps 1..L-1 (never the "The answer is" step).
- The actor's prompt is the kit's one (common.solve_messages, as in solve.py and 05): --fewshot
  worked examples from --fewshot-pool, by default this file when it is a train split.
- A path ends at its first "answer is" line after the fixed prefix: small models keep talking.
  Paths with no answer are wrong paths (answer null) and are counted; empty paths are dropped.
- The program inserter perturbs one explicit `a op b = c` computation (builtin, GSM8K), so the
  mistake is exactly of its type; the model inserter works on any step and any type name.
  `--rg3-inserter auto` uses the program where a step has such a computation and the model
  otherwise (MATH's LaTeX solutions rarely have one); with `program` alone the stage says how
  many insertions found nothing to rewrite.
  Mistakes that the continuation repairs (right final answer) are dropped and counted.
- `paths.stats.json` counts per method what was generated, kept, wrong, correct, without an
  answer, and dropped (repaired, correct over the keep share, empty, failed insertion).
- Resuming: problems are cut into fixed chunks, each (chunk, method) gets its own seed and a
  chunk is regenerated whole if any of its problems is unfinished, so a resumed run writes the
  same rows as an uninterrupted one. `paths.jsonl.done` marks finished (problem, method) pairs
  and keeps their counts, so `paths.stats.json` covers earlier runs too.

    python 01_generate_errors.py --limit 20
    python 01_generate_errors.py --actor Qwen/Qwen2.5-7B-Instruct --backend vllm --rg1-samples 10 --chunk-size 512
    python 01_generate_errors.py --problems data/gsm8k_train.jsonl --rg3-inserter model
"""
import argparse
import random
import re
from fractions import Fraction
from pathlib import Path

import common
from common import (MathToken, ResumableWriter, check_solution, evaluate_tokens, find_computations,
                    format_number, join_steps, math_tokens, number_steps, read_jsonl, split_steps)

METHODS = ("rg1", "rg2", "rg3", "reference")
MISTAKES = {  # type -> what it means, shown to the model inserter
    "calculation error": "the numbers and the operation are right but the result is computed wrongly",
    "wrong operation": "the step uses the wrong operation, for example adds instead of multiplying",
    "misread quantity": "a number from the problem is copied wrongly",
    "skipped/duplicated quantity": "a quantity that belongs in the computation is left out or counted twice",
    "logic error": "the step uses the wrong earlier result, reasoning about the wrong quantity",
}

# -----------------------------------------------------------------------------
# Arithmetic inside a step: perturb one `a op b = c` (read by common.find_computations), rewrite it

def plain_computations(step):
    """The step's computations written `a op b ... = c` with plain numbers (no %, parentheses
    or words in between): the ones the program inserter can rewrite exactly."""
    found = []
    for c in find_computations(step):
        nums, ops = c.lhs[0::2], c.lhs[1::2]
        if (len(c.rhs) == 1 and len(nums) == len(ops) + 1
                and all(t.kind == "num" and "%" not in t.text for t in nums + c.rhs)
                and all(t.kind == "op" and t.op in "+-*/" for t in ops)
                and all(not step[a.end:b.start].strip() for a, b in zip(c.lhs, c.lhs[1:]))):
            found.append(c)
    return found


def value_of(values, ops):
    """Exact value of values[0] ops[0] values[1] ... (the shared evaluator); None on x / 0."""
    toks = [MathToken("num", "", 0, 0, value=values[0])]
    for op, v in zip(ops, values[1:]):
        toks += [MathToken("op", op, 0, 0, op=op), MathToken("num", "", 0, 0, value=v)]
    return evaluate_tokens(toks)


def replace_number(text, old, new):
    """Replace `old` where it stands as a whole number (not inside 120 or 2.5)."""
    return re.sub(rf"(?<![\d.,]){re.escape(old)}(?![\d]|[.,]\d)", new, text)


def _alternatives(v, rng, deltas=(1, -1, 2, -2, 10, -10)):
    """Plausible wrong versions of v: small slips and swapped digits."""
    cands = [v + d for d in deltas]
    digits = str(v.numerator)
    if v.denominator == 1 and len(digits) >= 2 and digits[-1] != digits[-2] and digits[-1] + digits[:-2] != "0":
        cands.append(Fraction(int(digits[:-2] + digits[-1] + digits[-2])))
    rng.shuffle(cands)
    return [c for c in cands if c != v and c > 0]


def perturb_calc(calc, kind, rng, question_numbers, earlier_values):
    """(terms, ops, result, {old operand: new operand}) of the computation rewritten with
    mistake `kind`, or None when the kind does not apply to it."""
    terms, ops, result = [t.text for t in calc.lhs[0::2]], [t.op for t in calc.lhs[1::2]], calc.rhs[0].text
    values, written = [t.value for t in calc.lhs[0::2]], calc.rhs[0].value
    true = calc.value
    whole = all(v.denominator == 1 for v in values + [written])

    def fine(r):  # a real change, no negative or fractional surprises in a whole-number world
        return (r is not None and r != written and r != true and (r >= 0 or written < 0)
                and (r.denominator == 1 or not whole))

    if kind == "calculation error":
        for r in _alternatives(written, rng):
            if fine(r):
                return terms, ops, format_number(r, result), {}
    elif kind == "wrong operation":
        swaps = {"+": "-*", "-": "+/", "*": "+/", "/": "*-"}
        for i in rng.sample(range(len(ops)), len(ops)):
            for new in swaps[ops[i]]:
                new_ops = ops[:i] + [new] + ops[i + 1:]
                r = value_of(values, new_ops)
                if fine(r):
                    return terms, new_ops, format_number(r, result), {}
    elif kind in ("misread quantity", "logic error"):
        # misread: an operand copied from the question is changed; logic: an operand that an
        # earlier step computed is swapped for another earlier value (a stale or wrong quantity)
        for i in rng.sample(range(len(terms)), len(terms)):
            v = values[i]
            if kind == "misread quantity":
                if v not in question_numbers:
                    continue
                cands = _alternatives(v, rng)
            else:
                if v not in earlier_values["results"]:
                    continue
                cands = [u for group in ("results", "operands")  # other results first
                         for u in rng.sample(sorted(earlier_values[group]), len(earlier_values[group]))
                         if u != v]
            for u in cands:
                r = value_of(values[:i] + [u] + values[i + 1:], ops)
                if fine(r):
                    new_terms = terms[:i] + [format_number(u, terms[i])] + terms[i + 1:]
                    return new_terms, ops, format_number(r, result), {terms[i]: new_terms[i]}
    elif kind == "skipped/duplicated quantity":
        options = [("dup", i) for i in range(1, len(terms)) if ops[i - 1] in "+-*"]
        options += [("skip", i) for i in range(1, len(terms)) if len(terms) >= 3]
        for how, i in rng.sample(options, len(options)):
            if how == "dup":
                keep, new_ops = list(range(i + 1)) + [i] + list(range(i + 1, len(terms))), ops[:i] + [ops[i - 1]] + ops[i:]
            else:
                keep, new_ops = list(range(i)) + list(range(i + 1, len(terms))), ops[:i - 1] + ops[i:]
            r = value_of([values[j] for j in keep], new_ops)
            if fine(r):
                return [terms[j] for j in keep], new_ops, format_number(r, result), {}
    return None


def insert_mistake(step, kind, rng, question_numbers, earlier_values):
    """The step with one computation rewritten (the last one it applies to), or None."""
    for calc in reversed(plain_computations(step)):
        new = perturb_calc(calc, kind, rng, question_numbers, earlier_values)
        if new is None:
            continue
        terms, ops, result, operand = new
        symbols = {t.op: t.text for t in calc.lhs[1::2]}  # how the step writes each operator
        expr = terms[0] + "".join(f" {symbols.get(op, op)} {t}" for op, t in zip(ops, terms[1:]))
        expr += f" = {result}"
        before, after = step[:calc.start], step[calc.end:]
        for old, repl in operand.items():  # "Adding 2 gives 5 + 2" misread as 3 says 3 twice
            before = replace_number(before, old.replace("$", ""), repl.replace("$", ""))
        after = replace_number(after, calc.rhs[0].text.replace("$", ""), result.replace("$", ""))
        return before + expr + after
    return None


def program_insert(steps, question, types, rng):
    """(k, rewritten step, type used, fell back?) for a random arithmetic step, or None.
    The drawn type comes first; if it does not apply to that step another type is used."""
    last = max(1, len(steps) - 1)
    eligible = [k for k in range(1, last + 1) if plain_computations(steps[k - 1])]
    wanted = rng.choice(types)
    question_numbers = {t.raw for t in math_tokens(question) if t.kind == "num"}
    for k in rng.sample(eligible, len(eligible)):
        earlier = {"results": set(), "operands": set()}
        for s in steps[:k - 1]:
            for c in plain_computations(s):
                earlier["results"].add(c.rhs[0].value)
                earlier["operands"].update(t.value for t in c.lhs[0::2])
        others = [t for t in types if t != wanted]
        for kind in [wanted] + rng.sample(others, len(others)):
            new = insert_mistake(steps[k - 1], kind, rng, question_numbers, earlier)
            if new is not None:
                return k, normalize_step(new), kind, kind != wanted
    return None


# -----------------------------------------------------------------------------
# The model inserter: a second model rewrites one step with a named mistake

def inserter_messages(question, steps, k, kind):
    hint = MISTAKES.get(kind, kind)
    system = ("You help build exercises where students find mistakes in math solutions. You rewrite "
              "one step of a correct solution so that it contains a specific mistake.")
    before = number_steps(steps[:k - 1]) if k > 1 else "(none)"
    user = (f"Problem:\n{question}\n\nSteps before it:\n{before}\n\nStep {k}:\n{steps[k - 1]}\n\n"
            f"Rewrite step {k} so that it contains a {kind} ({hint}). Keep its style and length, "
            "do not point out the mistake, and reply with the rewritten step only, on one line.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_inserted(text, original):
    """The rewritten step from the inserter's reply, or None if it is empty or unchanged."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if lines and lines[0].endswith(":") and len(lines) > 1:  # "Here is the rewritten step:"
        lines = lines[1:]
    if not lines:
        return None
    step = re.sub(r"^(rewritten step|new step)\s*:\s*", "", lines[0], flags=re.I)
    step = normalize_step(step.strip('"').strip())
    same = " ".join(step.split()).lower() == " ".join(original.split()).lower()
    return None if not step or same else step


# -----------------------------------------------------------------------------
# Paths: a fixed prefix plus what the actor wrote after it

ANSWER_LINE = re.compile(r"answer\s+is|^####", re.IGNORECASE)


def normalize_step(text):
    """One line with no "Step 3:" label, stable under split_steps (labels can nest)."""
    for _ in range(5):
        parts = split_steps(text)
        new = " ".join(parts)
        if new == text:
            break
        text = new
    return text


def assemble(fixed, continuation):
    """split_steps(prefix + continuation), cut after the first answer line past the prefix.
    The prefix ends with a newline, so the continuation can never merge into its last step."""
    steps = split_steps((join_steps(fixed) + "\n" if fixed else "") + continuation)
    for i in range(len(fixed), len(steps)):
        if ANSWER_LINE.search(steps[i]):
            return steps[:i + 1]
    return steps


def choose_k(n_steps, mode, rng):
    last = max(1, n_steps - 1)  # never the final "The answer is" step
    return {"first": 1, "last": last}.get(mode) or rng.randint(1, last)


def new_counts():
    return dict(generated=0, kept=0, wrong=0, correct=0, no_answer=0, repaired_dropped=0,
                correct_dropped=0, empty_dropped=0, insert_failed=0, type_fallbacks=0,
                from_actor_template=0, error_types={})


def grade_path(problem, steps, counts):
    """(answer, is it right?) against the gold answer; a path without an answer is counted."""
    answer, ok = check_solution(join_steps(steps), str(problem["answer"]))
    counts["no_answer"] += answer is None
    return answer, ok


def path_row(problem, method, j, steps, answer, ok, counts, error_step=None, error_type=None,
             inserter=None):
    counts["kept"] += 1
    counts["correct" if ok else "wrong"] += 1
    if error_type:
        counts["error_types"][error_type] = counts["error_types"].get(error_type, 0) + 1
    return {"id": f"{problem['id']}-{method}-{j}", "problem_id": problem["id"],
            "source": problem.get("source"), "question": problem["question"],
            "reference_steps": problem["reference_steps"], "gold_answer": str(problem["answer"]),
            "difficulty": problem.get("difficulty"), "method": method, "steps": steps,
            "answer": answer, "is_correct": ok, "error_step": error_step,
            "error_type": error_type, "inserter": inserter}


class GenerationSetup:
    """What every generator needs: flags, the actor prompt per problem, templates, engines."""

    def __init__(self, args, shots, templates):
        self.args, self.shots, self.templates = args, shots, templates

    def prompt(self, problem):
        """The one actor prompt of the kit (common.solve_messages), as in solve.py and 05."""
        return common.solve_messages(problem, self.shots, self.args.fewshot, self.args.seed)

    def template(self, problem):
        """(steps, from_actor): the first correct rg1 sample, else the reference solution."""
        actor = self.templates.get(f"{problem['id']}:rg1")
        steps = [normalize_step(s) for s in actor or problem["reference_steps"]]
        return [s for s in steps if s], bool(actor)

    def engine(self, model=None):
        a = self.args
        return common.get_engine(model or a.actor, a.backend, a.device)

    def rng(self, problem, method, j):  # per (problem, method, sample): independent of chunking
        return random.Random(f"{self.args.seed}:{problem['id']}:{method}:{j}")


# -----------------------------------------------------------------------------
# The three generators; each returns, per problem, (rows, counts, extra marker fields)

def run_rg1(setup, chunk, seed, desc):
    a = setup.args
    outs = setup.engine().generate([setup.prompt(p) for p in chunk], n=a.rg1_samples,
                                   temperature=a.rg1_temperature, max_new_tokens=a.max_new_tokens,
                                   seed=seed, desc=desc)
    results = []
    for p, samples in zip(chunk, outs):
        rows, counts, template = [], new_counts(), None
        for j, text in enumerate(samples):
            counts["generated"] += 1
            steps = assemble([], text)
            if not steps:
                counts["empty_dropped"] += 1
                continue
            answer, ok = grade_path(p, steps, counts)
            if ok:
                template = template or steps
                if setup.rng(p, "rg1", j).random() >= a.keep_correct:
                    counts["correct_dropped"] += 1
                    continue
            rows.append(path_row(p, "rg1", j, steps, answer, ok, counts))
        results.append((rows, counts, {"template": template}))
    return results


def continue_paths(setup, chunk, jobs, temperature, seed, desc):
    """jobs: dicts with problem index `pi`, `fixed` steps; adds the continued `steps`."""
    prefixes = [join_steps(job["fixed"]) + "\n" if job["fixed"] else "" for job in jobs]
    outs = setup.engine().generate([setup.prompt(chunk[job["pi"]]) for job in jobs], n=1,
                                   temperature=temperature, max_new_tokens=setup.args.max_new_tokens,
                                   seed=seed, prefixes=prefixes, desc=desc)
    for job, out in zip(jobs, outs):
        job["steps"] = assemble(job["fixed"], out[0])


def carry_forward(source, k, new_step):
    """rg3 without the actor: the path `source` with step k replaced by `new_step` (the inserted
    mistake) and every later step recomputed from the wrong value on, by program. Each later
    computation gets the changed numbers as operands and its exact new result, and a number
    outside a computation that states an old result (`so 7 eggs are left`, `The answer is 7.`)
    is rewritten too, so the path stays consistent after its one mistake and ends wrong. The
    values are matched by number: a question number equal to a changed result is changed as
    well (the annotator labels whatever comes out; the error step stays k)."""
    changed = {}
    for old, new in zip(plain_computations(source[k - 1]), plain_computations(new_step)):
        if old.rhs[0].value != new.rhs[0].value:
            changed[old.rhs[0].value] = new.rhs[0].value
    steps = list(source[:k - 1]) + [new_step]
    for step in source[k:]:
        steps.append(_recompute_step(step, changed))
    return steps


def _recompute_step(step, changed):
    """One later step with `changed` values (old -> new, updated in place) carried through it."""
    i = 0
    while i < len(calcs := plain_computations(step)):  # left to right: a step may chain two
        c = calcs[i]
        nums, ops = c.lhs[0::2], [t.op for t in c.lhs[1::2]]
        values = [changed.get(t.value, t.value) for t in nums]
        if values != [t.value for t in nums]:
            result = value_of(values, ops)
            if result is None:
                break  # a division by zero now: leave the rest as written
            terms = [format_number(v, t.text) if v != t.value else t.text for v, t in zip(values, nums)]
            symbols = [t.text for t in c.lhs[1::2]]
            expr = terms[0] + "".join(f" {s} {t}" for s, t in zip(symbols, terms[1:]))
            step = step[:c.start] + f"{expr} = {format_number(result, c.rhs[0].text)}" + step[c.end:]
            if result != c.rhs[0].value:
                changed[c.rhs[0].value] = result
        i += 1
    spans = [(c.start, c.end) for c in plain_computations(step)]
    for t in reversed([t for t in math_tokens(step) if t.kind == "num"]):
        if t.value in changed and not any(a <= t.start < b for a, b in spans):
            step = step[:t.start] + format_number(changed[t.value], t.text) + step[t.end:]
    return step


def carry_forward_paths(jobs):
    """rg3 --rg3-continue program: each job's path is its source with the mistake carried
    forward (no actor call); jobs whose source the inserter did not see are left as they are."""
    for job in jobs:
        job["steps"] = carry_forward(job["source"], job["k"], job["fixed"][-1])


def collect(setup, chunk, method, jobs, results):
    """Keep continued paths that end wrong; a right ending means the error was repaired."""
    for job in jobs:
        p, (rows, counts, _) = chunk[job["pi"]], results[job["pi"]]
        k, steps = job["k"], job["steps"]
        if len(steps) < k:  # nothing written at step k: no path to critique
            counts["empty_dropped"] += 1
            continue
        answer, ok = grade_path(p, steps, counts)
        if ok:
            counts["repaired_dropped"] += 1
            continue
        rows.append(path_row(p, method, job["j"], steps, answer, ok, counts, error_step=k,
                             error_type=job.get("type"), inserter=job.get("inserter")))


def run_reference(setup, chunk, seed, desc):
    """The reference solution as a known-correct path. Opt-in: a weak actor almost never
    writes a correct path, and a critic that never sees one learns to call everything Wrong.
    Its style differs from the actor's, so keep it a minority of the data (see stats)."""
    results = []
    for p in chunk:
        counts = new_counts()
        counts["generated"] += 1
        steps = [normalize_step(s) for s in p["reference_steps"]]
        answer, ok = grade_path(p, steps, counts)
        rows = [path_row(p, "reference", 0, steps, answer, ok, counts)] if ok else []
        results.append((rows, counts, {}))
    return results


def run_rg2(setup, chunk, seed, desc):
    a, results, jobs = setup.args, [([], new_counts(), {}) for _ in chunk], []
    for pi, p in enumerate(chunk):
        template, from_actor = setup.template(p)
        for j in range(a.rg2_samples):
            k = choose_k(len(template), a.rg2_k, setup.rng(p, "rg2", j))
            jobs.append(dict(pi=pi, j=j, k=k, fixed=template[:k - 1]))
            results[pi][1]["generated"] += 1
            results[pi][1]["from_actor_template"] += from_actor
    continue_paths(setup, chunk, jobs, a.rg2_temperature, seed, desc)
    collect(setup, chunk, "rg2", jobs, results)
    return results


def run_rg3(setup, chunk, seed, desc):
    a, results, jobs = setup.args, [([], new_counts(), {}) for _ in chunk], []
    for pi, p in enumerate(chunk):
        template, from_actor = setup.template(p)
        counts = results[pi][1]
        for j in range(a.rg3_samples):
            rng = setup.rng(p, "rg3", j)
            counts["generated"] += 1
            job = dict(pi=pi, j=j, inserter="model")
            found = None
            if a.rg3_inserter in ("program", "auto"):
                found = program_insert(template, p["question"], a.rg3_types, rng)
                steps, used_actor = template, from_actor
                if found is None and from_actor:  # the actor wrote no `a op b = c`; the reference may
                    steps, used_actor = [normalize_step(s) for s in p["reference_steps"]], False
                    found = program_insert(steps, p["question"], a.rg3_types, rng)
                if found is None and a.rg3_inserter == "program":
                    counts["insert_failed"] += 1
                    continue
            if found is not None:
                k, new, kind, fell_back = found
                counts["type_fallbacks"] += fell_back
                job.update(k=k, type=kind, fixed=steps[:k - 1] + [new], source=steps, inserter="program")
            elif not template:
                counts["insert_failed"] += 1
                continue
            else:
                k, used_actor = choose_k(len(template), "uniform", rng), from_actor
                job.update(k=k, type=rng.choice(a.rg3_types), original=template[k - 1],
                           fixed=template[:k - 1], source=template)
            counts["from_actor_template"] += used_actor
            jobs.append(job)
    asked = [job for job in jobs if job["inserter"] == "model"]
    if asked:
        prompts = [inserter_messages(chunk[job["pi"]]["question"], job["fixed"] + [job["original"]],
                                     job["k"], job["type"]) for job in asked]
        outs = setup.engine(a.inserter_model).generate(
            prompts, n=1, temperature=a.inserter_temperature, max_new_tokens=min(128, a.max_new_tokens),
            seed=seed + 1, desc=desc + " insert")
        for job, out in zip(asked, outs):
            new = parse_inserted(out[0], job["original"])
            if new is None:
                results[job["pi"]][1]["insert_failed"] += 1
                job["failed"] = True
            else:
                job["fixed"] = job["fixed"] + [new]
        jobs = [job for job in jobs if not job.get("failed")]
    if a.rg3_continue == "program":
        carry_forward_paths(jobs)
    else:
        continue_paths(setup, chunk, jobs, a.rg3_temperature, seed, desc)
    collect(setup, chunk, "rg3", jobs, results)
    return results


RUNNERS = {"rg1": run_rg1, "rg2": run_rg2, "rg3": run_rg3, "reference": run_reference}

# -----------------------------------------------------------------------------
# Driver: fixed chunks, resumable writers, stats


def counts_by_method(markers, problems, methods):
    """Per method, the counts of every (problem, method) marker, summed over the problems."""
    by_method = {m: new_counts() for m in methods}
    for p in problems:
        for m in methods:
            for key, v in (markers.get(f"{p['id']}:{m}") or {}).get("counts", {}).items():
                if key == "error_types":
                    for t, c in v.items():
                        by_method[m][key][t] = by_method[m][key].get(t, 0) + c
                else:
                    by_method[m][key] += v
    return by_method


def print_stats(by_method):
    print(f"{'':20}" + "".join(f"{m:>8}" for m in by_method))
    for key in new_counts():
        if key != "error_types":
            print(f"{key:20}" + "".join(f"{c[key]:>8}" for c in by_method.values()))
    for m, c in by_method.items():
        if c["error_types"]:
            print(f"{m} kept by mistake type: {c['error_types']}")


def main(args):
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise common.UsageError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in methods]  # rg1 first: it provides rg2/rg3 templates
    types = [t.strip() for t in args.rg3_types.split(",") if t.strip()]
    args = argparse.Namespace(**{**vars(args), "rg3_types": types})
    unknown = [t for t in types if t not in MISTAKES]
    if "rg3" in methods and (not types or args.rg3_inserter == "program" and unknown):
        raise common.UsageError(f"--rg3-types: the program inserter knows {list(MISTAKES)}, not {unknown}")
    pool = read_jsonl(args.problems, ("id", "question", "reference_steps", "answer"), nonempty=True)
    problems = common.take(pool, args.limit)

    out = Path(args.out)
    with ResumableWriter(out) as writer, ResumableWriter(str(out) + ".done") as done:
        markers = {row["id"]: row for row in done.rows}
        templates = {key: row.get("template") for key, row in markers.items()}
        setup = GenerationSetup(args, common.load_fewshot_pool(args, pool), templates)
        n_chunks = (len(problems) + args.chunk_size - 1) // args.chunk_size
        for c, start in enumerate(range(0, len(problems), args.chunk_size)):
            chunk = problems[start:start + args.chunk_size]
            for m in methods:
                if all(f"{p['id']}:{m}" in done for p in chunk):
                    continue
                # the whole chunk is regenerated with its own seed, so rows match a clean run
                results = RUNNERS[m](setup, chunk, common.stable_seed(args.seed, m, start),
                                     f"{m} chunk {c + 1}/{n_chunks}")
                for p, (rows, counts, extra) in zip(chunk, results):
                    key = f"{p['id']}:{m}"
                    if key in done:
                        continue
                    for row in rows:
                        writer.write(row)
                    marker = {"id": key, "counts": counts, **extra}
                    done.write(marker)
                    markers[key] = marker
                    if m == "rg1":
                        templates[key] = extra.get("template")
        stats = {"problems": len(problems), "rows_in_file": len(writer.rows),
                 "by_method": counts_by_method(markers, problems, methods)}
    print_stats(stats["by_method"])
    rg3 = stats["by_method"].get("rg3")
    if rg3 and rg3["insert_failed"] and args.rg3_inserter == "program":
        print(f"rg3: the program inserter found no `a op b = c` to rewrite in {rg3['insert_failed']} of "
              f"{rg3['generated']} tries{' and made no path' if not rg3['kept'] else ''}: it rewrites plain "
              "arithmetic only (MATH solutions are LaTeX); --rg3-inserter auto or model lets a model "
              "rewrite those steps")
    common.write_json_atomic(out.with_name(out.stem + ".stats.json"), stats)
    print(f"{len(writer.rows)} paths in {out}")
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="data/builtin_train.jsonl", help="problems JSONL from 00_prepare_data.py")
    p.add_argument("--out", default="out/paths.jsonl", help="paths JSONL (a .done sidecar and .stats.json go next to it)")
    p.add_argument("--methods", default="rg1,rg2,rg3",
                   help="comma list of rg1, rg2, rg3 and reference (reference solutions as correct paths)")
    p.add_argument("--limit", type=common.count, default=0, help="use only the first N problems (0 = all)")
    p.add_argument("--actor", default=common.DEFAULT_MODEL, help="actor model: embedded name, hub id or folder")
    common.add_backend_args(p)
    p.add_argument("--max-new-tokens", type=common.positive, default=256, help="token budget of one sampled path")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and every random choice")
    common.add_fewshot_args(p, default_pool=None)
    p.add_argument("--chunk-size", type=common.positive, default=64,
                   help="problems per generate call (also the resume unit)")
    p.add_argument("--rg1-samples", type=common.count, default=4, help="rg1: samples per problem")
    p.add_argument("--rg1-temperature", type=float, default=1.0, help="rg1: sampling temperature (paper: high)")
    p.add_argument("--keep-correct", type=float, default=0.5, help="rg1: fraction of correct paths kept")
    p.add_argument("--rg2-samples", type=common.count, default=2, help="rg2: continuations per problem")
    p.add_argument("--rg2-temperature", type=float, default=1.0, help="rg2: temperature from step k on (paper: 1.0)")
    p.add_argument("--rg2-k", default="uniform", choices=["uniform", "first", "last"], help="rg2: which step to resample from")
    p.add_argument("--rg3-samples", type=common.count, default=2, help="rg3: inserted mistakes per problem")
    p.add_argument("--rg3-continue", default="actor", choices=["actor", "program"],
                   help="rg3: the actor writes the steps after the mistake (paper), or a program "
                        "recomputes the original later steps from the wrong value (no model call)")
    p.add_argument("--rg3-temperature", type=float, default=0.7, help="rg3: temperature of the continuation")
    p.add_argument("--rg3-types", default=",".join(MISTAKES), help="rg3: comma list of mistake types")
    p.add_argument("--rg3-inserter", default="program", choices=["program", "model", "auto"],
                   help="rg3: perturb an `a op b = c` computation, ask a model to rewrite the step, "
                        "or auto: the program where a step has such a computation, else the model")
    p.add_argument("--inserter-model", help="rg3 model inserter (default: the actor)")
    p.add_argument("--inserter-temperature", type=float, default=0.7, help="rg3 model inserter temperature")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.run_cli(main, parse_args)
