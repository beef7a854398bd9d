"""Convert between the kit's data and the formats the field already uses.

  trl-export      02's annotations.jsonl or 03's critic_sft.jsonl -> TRL stepwise supervision,
                  one row per path: {"prompt": question, "completions": [one per step],
                  "labels": [True where the critique says Correct], "id", "gold_answer" (null
                  when the input has none)}, as trl's PRMTrainer reads it.
  trl-import      TRL stepwise supervision (a local JSON/JSONL file, a hub id such as
                  trl-lib/math_shepherd or trl-lib/prm800k, or a dataset folder on disk) ->
                  critic SFT rows in 03's critic_sft.jsonl shape, which 04_train_critic.py trains
                  on: {"id", "messages": critic prompt + critique, "problem_id" (a hash of the
                  prompt, so 04 holds out whole problems), "method": "trl", "is_correct" (every
                  label True), "difficulty": null, "source", "source_row", "source_id",
                  "annotator", "annotated_steps"}. A step label becomes that step's verdict. With
                  --annotator rules|model|api (02's annotators, first Wrong step = first False
                  label) a step keeps the annotator's explanation where its verdict agrees with
                  the label, else, and with --annotator none, no Check line (a label says which
                  step is wrong, not why).
                  Resumable: rows already in --out are kept; other settings on it are refused.
  authors-import  the paper authors' files (a JSON array or JSONL) -> critic_sft.jsonl and
                  refine_sft.jsonl in 03's shapes, plus "source" and "source_row". Critique
                  rows: alpaca {"instruction": ... "Question:" ... "Solution:" ..., "output":
                  the critique} or {"question", "solution" | "response" | "origin_response",
                  "critique" | "critic"}; a critique is blocks of "Step sentence: / Correctness
                  of the step: / Explanation:" ending with "Correctness of the final answer:".
                  Refinement rows: alpaca, instruction = question + solution + critique (the
                  critique starts at a "Critique:" line or its first "Step sentence:"), output =
                  the refined solution. Critiques are rewritten in the kit's layout
                  (common.format_critique); the steps are the critique's step sentences; a
                  refined solution gets the actor's layout (one step per line, no opener).

A row that cannot be converted (a critique that does not parse, an empty step) is skipped and
counted by reason; a malformed file or a row of the wrong shape is an error naming file:line.

    python convert.py trl-export --data out/annotations.jsonl --out out/trl_steps.jsonl
    python convert.py trl-import --data trl-lib/math_shepherd --limit 2000 --annotator rules \\
        --out out/critic_sft_trl.jsonl && python 04_train_critic.py --data out/critic_sft_trl.jsonl \\
        --out-dir out/critic_trl
    python convert.py authors-import --critiques critique.json --refinements refine.json --out-dir out/authors
"""
import argparse
import re
import shlex
from collections import Counter
from pathlib import Path

import common

# -----------------------------------------------------------------------------
# Shared by the importers: one critic SFT row, in 03's shape


def problem_id(question: str) -> str:
    """Paths of one question share it, so 04's split by problem holds all of them out together."""
    return f"q{common.stable_seed(question.strip()):08x}"


def critic_row(row_id: str, question: str, steps: list[str], critique: str, method: str,
               source: str, source_row: int, **extra) -> dict:
    return {"id": row_id,
            "messages": common.critic_messages(question, steps) + [{"role": "assistant", "content": critique}],
            "problem_id": problem_id(question), "method": method,
            "is_correct": common.parse_critique(critique).final_correct is True, "difficulty": None,
            "source": source, "source_row": source_row, **extra}


def one_line(step: str) -> str:
    """The kit writes one step per line: a multi-line step (LaTeX in PRM800K) is joined up."""
    return re.sub(r"\s*\n\s*", " ", step).strip()


def report(kind: str, written: int, skipped: Counter, out) -> dict:
    print(f"[{kind}] {written} rows -> {out}" + (f"; skipped {dict(skipped)}" if skipped else ""))
    return {"rows": written, "skipped": dict(skipped)}


# -----------------------------------------------------------------------------
# TRL stepwise supervision out: the kit's step verdicts as labels


def _critic_prompt_marks() -> tuple[str, str]:
    """What critic_messages writes before the question and between it and the steps (read off
    the function itself, so a reworded prompt cannot silently break the inverse)."""
    user = common.critic_messages("\x00", ["\x01"])[1]["content"]
    before, rest = user.split("\x00")
    return before, rest.split(common.number_steps(["\x01"]))[0]


def critic_prompt_question(messages: list[dict]) -> str | None:
    """The question inside a critic prompt made by common.critic_messages, None if not one."""
    before, between = _critic_prompt_marks()
    user = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
    head, sep, _ = user.rpartition(between)
    return head[len(before):] if sep and head.startswith(before) else None


def labelled_path(where: str, row: dict) -> tuple[str, list[str], list[bool]] | str:
    """(question, steps, labels) of an annotated path (02) or a critic SFT row (03), or why not."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        question = critic_prompt_question(row["messages"])
        if question is None:
            return "not a critic prompt"
        crit = common.parse_critique(row["messages"][-1].get("content", ""))
        steps = [s.step for s in crit.steps]
    elif all(k in row for k in ("question", "steps", "critique")):
        question, steps = row["question"], row["steps"]
        crit = common.parse_critique(row["critique"], n_steps=len(steps))
    else:
        raise common.UsageError(f"{where}: neither an annotated path (question, steps, critique) "
                                "nor a critic SFT row (messages)")
    if not crit.ok:
        return "unreadable critique"
    return question, steps, [s.correct for s in crit.steps]


def trl_export(args) -> dict:
    rows, skipped = [], Counter()
    for where, row in common.iter_jsonl(args.data):
        got = labelled_path(where, row)
        if isinstance(got, str):
            skipped[got] += 1
            continue
        question, steps, labels = got
        gold = row.get("gold_answer")
        rows.append({"prompt": question, "completions": steps, "labels": labels,  # one type per column
                     "id": str(row.get("id", where)), "gold_answer": None if gold is None else str(gold)})
    if not rows:
        raise common.UsageError(f"{args.data}: no row with a readable step-level critique")
    common.write_jsonl_atomic(args.out, rows)
    return report("trl-export", len(rows), skipped, args.out)


# -----------------------------------------------------------------------------
# TRL stepwise supervision in: labels become verdicts, an annotator may explain them


def trl_example(where: str, row: dict) -> tuple[str, list[str], list[bool]]:
    """(prompt, completions, labels) of one TRL row; a row of another shape is the user's mistake."""
    prompt, completions, labels = row.get("prompt"), row.get("completions"), row.get("labels")
    if not isinstance(prompt, str):
        raise common.UsageError(f"{where}: 'prompt' must be a string (TRL stepwise supervision: "
                                "prompt, completions, labels)")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise common.UsageError(f"{where}: 'completions' must be a list of strings, one per step")
    if not isinstance(labels, list) or not all(isinstance(v, bool) or v in (0, 1) for v in labels):
        raise common.UsageError(f"{where}: 'labels' must be a list of booleans, one per step")
    if len(labels) != len(completions):
        raise common.UsageError(f"{where}: {len(completions)} completions but {len(labels)} labels")
    return prompt.strip(), [one_line(c) for c in completions], [bool(v) for v in labels]


def path_for_annotator(row_id: str, question: str, steps: list[str], labels: list[bool],
                       gold) -> dict:
    """The path in 02's schema. The first False label is an exactly known error location, which
    02 calls rg3 (its rules annotator marks that step Wrong when nothing earlier is)."""
    first = next((i for i, ok in enumerate(labels, 1) if not ok), None)
    return {"id": row_id, "question": question, "steps": steps, "reference_steps": [],
            "gold_answer": str(gold) if gold is not None else "unknown",
            "answer": common.extract_answer(common.join_steps(steps)), "is_correct": first is None,
            "method": "rg3" if first else "reference", "error_step": first, "error_type": None}


def labelled_critique(steps: list[str], labels: list[bool], text: str | None) -> tuple[str, int]:
    """(critique whose verdicts are the labels, how many steps kept the annotator's explanation)."""
    crit = common.parse_critique(text, n_steps=len(steps)) if text else None
    if crit is None or not crit.ok:
        return common.critique_from_labels(steps, labels), 0
    why = [s.explanation if s.correct == ok and s.explanation else None for s, ok in zip(crit.steps, labels)]
    final = crit.final_explanation if crit.final_correct == all(labels) else None
    return common.critique_from_labels(steps, labels, why, final), sum(w is not None for w in why)


def annotator_args(args):
    """02's own flags for its model/api annotators: its parser, so every default stays 02's."""
    argv = ["--annotator", args.annotator, "--annotator-url", args.annotator_url, "--backend", args.backend]
    if args.annotator_model:
        argv += ["--annotator-model", args.annotator_model]
    if args.device:
        argv += ["--device", args.device]
    a = common.load_stage_module("02_annotate").parse_args(argv + shlex.split(args.annotator_flags))
    if a.annotator == "api" and not a.annotator_model:
        raise common.UsageError("--annotator api needs --annotator-model (the server's model name)")
    a.annotator_model = a.annotator_model or common.DEFAULT_MODEL
    return a


def trl_import(args) -> dict:
    records = common.load_records(args.data, args.split, args.config, args.limit)
    source = args.data if Path(args.data).is_file() else f"{args.data}:{args.split}"
    name = Path(args.data).stem if Path(args.data).exists() else args.data.replace("/", "_")
    paths, skipped = [], Counter()
    for i, (where, row) in enumerate(records):
        question, steps, labels = trl_example(where, row)
        if not question or not steps or not all(steps):
            skipped["empty prompt or step"] += 1
            continue
        path = path_for_annotator(f"{name}-{i}", question, steps, labels, row.get("gold_answer"))
        path.update(labels=labels, source_row=i,
                    source_id=None if row.get("id") is None else str(row["id"]))
        paths.append(path)
    if not paths:
        raise common.UsageError(f"{args.data}: no usable rows")
    a2 = annotator_args(args) if args.annotator in ("model", "api") else None
    label = f"{args.annotator}:{a2.annotator_model}" if a2 else args.annotator
    out = Path(args.out)
    common.guard_config(out.with_name(out.name + ".config.json"),
                        {"data": source, "config": args.config, "annotator": label})
    with common.ResumableWriter(out) as writer:

        def emit(path, text, attempts=1, problems=None):
            critique, explained = labelled_critique(path["steps"], path["labels"], None if problems else text)
            writer.write(critic_row(path["id"], path["question"], path["steps"], critique, "trl", source,
                                    path["source_row"], source_id=path["source_id"], annotator=label,
                                    annotated_steps=explained))

        todo = [p for p in paths if p["id"] not in writer]
        print(f"[trl-import] {len(paths)} paths from {source}, {len(paths) - len(todo)} done before, "
              f"{len(todo)} to convert (annotator: {label})")
        stage2 = common.load_stage_module("02_annotate") if args.annotator != "none" else None
        if args.annotator in ("none", "rules"):
            for p in todo:
                emit(p, stage2 and stage2.rules_critique(p, reveal_answer=p["gold_answer"] != "unknown"))
        elif args.annotator == "model":
            stage2.annotate_with_model(todo, a2, emit)
        else:
            stage2.annotate_with_api(todo, a2, emit)
        ids = {p["id"] for p in paths}
        written = [r for r in writer.rows if r["id"] in ids]
    n_steps = sum(len(p["steps"]) for p in paths)
    explained = sum(r["annotated_steps"] for r in written)
    print(f"[trl-import] {sum(r['is_correct'] for r in written)} correct / "
          f"{sum(not r['is_correct'] for r in written)} flawed paths; "
          f"{explained} of {n_steps} steps explained by the annotator")
    return {**report("trl-import", len(written), skipped, out), "annotated_steps": explained, "steps": n_steps}


# -----------------------------------------------------------------------------
# The authors' critique and refinement files

_SECTION = re.compile(r"^\s*(question|problem|solution|response|critique|critic|feedback)\s*:\s*(.*)$",
                      re.IGNORECASE)
_SOLUTION_OPENER = re.compile(r"^\s*let's break it down step by step:?\s*$", re.IGNORECASE)
_PART = {"question": "question", "problem": "question", "solution": "solution",
         "response": "solution", "critique": "critique", "critic": "critique", "feedback": "critique"}


def split_instruction(text: str) -> dict:
    """{"question", "solution", "critique"} of an alpaca instruction laid out as [preamble]
    "Question:" ... "Solution:" ... [critique]; the critique starts at a "Critique:" line or at
    the first "Step sentence:" after the solution. A line "Let's break it down step by step:"
    (how the authors' actor opens a solution) also starts the solution. Without a "Question:"
    line the question is everything before the solution."""
    parts, current = {"preamble": [], "question": [], "solution": [], "critique": []}, "preamble"
    for line in text.splitlines():
        head = _SECTION.match(line)
        if head and current != "critique" and _PART[head.group(1).lower()] != current:
            current = _PART[head.group(1).lower()]
            line = head.group(2)
        elif current == "solution" and common.AUTHORS_STEP_HEAD.match(line):
            current = "critique"
        elif current in ("preamble", "question") and _SOLUTION_OPENER.match(line):
            current = "solution"
        parts[current].append(line)
    if not any(s.strip() for s in parts["question"]):
        parts["question"] = parts["preamble"]
    return {k: "\n".join(v).strip() for k, v in parts.items() if k != "preamble"}


def actor_layout(solution: str) -> str:
    """A solution as the kit's actor writes one: one step per line, no blank lines, without the
    authors' "Let's break it down step by step:" opener."""
    return common.join_steps(common.split_steps(
        "\n".join(line for line in solution.splitlines() if not _SOLUTION_OPENER.match(line))))


def _text(row: dict, *keys) -> str | None:
    return next((row[k] for k in keys if isinstance(row.get(k), str)), None)


def authors_parts(where: str, row: dict) -> dict:
    """{"question", "critique"[, "refined"]} of one authors' row, either shape."""
    instruction = _text(row, "instruction")
    if instruction is not None and isinstance(row.get("output"), str):
        full = "\n\n".join(t for t in (instruction, _text(row, "input") or "") if t.strip())
        parts = split_instruction(full)
        if parts["critique"]:
            return {"question": parts["question"], "critique": parts["critique"],
                    "refined": actor_layout(row["output"])}
        return {"question": parts["question"], "critique": row["output"]}
    question, critique = _text(row, "question"), _text(row, "critique", "critic")
    if question is None or critique is None:
        raise common.UsageError(f"{where}: expected an alpaca row (instruction, output) or "
                                "question + critique (or critic) fields")
    return {"question": question.strip(), "critique": critique}


def authors_import(args) -> dict:
    if not args.critiques and not args.refinements:
        raise common.UsageError("give --critiques and/or --refinements")
    out, result = Path(args.out_dir), {}
    for kind, spec in (("critic", args.critiques), ("refine", args.refinements)):
        if not spec:
            continue
        rows, skipped = [], Counter()
        for i, (where, row) in enumerate(common.iter_records(spec)):
            parts = authors_parts(where, row)
            crit = common.parse_critique(parts["critique"])
            if kind == "refine" and "refined" not in parts:
                raise common.UsageError(f"{where}: a refinement row needs the critique inside its "
                                        "instruction (after the solution) and the refined solution as output")
            if not crit.ok or not parts["question"]:
                skipped["critique does not parse" if not crit.ok else "no question found"] += 1
                continue
            steps = [one_line(s.step) for s in crit.steps]
            critique = common.format_critique(steps, [s.correct for s in crit.steps],
                                              [s.explanation for s in crit.steps], crit.final_correct,
                                              crit.final_explanation)
            row_id = f"{Path(spec).stem}-{i}"
            if kind == "critic":
                rows.append(critic_row(row_id, parts["question"], steps, critique, "authors", spec, i))
                continue
            boxed = "\\boxed" in parts["refined"]
            rows.append({"id": row_id, "messages": common.refine_messages(parts["question"], steps, critique, boxed)
                         + [{"role": "assistant", "content": parts["refined"]}],
                         "problem_id": problem_id(parts["question"]), "difficulty": None,
                         "source": spec, "source_row": i})
        path = out / f"{kind}_sft.jsonl"
        common.write_jsonl_atomic(path, rows)
        result[kind] = report(f"authors-import {kind}", len(rows), skipped, path)
    return result


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("trl-export", help="annotated paths or critic SFT rows -> TRL stepwise supervision")
    e.add_argument("--data", default="out/annotations.jsonl",
                   help="02's annotations.jsonl or 03's critic_sft.jsonl")
    e.add_argument("--out", default="out/trl_steps.jsonl", help="TRL stepwise supervision JSONL")
    i = sub.add_parser("trl-import", help="TRL stepwise supervision -> critic SFT rows for 04")
    i.add_argument("--data", required=True,
                   help="a local JSON/JSONL file, a hub dataset id (trl-lib/math_shepherd) or a dataset folder")
    i.add_argument("--split", default="train", help="hub / folder: the split to read")
    i.add_argument("--config", default=None, help="hub / folder: the dataset configuration, if it has several")
    i.add_argument("--limit", type=common.count, default=0, help="convert only the first N rows (0 = all)")
    i.add_argument("--out", default="out/critic_sft_trl.jsonl", help="critic SFT rows (JSONL, resumable)")
    i.add_argument("--annotator", choices=["none", "rules", "model", "api"], default="none",
                   help="who explains the labelled verdicts: none (verdicts only), or one of 02's annotators")
    i.add_argument("--annotator-model", default=None,
                   help="model: HF id or folder (default: the embedded model); api: the model name")
    i.add_argument("--annotator-url", default="http://localhost:8000/v1", help="api: base URL of the server")
    i.add_argument("--annotator-flags", default="",
                   help="more 02_annotate.py flags for the model/api annotators, e.g. '--concurrency 8'")
    common.add_backend_args(i)
    a = sub.add_parser("authors-import", help="the authors' critique / refinement files -> 03's SFT files")
    a.add_argument("--critiques", default=None, help="critique rows (JSON array or JSONL)")
    a.add_argument("--refinements", default=None, help="alpaca refinement rows (JSON array or JSONL)")
    a.add_argument("--out-dir", default="out/authors", help="where critic_sft.jsonl and refine_sft.jsonl go")
    return p.parse_args(argv)


def main(args):
    return {"trl-export": trl_export, "trl-import": trl_import, "authors-import": authors_import}[args.command](args)


if __name__ == "__main__":
    common.run_cli(main, parse_args)
