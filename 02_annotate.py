"""Stage 2 of AutoMathCritique: step-level critique annotation.

Reads stage 1's reasoning paths (`out/paths.jsonl`) and writes one critique per path in the critic's
own output format (common.format_critique): every step repeated, its check (the computation
redone, or what is wrong with it), then Correct/Wrong; last a verdict on the final answer. Like
the paper's annotator, it sees the question, the path, the reference solution and answer, and
where known the error location and mistake type.

    out/annotations.jsonl          the path row + critique, annotator, critique_first_wrong_step,
                                   critique_final_correct, attempts (how many tries it took)
    out/annotations.dropped.jsonl  paths whose annotation never passed validation, with the reason
    out/annotations.stats.json     counts, recomputed from the two files (right after a resume)

Annotators (--annotator):
  rules  the offline default: an exact arithmetic checker (fractions, never eval) that compares
         the path's numbers with the question's and the reference's. A 135M model cannot write
         trustworthy critiques; this one is exact and would rather miss a mistake than invent one.
         It judges arithmetic only: a path with a step it cannot read (LaTeX beyond numbers and
         + - × ÷ ^, such as a variable or \\sqrt, or drawing code) is dropped with the reason
         "the rules annotator cannot judge this path", and if no path can be judged (MATH) it
         stops and names the annotators that can.
  model  any Hugging Face model through common.get_engine, greedy, in batches, and
  api    any OpenAI-compatible server (vLLM `serve`, ...), rate limited; both get rules' findings as hints.

Where the paper is silent we chose:
- An annotation is kept only if it parses with one verdict per step, its final verdict agrees
  with the gold answer check, a wrong path has at least one Wrong step, and for RG3 the first
  Wrong step is not after the inserted mistake (an earlier genuine mistake is allowed, so
  "equal to error_step" would be too strict). A failing LLM annotation is asked again at
  temperature 0.3 with a new seed up to --annotation-retries times, then dropped with its reason.
- Kept critiques are re-rendered with format_critique, so every annotator yields one layout.
- Rules: arithmetic errors are flagged on any path; the softer checks (misread number, wrong
  operation, number from nowhere) only on wrong paths and only from the known error location
  on, so a right path gets all Correct unless it really contains a slip. A wrong answer always
  makes the last step Wrong; for RG3 the inserted step is Wrong if nothing earlier is.
- API errors that outlast the back-off are not recorded as drops: a rerun tries them again.

    python 02_annotate.py
    python 02_annotate.py --annotator model --annotator-model Qwen/Qwen2.5-72B-Instruct --backend vllm
    OPENAI_API_KEY=EMPTY python 02_annotate.py --annotator api --annotator-url http://localhost:8000/v1 \\
        --annotator-model Qwen/Qwen2.5-72B-Instruct --concurrency 8
"""
import argparse
import re
import threading
import time
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import common
from common import (CRITIC_FORMAT, Computation, ResumableWriter, answers_match, beyond_arithmetic, evaluate_tokens,
                    find_computations, format_critique, format_number, join_steps, math_tokens,
                    number_steps, parse_critique, read_jsonl, write_json_atomic)

FIELDS = ["id", "question", "reference_steps", "gold_answer", "method", "steps", "answer"]


# -----------------------------------------------------------------------------
# What is known about a path: the gold answer check and the error location from stage 1

def path_is_correct(row: dict) -> bool:
    """Stage 1's answer check against the gold answer (is_correct); recomputed if absent."""
    if isinstance(row.get("is_correct"), bool):
        return row["is_correct"]
    return answers_match(row["gold_answer"], row.get("answer"))


def known_error_step(row: dict) -> int | None:
    """The known error location if it lies inside the path (RG2: at or after it; RG3: at it)."""
    k = row.get("error_step")
    return k if isinstance(k, int) and 1 <= k <= len(row["steps"]) and row.get("method") in ("rg2", "rg3") else None


# -----------------------------------------------------------------------------
# The annotation task: the annotator's prompt, a batched local model, an OpenAI-compatible API

def annotator_messages(row: dict) -> list[dict]:
    """The annotator's chat prompt: everything known about the path, and the exact format."""
    steps, k = row["steps"], known_error_step(row)
    notes = [f"The student's final answer ({row.get('answer')}) is "
             f"{'correct' if path_is_correct(row) else 'wrong'}."]
    if k and row.get("method") == "rg2":
        notes.append(f"The first mistake is at step {k} or later.")
    if k and row.get("method") == "rg3":
        notes.append(f"Step {k} was deliberately rewritten to contain a {row.get('error_type') or 'mistake'}.")
    system = ("You are an expert math teacher writing step-level feedback on a student's solution. "
              "A step is Wrong if it miscalculates, uses a wrong number or operation, reasons "
              "incorrectly, or builds on an earlier wrong value. Keep explanations short and "
              "concrete (name the right value). The student will not see the reference solution "
              "or the notes, so do not mention them. " + CRITIC_FORMAT)
    skeleton = "\n".join(f"Step {i}: <step {i} copied>\nCheck: <its computation redone>\nVerdict: <Correct or Wrong>."
                         for i in range(1, min(len(steps), 2) + 1))
    user = (f"Problem:\n{row['question']}\n\nStudent's solution:\n{number_steps(steps)}\n\n"
            f"Reference solution:\n{join_steps(row.get('reference_steps') or [])}\n"
            f"Correct answer: {row['gold_answer']}\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
            + f"\n\nAn automatic arithmetic check found (it may miss things):\n{rules_findings(row)}\n\n"
            f"Write the feedback for {'the single step' if len(steps) == 1 else f'all {len(steps)} steps'} "
            f"in exactly this format:\n{skeleton}\n...\n"
            "Final verdict: <Correct or Wrong>. <why>")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def annotate_with_model(rows: list[dict], args, emit) -> None:
    """Batched: one engine.generate per chunk; failures are re-asked together, then dropped."""
    engine = common.get_engine(args.annotator_model, args.backend, args.device)
    for c in range(0, len(rows), args.chunk_size):
        pending, last = list(rows[c:c + args.chunk_size]), {}
        for attempt in range(args.annotation_retries + 1):
            if not pending:
                break
            outs = engine.generate([annotator_messages(r) for r in pending], n=1,
                                   temperature=0.0 if attempt == 0 else 0.3,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed + attempt,
                                   desc=f"annotate {c + 1}-{c + args.chunk_size} try {attempt + 1}")
            still = []
            for row, out in zip(pending, outs):
                text = out[0] if out else ""
                last[row["id"]] = validate(row, text)
                if last[row["id"]]:
                    still.append(row)
                else:
                    emit(row, text, attempt + 1, None)
            pending = still
        for row in pending:
            emit(row, None, args.annotation_retries + 1, last[row["id"]])


class RateLimiter:
    """At most `per_minute` request starts a minute, evenly spaced, shared by all threads."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self.lock, self.next_time = threading.Lock(), 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_time)
            self.next_time = start + self.interval
        time.sleep(max(0.0, start - now))


def annotate_one_api(chat, row, args, limiter):
    """Ask, validate, re-ask: (row, text or None, attempts, problems or None)."""
    import openai
    problems = []
    for attempt in range(args.annotation_retries + 1):
        limiter.wait()
        try:  # common.OpenAIChat retries transient errors with back-off
            text = chat.complete(annotator_messages(row), 0.0 if attempt == 0 else 0.3,
                                 args.max_new_tokens, args.seed + attempt)
        except openai.BadRequestError as e:  # this row's prompt is refused (too long, ...): a drop
            return row, None, attempt + 1, [f"api rejected the request: {str(e)[:200]}"]
        problems = validate(row, text)
        if not problems:
            return row, text, attempt + 1, None
    return row, None, args.annotation_retries + 1, problems


def annotate_with_api(rows: list[dict], args, emit) -> int:
    """Threads call the server; the main thread writes each result as it completes."""
    import openai
    chat = common.OpenAIChat(args.annotator_model, args.annotator_url, args.api_key_env, args.concurrency,
                             args.max_retries, args.retry_wait, args.timeout)
    limiter, failed = RateLimiter(args.requests_per_minute), 0
    with ThreadPoolExecutor(max_workers=chat.concurrency) as pool:
        futures = {pool.submit(annotate_one_api, chat, r, args, limiter): r for r in rows}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                for f in futures:
                    f.cancel()
                raise common.UsageError(f"annotator API refused the request: {e}") from None
            except Exception as e:  # left undone: the next run asks again
                failed += 1
                print(f"api error on {futures[fut]['id']}: {type(e).__name__}: {str(e)[:200]}")
                continue
            emit(*result)
    return failed


# -----------------------------------------------------------------------------
# Validation: what every kept annotation must satisfy

def validate(row: dict, critique_text: str) -> list[str]:
    """Problems that disqualify a critique of this path (empty list: keep it)."""
    crit = parse_critique(critique_text, n_steps=len(row["steps"]))
    problems = list(crit.problems)
    truth = path_is_correct(row)
    if crit.final_correct is not None and crit.final_correct != truth:
        problems.append("final verdict disagrees with the gold answer check")
    if not problems and not truth:
        first, k = crit.first_wrong_step, known_error_step(row)
        if first is None:
            problems.append("no step marked Wrong on a wrong path")
        elif row.get("method") == "rg3" and k is not None and first > k:
            problems.append(f"first Wrong step {first} is after the inserted mistake at step {k}")
    return problems


def reason_key(problem: str) -> str:
    """Group similar problems for the stats: no numbers, no quoted text."""
    return re.sub(r"\d+", "N", problem.split(":")[0]).strip()


# -----------------------------------------------------------------------------
# Rules annotator (offline default): the numbers the problem gives, then a pass over the steps

WORD_NUMBERS = {"one": [1], "two": [2], "three": [3], "four": [4], "five": [5], "six": [6],
                "seven": [7], "eight": [8], "nine": [9], "ten": [10], "eleven": [11], "twelve": [12],
                "twenty": [20], "thirty": [30], "forty": [40], "fifty": [50], "hundred": [100],
                "half": [2, Fraction(1, 2)], "twice": [2], "double": [2], "triple": [3],
                "thrice": [3], "third": [3, Fraction(1, 3)], "quarter": [4, Fraction(1, 4)],
                "dozen": [12], "pair": [2], "week": [7], "hour": [60], "minute": [60]}
CONSTANTS = {Fraction(c) for c in (0, 1, 2, 10, 12, 24, 60, 100, 1000)}


@dataclass
class ProblemFacts:
    given: set            # numbers in the question (digits and words) and common constants
    reference: set        # every number the reference solution writes
    ref_calcs: list       # the reference solution's computations
    phrases: dict         # value -> how the question says it ("5 apples")
    path_results: set = field(default_factory=set)  # what the judged path's computations give


def read_step(text: str) -> tuple[list[Computation], list]:
    """(computations, numbers stated outside any computation) of one step."""
    calcs = find_computations(text)
    stated = [t for t in math_tokens(text)
              if t.kind == "num" and not any(c.start <= t.start < c.end for c in calcs)]
    return calcs, stated


def problem_facts(row: dict) -> ProblemFacts:
    """Collect the values a correct solution may use: the question's and the reference's."""
    toks = math_tokens(row["question"])
    given, phrases = set(CONSTANTS), {}
    for i, t in enumerate(toks):
        if t.kind == "num":
            given |= {t.value, t.raw}
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            end = nxt.end if nxt is not None and nxt.kind == "word" else t.end
            phrases.setdefault(t.value, row["question"][t.start:end])
        elif t.kind == "word":
            given |= set(map(Fraction, WORD_NUMBERS.get(t.text.lower(), [])))
    reference, ref_calcs = set(), []
    for step in row.get("reference_steps") or []:
        calcs, stated = read_step(step)
        ref_calcs += calcs
        for c in calcs:
            reference |= {t.value for t in c.operands} | {c.value}
        reference |= {t.value for t in stated}
    path = {c.value for step in row.get("steps") or [] for c in find_computations(step) if c.ok}
    return ProblemFacts(given, reference, ref_calcs, phrases, path)


Review = namedtuple("Review", "step_correct explanations final_correct final_explanation")


def _counterpart(calc: Computation, bad: Fraction, facts: ProblemFacts) -> Fraction | None:
    """For `a op b` with one unknown number, the number the reference uses in its place
    (a reference computation with the same operation and the same other number)."""
    if calc.binop is None:
        return None
    a, op, b = calc.binop
    bad_first = a == bad
    other = b if bad_first else a
    for ref in facts.ref_calcs:
        if ref.binop is None or ref.binop[1] != op:
            continue
        ra, _, rb = ref.binop
        if (bad_first or op in "+*") and rb == other and ra != bad:
            return ra
        if (not bad_first or op in "+*") and ra == other and rb != bad:
            return rb
    return None


def _fixed_positions(calc: Computation, fixes: dict) -> dict | None:
    """{token position: correct value} for the first use of each wrong value on the left side."""
    subst = {}
    for old, new in fixes.items():
        pos = next((p for p, t in enumerate(calc.lhs) if t.kind == "num" and t.value == old), None)
        if new is None or pos is None:
            return None
        subst[pos] = new
    return subst


def _recompute(calc: Computation, fixes: dict) -> Fraction | None:
    """The left side with the first use of each wrong value replaced by its correct value."""
    subst = _fixed_positions(calc, fixes)
    return None if subst is None else evaluate_tokens(calc.lhs, subst)


def _fixed_text(calc: Computation, fixes: dict) -> str | None:
    """The left side as the step would read with the correct values (`5 * 6` for `5 * 5`)."""
    subst = _fixed_positions(calc, fixes)
    if subst is None:
        return None
    text, base = calc.lhs_text, calc.lhs[0].start
    for pos in sorted(subst, reverse=True):
        t = calc.lhs[pos]
        text = text[:t.start - base] + format_number(subst[pos], "$" if "$" in t.text else "") + text[t.end - base:]
    return text


def _taint(calc: Computation, i: int, fix, taint: dict, facts: ProblemFacts) -> None:
    """Remember a wrong result and its correct value; in `= 3 * 7` the 3 may be an input."""
    for v in calc.claimed:
        if not (v == calc.chain_lead and v in facts.given):
            taint[v] = (i, fix)


def _wrong_number(used: Fraction, needed: Fraction, facts: ProblemFacts, like: str) -> str:
    if needed in facts.phrases:
        return f"the problem says {facts.phrases[needed]}, not {format_number(used, like)}"
    return f"it needs {format_number(needed, like)} where it uses {format_number(used, like)}"


def _instead(right_lhs: str, right_value: Fraction, calc: Computation, like: str, why: str) -> str:
    """'<what the problem calls for> is <its value>, not <the step's computation>: <why>.'
    Worded like a right step's '<lhs> is <value>, as written.' up to the comparison: a critic
    trained on these redoes the step from the problem, and only then says whether the step
    did the same. Told 'X uses the wrong operation' first, it must decide in one token."""
    return (f"{right_lhs} is {format_number(right_value, like)}, not "
            f"{calc.lhs_text} = {calc.rhs_text}: {why}.")


def _swapped(calc: Computation, used: Fraction, needed: Fraction, facts: ProblemFacts, like: str) -> str:
    """The step redone with the number it should have used."""
    right, value = _fixed_text(calc, {used: needed}), _recompute(calc, {used: needed})
    why = _wrong_number(used, needed, facts, like)
    if right is None or value is None:  # rules_review capitalizes the first letter
        return why + "."
    return _instead(right, value, calc, like, why)


def _carried(value: Fraction, src: int, fix, facts: ProblemFacts, like: str) -> str:
    # Name the corrected value only when the correct solution has it: a correction pushed
    # through the path's own wrong reasoning would be a number no correct solution contains.
    if fix is not None and fix in facts.reference:
        return f"it carries the earlier error from step {src}: {format_number(value, like)} should be {format_number(fix, like)}."
    return f"it carries the earlier error from step {src}, where {format_number(value, like)} is wrong."


def check_calc(calc: Computation, i: int, facts: ProblemFacts, known: set, taint: dict, soft: bool):
    """One computation -> (priority, what is wrong) or None; a wrong result is tainted with its
    corrected value (when one can be worked out) so later steps that use it are caught."""
    like = "$" if calc.money else ""  # how numbers are written
    if not calc.ok:
        _taint(calc, i, calc.value, taint, facts)
        return 0, f"{calc.lhs_text} is {format_number(calc.value, like)}, not {calc.rhs_text}."
    bad = list(dict.fromkeys(t.value for t in calc.operands if t.value in taint))
    if bad:
        src, fix = taint[bad[0]]
        _taint(calc, i, _recompute(calc, {v: taint[v][1] for v in bad}), taint, facts)
        return None if src == i else (1, _carried(bad[0], src, fix, facts, like))
    if not soft:
        return None
    unknown = [t.value for t in calc.operands if t.value not in known and t.raw not in known]
    if unknown:
        u = unknown[0]
        c = _counterpart(calc, u, facts)
        _taint(calc, i, _recompute(calc, {u: c}), taint, facts)
        if c is None:
            return 2, f"it uses {format_number(u, like)}, which is neither given in the problem nor found earlier."
        return 2, _swapped(calc, u, c, facts, like)
    if calc.binop is None:
        return _near_reference(calc, i, facts, taint, like)
    a, op, b = calc.binop
    same = [r for r in facts.ref_calcs if r.binop and sorted([a, b]) == sorted([r.binop[0], r.binop[2]])]
    if any(r.binop[1] == op for r in same):
        return None  # the reference computes exactly this
    if same:
        _taint(calc, i, same[0].value, taint, facts)
        return 3, _instead(same[0].lhs_text, same[0].value, calc, like, "it uses the wrong operation")
    if calc.value not in facts.reference:  # a known number, but not the one this computation needs
        for u in (b, a):
            c = _counterpart(calc, u, facts)
            if c is not None:
                _taint(calc, i, _recompute(calc, {u: c}), taint, facts)
                return 3, _swapped(calc, u, c, facts, like)
    return _near_reference(calc, i, facts, taint, like)


def _near_reference(calc: Computation, i: int, facts: ProblemFacts, taint: dict, like: str):
    """A computation of known numbers whose result the reference never reaches, next to a
    reference computation it misses by one thing: the same numbers (another
    operation), one number swapped, one number too many or too few. None when nothing is that
    close, or when the path computes the reference's result anyway (it took another route)."""
    if calc.value in facts.reference:
        return None
    mine = Counter(t.value for t in calc.operands)
    ops = [t.op for t in calc.lhs if t.kind == "op"]
    for ref in facts.ref_calcs:
        if len(ref.operands) < 2 or ref.value in facts.path_results:
            continue
        theirs = Counter(t.value for t in ref.operands)
        extra, missing = mine - theirs, theirs - mine
        if not extra and not missing:
            why = "it combines the right numbers the wrong way"
        elif sum(extra.values()) == 1 and not missing:
            x = next(iter(extra))
            why = f"it counts {format_number(x, like)} {'twice' if x in theirs else 'although it does not belong'}"
        elif sum(missing.values()) == 1 and not extra:
            why = f"it leaves out {format_number(next(iter(missing)), like)}"
        elif (sum(extra.values()) == sum(missing.values()) == 1
              and ops == [t.op for t in ref.lhs if t.kind == "op"]):
            why = _wrong_number(next(iter(extra)), next(iter(missing)), facts, like)
        else:
            continue
        problem = _instead(ref.lhs_text, ref.value, calc, like, why)
        _taint(calc, i, ref.value, taint, facts)
        return 3, problem
    return None


def check_step(step: str, i: int, facts: ProblemFacts, known: set, taint: dict, soft: bool) -> list[str]:
    """All problems of one step, most definite first (arithmetic, carried error, misread number,
    wrong operation, number from nowhere). Values it computes correctly become known."""
    calcs, stated = read_step(step)
    found = []
    for calc in calcs:
        problem = check_calc(calc, i, facts, known, taint, soft)
        if problem:
            found.append(problem)
        else:
            known |= {calc.value, *calc.claimed}
    for t in stated:
        if t.value in taint:
            src, fix = taint[t.value]
            if src != i:  # a wrong value repeated within its own step is one mistake
                found.append((1, _carried(t.value, src, fix, facts, "$" if "$" in t.text else "")))
        elif soft and t.value not in known and t.raw not in known:
            taint[t.value] = (i, None)
            found.append((4, f"the value {format_number(t.value)} does not follow from the problem or the earlier steps."))
        else:
            known |= {t.value, t.raw}
    return list(dict.fromkeys(text for _, text in sorted(found, key=lambda f: f[0])))


def _praise(step: str, is_last: bool, answer_ok: bool, answer) -> str:
    calcs, _ = read_step(step)
    if is_last and answer_ok and answer is not None:
        return f"It gives the final answer {answer}, which is right."
    if calcs:
        # Worded like a miscalculation's "a + b is 7, not 8." up to the comparison, so a critic
        # trained on these writes the result before it says whether the step has it.
        return " ".join(f"{c.lhs_text} is {format_number(c.value, '$' if c.money else '')}, as written."
                        for c in calcs[:2])
    beyond = beyond_arithmetic(step)
    if beyond:  # say what was not checked rather than vouch for it
        return f"Not checked: {beyond} is beyond an arithmetic check."
    if any(t.kind == "num" for t in math_tokens(step)):
        return "Its numbers follow from the problem and the earlier steps."
    return "It states no number or computation to check."


def unjudgeable_step(row: dict) -> tuple[int, str] | None:
    """(1-based step, why) of the first step the rules checker cannot judge, or None. The
    final answer line is judged by the answer check (math-verify), so it is never one."""
    steps = row["steps"]
    for i, step in enumerate(steps, 1):
        if i == len(steps) and common.extract_answer(step) is not None:
            break
        why = beyond_arithmetic(step)
        if why:
            return i, why
    return None


RULES_CANNOT = "the rules annotator cannot judge this path"
CAPABLE_ANNOTATORS = ("--annotator model --annotator-model MODEL (a local model that reads LaTeX), or "
                      "--annotator api --annotator-model NAME --annotator-url URL")


def rules_review(row: dict, reveal_answer: bool = True) -> Review:
    """The whole rules annotation of one path: per-step verdicts and the final verdict. As a
    critic in a loop (reveal_answer=False) it never states the gold answer itself, or every
    refinement could copy it; its corrections of single steps stay."""
    steps, facts = row["steps"], problem_facts(row)
    answer_ok, answer, gold = path_is_correct(row), row.get("answer"), row["gold_answer"]
    k = known_error_step(row)
    soft_from = None if answer_ok else (k or 1)  # before a known RG2/RG3 location: arithmetic only
    force_at = k if row.get("method") == "rg3" and not answer_ok else None
    known, taint = set(facts.given | facts.reference), {}
    correct, why = [], []
    for i, step in enumerate(steps, 1):
        found = check_step(step, i, facts, known, taint, soft_from is not None and i >= soft_from)
        if not found and i == force_at and all(correct):
            novel = sorted({t.value for t in math_tokens(step) if t.kind == "num"}
                           - facts.given - facts.reference)
            for v in novel:
                taint[v] = (i, None)
            kind = row.get("error_type") or "mistake"
            found = [f"this step makes a {kind}: {', '.join(map(format_number, novel))} does not follow from the problem."
                     if novel else f"this step makes a {kind}, and the solution goes wrong from here."]
        correct.append(not found)
        why.append(" Also, ".join(found[:2]) if found else _praise(step, i == len(steps), answer_ok, answer))
    if not answer_ok and steps and correct[-1]:
        correct[-1] = False
        why[-1] = _answer_mismatch(answer, gold, facts, reveal_answer)
    elif not answer_ok and steps and str(gold) not in why[-1]:
        why[-1] += " Also, " + _answer_mismatch(answer, gold, facts, reveal_answer)
    why = [w[:1].upper() + w[1:] for w in why]
    tell = f"; the correct answer is {gold}." if reveal_answer else "."
    final = (f"The final answer {answer} is correct." if answer_ok else
             f"The solution never states a final answer{tell}" if answer is None
             else f"The final answer {answer} is wrong{tell}")
    return Review(correct, why, answer_ok, final)


def _answer_mismatch(answer, gold, facts: ProblemFacts, reveal_answer: bool = True) -> str:
    toks = math_tokens(str(answer))
    if answer is None:
        return "it does not state a final answer" + (f"; the correct answer is {gold}." if reveal_answer else ".")
    if len(toks) == 1 and toks[0].kind == "num" and toks[0].value in facts.reference:
        return f"it stops at {answer}, an intermediate value; the question asks for {gold if reveal_answer else 'another'}."
    return f"the final answer {answer} " + (f"does not match the correct answer {gold}." if reveal_answer else "is not what the question asks for.")


def rules_critique(row: dict, reveal_answer: bool = True) -> str:
    """The rules annotation as critique text (common.format_critique)."""
    r = rules_review(row, reveal_answer)
    return format_critique(row["steps"], r.step_correct, r.explanations, r.final_correct, r.final_explanation)


def rules_findings(row: dict) -> str:
    """A short list of what the rules checker found, as hints for an LLM annotator."""
    r = rules_review(row)
    lines = [f"- Step {i}: {w}" for i, (ok, w) in enumerate(zip(r.step_correct, r.explanations), 1)
             if not ok] or ["- No arithmetic or number mistakes found."]
    return "\n".join(lines + [f"- {r.final_explanation}"])


# -----------------------------------------------------------------------------
# Statistics, recomputed from the output files

def stats_from_files(rows: list[dict], out_path: Path, dropped_path: Path) -> dict:
    """Counts over this run's input paths, read back from the files (so resumes add up)."""
    ids = {r["id"]: r.get("method") for r in rows}
    kept = {r["id"]: r for r in (read_jsonl(out_path) if out_path.exists() else []) if r["id"] in ids}
    dropped = {r["id"]: r for r in (read_jsonl(dropped_path) if dropped_path.exists() else [])
               if r["id"] in ids and r["id"] not in kept}
    by_method = {}
    for rid, m in ids.items():
        b = by_method.setdefault(m, {"paths": 0, "kept": 0, "dropped": 0})
        b["paths"] += 1
        b["kept"] += rid in kept
        b["dropped"] += rid in dropped
    return {"paths": len(ids), "kept": len(kept), "dropped": len(dropped),
            "retries": sum(max(0, r.get("attempts", 1) - 1) for r in [*kept.values(), *dropped.values()]),
            "dropped_reasons": dict(Counter(r["reason"] for r in dropped.values()).most_common()),
            "by_method": dict(sorted(by_method.items(), key=lambda kv: str(kv[0]))),
            "pending": len(ids) - len(kept) - len(dropped),
            "annotators": dict(Counter(r.get("annotator") for r in kept.values()))}


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default="out/paths.jsonl", help="stage 1 output to annotate")
    p.add_argument("--out", default="out/annotations.jsonl", help="annotated paths (JSONL, resumable)")
    p.add_argument("--dropped", default=None, help="dropped paths (default: <out>.dropped.jsonl)")
    p.add_argument("--stats", default=None, help="stats JSON (default: <out>.stats.json)")
    p.add_argument("--annotator", choices=["rules", "model", "api"], default="rules",
                   help="rules: exact arithmetic checker (offline); model: local LLM; api: OpenAI-compatible server")
    p.add_argument("--annotator-model", default=None,
                   help="model: HF id or folder (default: the embedded model); api: the model name")
    common.add_backend_args(p)
    p.add_argument("--max-new-tokens", type=common.positive, default=768,
                   help="LLM annotators: critique length limit")
    p.add_argument("--chunk-size", type=common.positive, default=64,
                   help="model: paths per generate call (and per write)")
    p.add_argument("--annotation-retries", type=common.count, default=2,
                   help="LLM annotators: re-asks after an invalid critique before dropping the path")
    p.add_argument("--annotator-url", default="http://localhost:8000/v1", help="api: base URL of the server")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="api: env var holding the key (unset: EMPTY)")
    p.add_argument("--max-retries", type=common.count, default=5, help="api: retries per request on transient errors")
    p.add_argument("--retry-wait", type=float, default=2.0, help="api: first back-off in seconds (doubles)")
    p.add_argument("--requests-per-minute", type=float, default=60, help="api: rate limit (0: none)")
    p.add_argument("--concurrency", type=common.positive, default=4, help="api: requests in flight")
    p.add_argument("--timeout", type=float, default=120, help="api: seconds per request")
    p.add_argument("--seed", type=int, default=0, help="LLM annotators: seed of the first try (+1 per retry)")
    p.add_argument("--limit", type=common.count, default=0,
                   help="annotate only the first N paths (0 = all)")
    p.add_argument("--retry-dropped", action="store_true", help="forget earlier drops and try those paths again")
    return p.parse_args(argv)


def main(args):
    rows = common.take(read_jsonl(args.paths, FIELDS, nonempty=True), args.limit)
    out = Path(args.out)
    dropped_path = Path(args.dropped or out.with_name(out.stem + ".dropped.jsonl"))
    stats_path = Path(args.stats or out.with_name(out.stem + ".stats.json"))
    if args.retry_dropped and dropped_path.exists():
        dropped_path.unlink()
    if args.annotator == "api" and not args.annotator_model:
        raise common.UsageError("--annotator api needs --annotator-model (the server's model name)")
    name = args.annotator_model or common.DEFAULT_MODEL
    label = {"rules": "rules", "model": f"model:{name}", "api": f"api:{name}"}[args.annotator]
    args.annotator_model = name
    start, failed = time.time(), 0
    with ResumableWriter(out) as writer, ResumableWriter(dropped_path) as dropped:

        def emit(row, text, attempts, problems):
            if problems:
                dropped.write({"id": row["id"], "method": row.get("method"), "annotator": label,
                               "reason": reason_key(problems[0]), "problems": problems, "attempts": attempts})
                return
            crit = parse_critique(text, n_steps=len(row["steps"]))
            writer.write({**row, "critique": format_critique(
                row["steps"], [s.correct for s in crit.steps], [s.explanation for s in crit.steps],
                crit.final_correct, crit.final_explanation), "annotator": label,
                "critique_first_wrong_step": crit.first_wrong_step,
                "critique_final_correct": crit.final_correct, "attempts": attempts})

        todo = [r for r in rows if r["id"] not in writer and r["id"] not in dropped]
        for r in [r for r in todo if not r["steps"]]:
            emit(r, None, 0, ["path has no steps"])
        todo = [r for r in todo if r["steps"]]
        print(f"{len(rows)} paths, {len(rows) - len(todo)} already done, annotating {len(todo)} with {label}")
        if args.annotator == "rules":
            beyond = {r["id"]: unjudgeable_step(r) for r in todo}
            if todo and all(beyond.values()):
                i, why = beyond[todo[0]["id"]]
                raise common.UsageError(
                    f"{args.paths}: the rules annotator checks arithmetic only and can judge none of the "
                    f"{len(todo)} paths (e.g. {todo[0]['id']} step {i}: {why}); use {CAPABLE_ANNOTATORS}")
            for r in todo:
                if beyond[r["id"]]:  # dropped with its reason: a rerun with an LLM annotator takes it
                    i, why = beyond[r["id"]]
                    emit(r, None, 0, [f"{RULES_CANNOT}: step {i} has {why}"])
                    continue
                text = rules_critique(r)
                emit(r, text, 1, validate(r, text) or None)
        elif args.annotator == "model":
            annotate_with_model(todo, args, emit)
        else:
            failed = annotate_with_api(todo, args, emit)
    stats = stats_from_files(rows, out, dropped_path)
    write_json_atomic(stats_path, stats)
    print(f"kept {stats['kept']}, dropped {stats['dropped']} {stats['dropped_reasons'] or ''}, "
          f"retries {stats['retries']}, pending {stats['pending']}"
          + (f" ({failed} API failures, rerun to retry)" if failed else "")
          + f"  [{time.time() - start:.1f}s] -> {out}, {stats_path}")
    return stats


if __name__ == "__main__":
    common.run_cli(main, parse_args)
