"""Stage 2 of AutoMathCritique: step-level critique annotation.

Reads stage 1's reasoning paths (`out/paths.jsonl`) and writes one critique per path in the critic's
own output format (common.format_critique): every step repeated with Correct/Wrong and a reason,
then a verdict on the final answer. Like the paper's annotator, it sees the question, the path,
the reference solution and answer, and where known the error location and mistake type.

    out/annotations.jsonl          the path row + critique, annotator, critique_first_wrong_step,
                                   critique_final_correct, attempts (how many tries it took)
    out/annotations.dropped.jsonl  paths whose annotation never passed validation, with the reason
    out/annotations.stats.json     counts, recomputed from the two files (right after a resume)

Annotators (--annotator):
  rules  the offline default: an exact arithmetic checker (fractions, never eval) that compares
         the path's numbers with the question's and the reference's. A 135M model cannot write
         trustworthy critiques; this one is exact and would rather miss a mistake than invent one.
  model  any Hugging Face model through common.get_engine, greedy, in batches.
  api    any OpenAI-compatible server (vLLM `serve`, OpenAI, ...), threaded and rate limited.
The LLM annotators get the rules checker's findings as hints.

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
import math
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import common
from common import (CRITIC_FORMAT, ResumableWriter, answers_match, format_critique, join_steps,
                    number_steps, parse_critique, read_jsonl, require_fields, write_json_atomic)

FIELDS = ["id", "question", "reference_steps", "gold_answer", "method", "steps", "answer"]

# -----------------------------------------------------------------------------
# Reading numbers and computations out of text

_TOKEN = re.compile(r"(?P<num>(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?)"
                    r"|(?P<op>\\times|\\cdot|\\div|[-+*/×÷·−–^])|(?P<eq>[=≈])"
                    r"|(?P<lp>\()|(?P<rp>\))|(?P<word>[A-Za-z]+)|(?P<other>\S)")
_OPS = {"\\times": "*", "\\cdot": "*", "×": "*", "·": "*", "\\div": "/", "÷": "/", "−": "-", "–": "-"}
_TIMES_WORDS = {"x", "X", "times"}
WORD_NUMBERS = {"one": [1], "two": [2], "three": [3], "four": [4], "five": [5], "six": [6],
                "seven": [7], "eight": [8], "nine": [9], "ten": [10], "eleven": [11], "twelve": [12],
                "twenty": [20], "thirty": [30], "forty": [40], "fifty": [50], "hundred": [100],
                "half": [2, Fraction(1, 2)], "twice": [2], "double": [2], "triple": [3],
                "thrice": [3], "third": [3, Fraction(1, 3)], "quarter": [4, Fraction(1, 4)],
                "dozen": [12], "pair": [2], "week": [7], "hour": [60], "minute": [60]}
CONSTANTS = {Fraction(c) for c in (0, 1, 2, 10, 12, 24, 60, 100, 1000)}


@dataclass
class Tok:
    kind: str                  # num, op, eq, lp, rp, word, other
    text: str
    start: int
    end: int
    op: str = ""               # normalized operator: + - * / ^
    value: Fraction | None = None  # numbers: a percent is already divided by 100
    raw: Fraction | None = None    # numbers as written (20% -> 20)
    decimals: int = 0


def tokenize(text: str) -> list[Tok]:
    """Numbers ($, commas, decimals, %), operators, '=' and words. 'x'/'times' between numbers
    become '*', and unit words between a number and an operator are dropped (5 apples + 3)."""
    toks = []
    for m in _TOKEN.finditer(text):
        t = Tok(m.lastgroup, m.group(), m.start(), m.end())
        if t.kind == "num":
            digits = t.text.replace("$", "").replace(",", "").replace(" ", "")
            t.raw = Fraction(digits.rstrip("%"))
            t.value = t.raw / 100 if digits.endswith("%") else t.raw
            t.decimals = len(digits.rstrip("%").partition(".")[2])
        elif t.kind == "op":
            t.op = _OPS.get(t.text, t.text)
        toks.append(t)
    kept, i = [], 0
    while i < len(toks):
        kept.append(toks[i])
        j = i + 1
        if toks[i].kind == "num":  # skip up to two unit words when an operator follows them
            while (j < len(toks) and j - i <= 2 and toks[j].kind == "word"
                   and len(toks[j].text) > 1 and toks[j].text not in _TIMES_WORDS):
                j += 1
            if j > i + 1 and not (j < len(toks) and (toks[j].kind in ("op", "eq", "rp")
                                                    or toks[j].text in _TIMES_WORDS)):
                j = i + 1
        i = j
    for i, t in enumerate(kept):
        if (t.kind == "word" and t.text in _TIMES_WORDS and 0 < i < len(kept) - 1
                and kept[i - 1].kind in ("num", "rp") and kept[i + 1].kind in ("num", "lp")):
            t.kind, t.op = "op", "*"
    return kept


class _Bad(Exception):
    pass


def evaluate(toks: list[Tok], subst: dict | None = None) -> Fraction | None:
    """Exact value of a numeric expression (+ - * / ^, parentheses, unary minus); None if it is
    not one. `subst` maps token positions to other values (recompute with corrected inputs)."""
    pos = 0

    def peek(*ops):
        return pos < len(toks) and toks[pos].kind == "op" and toks[pos].op in ops

    def atom():
        nonlocal pos
        if peek("-"):
            pos += 1
            return -atom()
        if pos < len(toks) and toks[pos].kind == "num":
            pos += 1
            return (subst or {}).get(pos - 1, toks[pos - 1].value)
        if pos < len(toks) and toks[pos].kind == "lp":
            pos += 1
            v = expr()
            if pos >= len(toks) or toks[pos].kind != "rp":
                raise _Bad
            pos += 1
            return v
        raise _Bad

    def power():
        nonlocal pos
        base = atom()
        if peek("^"):
            pos += 1
            e = atom()
            if e.denominator != 1 or abs(e) > 12 or abs(base) > 10 ** 50:
                raise _Bad  # keep model-written powers small
            return base ** int(e)
        return base

    def term():
        nonlocal pos
        v = power()
        while peek("*", "/"):
            pos += 1
            v = v * power() if toks[pos - 1].op == "*" else v / power()
        return v

    def expr():
        nonlocal pos
        v = term()
        while peek("+", "-"):
            pos += 1
            v = v + term() if toks[pos - 1].op == "+" else v - term()
        return v

    try:
        v = expr()
        return v if pos == len(toks) else None
    except (_Bad, ZeroDivisionError):
        return None


@dataclass
class Calc:
    """One stated computation `lhs = rhs`."""
    lhs: list[Tok]
    lhs_text: str
    rhs_text: str
    value: Fraction            # the exact value of the left side
    claimed: list[Fraction]    # what the right side says (a chain `= 15 + 2 = 17` gives 15 and 17)
    ok: bool                   # the right side agrees with the exact value (rounding allowed)
    money: bool
    chain_lead: Fraction | None = None  # `= 3 * 6`: the 3 is claimed only in a chain `= 15 + 2 = 17`

    @property
    def operands(self) -> list[Tok]:
        return [t for t in self.lhs if t.kind == "num"]

    @property
    def binop(self) -> tuple | None:
        """(a, op, b) for a plain two-number computation, else None."""
        if len(self.lhs) == 3 and self.lhs[1].kind == "op" and len(self.operands) == 2:
            return self.lhs[0].value, self.lhs[1].op, self.lhs[2].value
        return None


def _agrees(exact: Fraction, value: Fraction, decimals: int | None) -> bool:
    """Equal, or the written value is `exact` rounded (either way) to the decimals shown."""
    if value == exact:
        return True
    if decimals is None or exact.denominator == 1:
        return False  # an exact integer must be written exactly
    scale = 10 ** decimals
    return value * scale in (math.floor(exact * scale), math.ceil(exact * scale))


def _side(toks: list[Tok], lo: int, hi: int, step: int) -> int:
    """Walk from index lo in direction step while tokens can belong to an expression."""
    while lo + step != hi and toks[lo + step].kind in ("num", "op", "lp", "rp"):
        lo += step
    return lo


def analyze_text(text: str) -> tuple[list[Calc], list[Tok]]:
    """(computations `a op b = c`, numbers stated outside any computation) of one step."""
    toks = tokenize(text)
    latex = bool(re.search(r"\$(?!\s?\d)", text))  # a $ not before a digit delimits math
    calcs, used = [], set()
    for i, t in enumerate(toks):
        if t.kind != "eq":
            continue
        j = _side(toks, i, -1, -1)
        k = _side(toks, i, len(toks), 1)
        left, right = list(range(j, i)), list(range(i + 1, k + 1))
        while left and toks[left[0]].kind == "lp" and \
                sum(toks[x].kind == "lp" for x in left) > sum(toks[x].kind == "rp" for x in left):
            left.pop(0)
        while right and (toks[right[-1]].kind == "op" or (toks[right[-1]].kind == "rp" and
                sum(toks[x].kind == "rp" for x in right) > sum(toks[x].kind == "lp" for x in right))):
            right.pop()
        if not left or not right or sum(toks[x].kind == "num" for x in left) < 2:
            continue
        first = toks[left[0]]
        if first.kind == "op" and (first.op != "-" or (j > 0 and toks[j - 1].kind == "word")):
            continue  # `x + 3 = 7`: a symbol stands before the numbers, this is algebra
        nxt = toks[k + 1] if k + 1 < len(toks) else None
        if nxt is not None and nxt.kind == "word" and len(nxt.text) == 1 and nxt.start == toks[k].end:
            continue  # `= 2x`
        lhs, rhs = [toks[x] for x in left], [toks[x] for x in right]
        value = evaluate(lhs)
        if value is None:
            continue
        sign = -1 if rhs[0].kind == "op" and rhs[0].op == "-" else 1
        lead = next((x for x in rhs if x.kind == "num"), None)
        if lead is None:
            continue
        options = [(sign * lead.raw, lead.decimals)]
        if lead.raw != lead.value:
            options.append((sign * lead.value, lead.decimals + 2))
        whole = evaluate(rhs)
        if whole is not None and len([x for x in rhs if x.kind == "num"]) > 1:
            options.append((whole, None))
        claimed = [v for v, _ in options]
        ok = any(_agrees(value, v, d) for v, d in options)
        shown = [text[lhs[0].start:lhs[-1].end], text[rhs[0].start:rhs[-1].end]]
        if latex:
            shown = [x.lstrip("$") for x in shown]
        calcs.append(Calc(lhs, *shown, value, claimed, ok, not latex and "$" in text[lhs[0].start:rhs[-1].end],
                          claimed[0] if len(options) > 1 + (lead.raw != lead.value) else None))
        used |= set(left) | set(right)
    stated = [t for i, t in enumerate(toks) if t.kind == "num" and i not in used]
    return calcs, stated


def fmt(v: Fraction, money: bool = False) -> str:
    """48, 2.5, 3.33 (non-terminating decimals rounded to 2 places), $ when money."""
    if v.denominator == 1:
        s = str(v.numerator)
    else:
        d = v.denominator
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d == 1:
            s = format(Decimal(v.numerator) / Decimal(v.denominator), "f")
        else:  # a runaway value from model text must not overflow a float
            s = f"{float(v):.2f}" if abs(v) < 10 ** 15 else str(round(v))
    return ("-$" + s[1:] if s.startswith("-") else "$" + s) if money else s


# -----------------------------------------------------------------------------
# Rules annotator: what the problem gives, then a pass over the steps

@dataclass
class Context:
    given: set            # numbers in the question (digits and words) and common constants
    reference: set        # every number the reference solution writes
    ref_calcs: list       # the reference solution's computations
    phrases: dict         # value -> how the question says it ("5 apples")


def build_context(row: dict) -> Context:
    """Collect the values a correct solution may use: the question's and the reference's."""
    toks = tokenize(row["question"])
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
        calcs, stated = analyze_text(step)
        ref_calcs += calcs
        for c in calcs:
            reference |= {t.value for t in c.operands} | {c.value}
        reference |= {t.value for t in stated}
    return Context(given, reference, ref_calcs, phrases)


def path_is_correct(row: dict) -> bool:
    """Stage 1's answer check against the gold answer (is_correct); recomputed if absent."""
    if isinstance(row.get("is_correct"), bool):
        return row["is_correct"]
    return answers_match(row["gold_answer"], row.get("answer"))


def known_error_step(row: dict) -> int | None:
    """The known error location if it lies inside the path (RG2: at or after it; RG3: at it)."""
    k = row.get("error_step")
    return k if isinstance(k, int) and 1 <= k <= len(row["steps"]) and row.get("method") in ("rg2", "rg3") else None


@dataclass
class Review:
    step_correct: list
    explanations: list
    final_correct: bool
    final_explanation: str


def _counterpart(calc: Calc, bad: Fraction, ctx: Context) -> Fraction | None:
    """For `a op b` with one unknown number, the number the reference uses in its place
    (a reference computation with the same operation and the same other number)."""
    if calc.binop is None:
        return None
    a, op, b = calc.binop
    bad_first = a == bad
    other = b if bad_first else a
    for ref in ctx.ref_calcs:
        if ref.binop is None or ref.binop[1] != op:
            continue
        ra, _, rb = ref.binop
        if (bad_first or op in "+*") and rb == other and ra != bad:
            return ra
        if (not bad_first or op in "+*") and ra == other and rb != bad:
            return rb
    return None


def _recompute(calc: Calc, fixes: dict) -> Fraction | None:
    """The left side with the first use of each wrong value replaced by its correct value."""
    subst = {}
    for old, new in fixes.items():
        pos = next((p for p, t in enumerate(calc.lhs) if t.kind == "num" and t.value == old), None)
        if new is None or pos is None:
            return None
        subst[pos] = new
    return evaluate(calc.lhs, subst)


def _taint(calc: Calc, i: int, fix, taint: dict, ctx: Context) -> None:
    """Remember a wrong result and its correct value; in `= 3 * 7` the 3 may be an input."""
    for v in calc.claimed:
        if not (v == calc.chain_lead and v in ctx.given):
            taint[v] = (i, fix)


def _wrong_number(used: Fraction, needed: Fraction, ctx: Context, money: bool) -> str:
    if needed in ctx.phrases:
        return f"it uses {fmt(used, money)}, but the problem says {ctx.phrases[needed]}."
    return f"it uses {fmt(used, money)} where {fmt(needed, money)} is needed."


def _carried(value: Fraction, src: int, fix, ctx: Context, money: bool) -> str:
    # Name the corrected value only when the correct solution has it: a correction pushed
    # through the path's own wrong reasoning would be a number no correct solution contains.
    if fix is not None and fix in ctx.reference:
        return f"it carries the earlier error from step {src}: {fmt(value, money)} should be {fmt(fix, money)}."
    return f"it carries the earlier error from step {src}, where {fmt(value, money)} is wrong."


def check_calc(calc: Calc, i: int, ctx: Context, known: set, taint: dict, soft: bool):
    """One computation -> (priority, what is wrong) or None; a wrong result is tainted with its
    corrected value (when one can be worked out) so later steps that use it are caught."""
    money = calc.money
    if not calc.ok:
        _taint(calc, i, calc.value, taint, ctx)
        return 0, f"{calc.lhs_text} is {fmt(calc.value, money)}, not {calc.rhs_text}."
    bad = list(dict.fromkeys(t.value for t in calc.operands if t.value in taint))
    if bad:
        src, fix = taint[bad[0]]
        _taint(calc, i, _recompute(calc, {v: taint[v][1] for v in bad}), taint, ctx)
        return None if src == i else (1, _carried(bad[0], src, fix, ctx, money))
    if not soft:
        return None
    unknown = [t.value for t in calc.operands if t.value not in known and t.raw not in known]
    if unknown:
        u = unknown[0]
        c = _counterpart(calc, u, ctx)
        _taint(calc, i, _recompute(calc, {u: c}), taint, ctx)
        if c is None:
            return 2, f"it uses {fmt(u, money)}, which is neither given in the problem nor found earlier."
        return 2, _wrong_number(u, c, ctx, money)
    if calc.binop is None:
        return None
    a, op, b = calc.binop
    same = [r for r in ctx.ref_calcs if r.binop and sorted([a, b]) == sorted([r.binop[0], r.binop[2]])]
    if any(r.binop[1] == op for r in same):
        return None  # the reference computes exactly this
    if same:
        _taint(calc, i, same[0].value, taint, ctx)
        return 3, (f"{calc.lhs_text} uses the wrong operation; the problem calls for "
                   f"{same[0].lhs_text} = {fmt(same[0].value, money)}.")
    if calc.value not in ctx.reference:  # a known number, but not the one this computation needs
        for u in (b, a):
            c = _counterpart(calc, u, ctx)
            if c is not None:
                _taint(calc, i, _recompute(calc, {u: c}), taint, ctx)
                return 3, _wrong_number(u, c, ctx, money)
    return None


def check_step(step: str, i: int, ctx: Context, known: set, taint: dict, soft: bool) -> list[str]:
    """All problems of one step, most definite first (arithmetic, carried error, misread number,
    wrong operation, number from nowhere). Values it computes correctly become known."""
    calcs, stated = analyze_text(step)
    found = []
    for calc in calcs:
        problem = check_calc(calc, i, ctx, known, taint, soft)
        if problem:
            found.append(problem)
        else:
            known |= {calc.value, *calc.claimed}
    for t in stated:
        if t.value in taint:
            src, fix = taint[t.value]
            if src != i:  # a wrong value repeated within its own step is one mistake
                found.append((1, _carried(t.value, src, fix, ctx, "$" in t.text)))
        elif soft and t.value not in known and t.raw not in known:
            taint[t.value] = (i, None)
            found.append((4, f"the value {fmt(t.value)} does not follow from the problem or the earlier steps."))
        else:
            known |= {t.value, t.raw}
    return list(dict.fromkeys(text for _, text in sorted(found, key=lambda f: f[0])))


def _praise(step: str, is_last: bool, answer_ok: bool, answer) -> str:
    calcs, _ = analyze_text(step)
    if is_last and answer_ok and answer is not None:
        return f"It gives the final answer {answer}, which is right."
    if calcs:
        return " ".join(f"{c.lhs_text} = {c.rhs_text} is right." for c in calcs[:2])
    return "This step is consistent with the problem."


def rules_review(row: dict) -> Review:
    """The whole rules annotation of one path: per-step verdicts and the final verdict."""
    steps, ctx = row["steps"], build_context(row)
    answer_ok, answer, gold = path_is_correct(row), row.get("answer"), row["gold_answer"]
    k = known_error_step(row)
    soft_from = None if answer_ok else (k or 1)  # before a known RG2/RG3 location: arithmetic only
    force_at = k if row.get("method") == "rg3" and not answer_ok else None
    known, taint = set(ctx.given | ctx.reference), {}
    correct, why = [], []
    for i, step in enumerate(steps, 1):
        found = check_step(step, i, ctx, known, taint, soft_from is not None and i >= soft_from)
        if not found and i == force_at and all(correct):
            novel = sorted({t.value for t in tokenize(step) if t.kind == "num"}
                           - ctx.given - ctx.reference)
            for v in novel:
                taint[v] = (i, None)
            kind = row.get("error_type") or "mistake"
            found = [f"this step makes a {kind}: {', '.join(map(fmt, novel))} does not follow from the problem."
                     if novel else f"this step makes a {kind}, and the solution goes wrong from here."]
        correct.append(not found)
        why.append(" Also, ".join(found[:2]) if found else _praise(step, i == len(steps), answer_ok, answer))
    if not answer_ok and steps and correct[-1]:
        correct[-1] = False
        why[-1] = _answer_mismatch(answer, gold, ctx)
    elif not answer_ok and steps and str(gold) not in why[-1]:
        why[-1] += " Also, " + _answer_mismatch(answer, gold, ctx)
    why = [w[:1].upper() + w[1:] for w in why]
    if answer_ok:
        final = f"The final answer {answer} is correct."
    elif answer is None:
        final = f"The solution never states a final answer; the correct answer is {gold}."
    else:
        final = f"The final answer {answer} is wrong; the correct answer is {gold}."
    return Review(correct, why, answer_ok, final)


def _answer_mismatch(answer, gold, ctx: Context) -> str:
    if answer is None:
        return f"it does not state a final answer; the correct answer is {gold}."
    toks = tokenize(str(answer))
    if len(toks) == 1 and toks[0].kind == "num" and toks[0].value in ctx.reference:
        return f"it stops at {answer}, an intermediate value; the question asks for {gold}."
    return f"the final answer {answer} does not match the correct answer {gold}."


def rules_critique(row: dict) -> str:
    """The rules annotation as critique text (common.format_critique)."""
    r = rules_review(row)
    return format_critique(row["steps"], r.step_correct, r.explanations, r.final_correct, r.final_explanation)


def rules_findings(row: dict) -> str:
    """A short list of what the rules checker found, as hints for an LLM annotator."""
    r = rules_review(row)
    lines = [f"- Step {i}: {w}" for i, (ok, w) in enumerate(zip(r.step_correct, r.explanations), 1) if not ok]
    if not lines:
        lines = ["- No arithmetic or number mistakes found."]
    return "\n".join(lines + [f"- {r.final_explanation}"])


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
# LLM annotators: prompt, batched local model, OpenAI-compatible API

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
    skeleton = "\n".join(f"Step {i}: <step {i} copied>\nVerdict: <Correct or Wrong>. <why>"
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


def call_api(client, messages, args, limiter, temperature: float, seed: int) -> str:
    """One chat completion, retried with exponential back-off on transient errors."""
    import openai
    fatal = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
             openai.BadRequestError)
    attempt = 0
    while True:
        limiter.wait()
        try:
            resp = client.chat.completions.create(model=args.annotator_model, messages=messages,
                                                  temperature=temperature, seed=seed,
                                                  max_tokens=args.max_new_tokens)
            return resp.choices[0].message.content or ""
        except fatal:
            raise
        except Exception:  # timeouts, connection errors, 429, 5xx
            if attempt >= args.max_retries:
                raise
        time.sleep(args.retry_wait * 2 ** attempt * (1 + 0.25 * random.random()))  # jitter
        attempt += 1


def annotate_one_api(client, row, args, limiter):
    """Ask, validate, re-ask: (row, text or None, attempts, problems or None)."""
    import openai
    problems = []
    for attempt in range(args.annotation_retries + 1):
        try:
            text = call_api(client, annotator_messages(row), args, limiter,
                            0.0 if attempt == 0 else 0.3, args.seed + attempt)
        except openai.BadRequestError as e:  # this row's prompt is refused (too long, ...): a drop
            return row, None, attempt + 1, [f"api rejected the request: {str(e)[:200]}"]
        problems = validate(row, text)
        if not problems:
            return row, text, attempt + 1, None
    return row, None, args.annotation_retries + 1, problems


def annotate_with_api(rows: list[dict], args, emit) -> int:
    """Threads call the server; the main thread writes each result as it completes."""
    import openai
    from openai import OpenAI
    client = OpenAI(base_url=args.annotator_url, api_key=os.environ.get(args.api_key_env) or "EMPTY",
                    max_retries=0, timeout=args.timeout)
    limiter, failed = RateLimiter(args.requests_per_minute), 0
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        futures = {pool.submit(annotate_one_api, client, r, args, limiter): r for r in rows}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                for f in futures:
                    f.cancel()
                raise SystemExit(f"annotator API refused the request: {e}") from None
            except Exception as e:  # left undone: the next run asks again
                failed += 1
                print(f"api error on {futures[fut]['id']}: {type(e).__name__}: {str(e)[:200]}")
                continue
            emit(*result)
    return failed


# -----------------------------------------------------------------------------
# Statistics, recomputed from the output files

def compute_stats(rows: list[dict], out_path: Path, dropped_path: Path) -> dict:
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
    p.add_argument("--max-new-tokens", type=int, default=768, help="LLM annotators: critique length limit")
    p.add_argument("--chunk-size", type=int, default=64, help="model: paths per generate call (and per write)")
    p.add_argument("--annotation-retries", type=int, default=2,
                   help="LLM annotators: re-asks after an invalid critique before dropping the path")
    p.add_argument("--annotator-url", default="http://localhost:8000/v1", help="api: base URL of the server")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="api: env var holding the key (unset: EMPTY)")
    p.add_argument("--max-retries", type=int, default=5, help="api: retries per request on transient errors")
    p.add_argument("--retry-wait", type=float, default=2.0, help="api: first back-off in seconds (doubles)")
    p.add_argument("--requests-per-minute", type=float, default=60, help="api: rate limit (0: none)")
    p.add_argument("--concurrency", type=int, default=4, help="api: requests in flight")
    p.add_argument("--timeout", type=float, default=120, help="api: seconds per request")
    p.add_argument("--seed", type=int, default=0, help="LLM annotators: seed of the first try (+1 per retry)")
    p.add_argument("--limit", type=int, default=None, help="annotate only the first N paths (quick trials)")
    p.add_argument("--retry-dropped", action="store_true", help="forget earlier drops and try those paths again")
    return p.parse_args(argv)


def main(args):
    rows = read_jsonl(args.paths)[:args.limit]
    require_fields(rows, FIELDS, args.paths)
    out = Path(args.out)
    dropped_path = Path(args.dropped or out.with_name(out.stem + ".dropped.jsonl"))
    stats_path = Path(args.stats or out.with_name(out.stem + ".stats.json"))
    if args.retry_dropped and dropped_path.exists():
        dropped_path.unlink()
    if args.annotator == "api" and not args.annotator_model:
        raise SystemExit("--annotator api needs --annotator-model (the server's model name)")
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
            for r in todo:
                text = rules_critique(r)
                emit(r, text, 1, validate(r, text) or None)
        elif args.annotator == "model":
            annotate_with_model(todo, args, emit)
        else:
            failed = annotate_with_api(todo, args, emit)
    stats = compute_stats(rows, out, dropped_path)
    write_json_atomic(stats_path, stats)
    print(f"kept {stats['kept']}, dropped {stats['dropped']} {stats['dropped_reasons'] or ''}, "
          f"retries {stats['retries']}, pending {stats['pending']}"
          + (f" ({failed} API failures, rerun to retry)" if failed else "")
          + f"  [{time.time() - start:.1f}s] -> {out}, {stats_path}")
    return stats


if __name__ == "__main__":
    main(parse_args())
