"""Stage 0: write the math problems every later stage reads, in one schema for all sources.

Reads nothing (built-in generator, the offline default), a local GSM8K / MATH file, or the
Hugging Face Hub. Writes `{out_dir}/{source}_train.jsonl` and `{out_dir}/{source}_test.jsonl`,
one problem per line:

    {"id": "builtin-train-000017", "source": "builtin"|"gsm8k"|"math", "split": "train"|"test",
     "question": str, "reference_steps": [str, ...], "answer": str, "difficulty": 1..5 or null}

`reference_steps` holds one reasoning step per item; the last is exactly `The answer is X.`
(`The answer is \\boxed{X}.` for MATH). Built-in steps contain exactly one computation each,
written inline as `a op b = c`, so a later stage can find and perturb any one of them.
A MATH solution is cut into the steps a reader would count: a sentence or a display equation
each, never inside a formula; `[asy]` drawings are dropped. The printed summary of each split
gives its steps-per-solution distribution and its longest step.

A train problem whose question is also in the test split is dropped from train (the count and
row numbers are printed). If that would drop every train problem (the same file passed as
train and test) the stage stops with an error instead of writing an empty train split.

    python 00_prepare_data.py
    python 00_prepare_data.py --source gsm8k --gsm8k-train path/to/train.jsonl --limit-train 50
    python 00_prepare_data.py --source math --math-test path/to/math500.jsonl
"""
import argparse
import os
import random
import re
from collections import Counter

import common

SCHEMA = ("id", "source", "split", "question", "reference_steps", "answer", "difficulty")

# -----------------------------------------------------------------------------
# Built-in generator: GSM8K-style stories whose computation chain is explicit
# -----------------------------------------------------------------------------
# A problem is a running quantity told as a story: a start (given, or one product), events
# that change it (1 or 2 computations each), and a question (plain, or one last division or
# multiplication). Every computation is recorded as [a, op, b, result] next to its sentence.
#
# Difficulty rule: level L has exactly L computation steps (level 5: 5 or 6), and its numbers
# come from SCALE[L], so harder levels are both longer and use bigger numbers.
SCALE = {  # level: (largest start value, most groups, largest group size, largest rate)
    1: (20, 4, 6, 5), 2: (50, 6, 10, 8), 3: (100, 8, 12, 10), 4: (400, 10, 20, 15), 5: (1000, 12, 30, 20)}
EVENT_STEPS = {"gain": 1, "lose": 1, "times": 1, "halve": 1, "gain_groups": 2, "lose_groups": 2}
NAMES = [("Maya", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he"), ("Aisha", "she"),
         ("Mateo", "he"), ("Chloe", "she"), ("Omar", "he"), ("Priya", "she"), ("Lucas", "he"),
         ("Hana", "she"), ("Diego", "he"), ("Elena", "she"), ("Kofi", "he"), ("Grace", "she"),
         ("Ravi", "he"), ("Zoe", "she"), ("Ben", "he"), ("Leila", "she"), ("Tomas", "he")]
PRONOUNS = {"she": dict(He="She", he="she", His="Her", his="her", him="her"),
            "he": dict(He="He", he="he", His="His", his="his", him="him")}
SOLUTIONS = {  # generic step sentences; a topic may override any kind
    "start_groups": ["That is {g} * {s} = {r} {units} to start with.",
                     "At the start there are {g} * {s} = {r} {units}."],
    "gain": ["Adding {n} gives {a} + {n} = {r} {units}.", "Now the total is {a} + {n} = {r} {units}."],
    "lose": ["Taking away {n} leaves {a} - {n} = {r} {units}.", "That leaves {a} - {n} = {r} {units}."],
    "gain_groups": [("That adds {g} * {s} = {p} {units}.", "So the total becomes {a} + {p} = {r} {units}."),
                    ("That is {g} * {s} = {p} more {units}.", "Together that is {a} + {p} = {r} {units}.")],
    "lose_groups": [("That takes away {g} * {s} = {p} {units}.", "So {a} - {p} = {r} {units} remain."),
                    ("In all {g} * {s} = {p} {units} are gone.", "That leaves {a} - {p} = {r} {units}.")],
    "times": ["Being {k} times as large, the total is {a} * {k} = {r} {units}."],
    "halve": ["Half of {a} is {a} / 2 = {r}, so {r} {units} are left."],
    "split": ["Each share is {a} / {k} = {r} {units}.",
              "Dividing equally gives {a} / {k} = {r} {units} each."],
    "rate": ["{a} {units} at {p} {currency} per {unit} is {a} * {p} = {r} {currency}."],
}
TOPICS = [
    dict(name="shopping", currency="cents",
         units=[("pen", "pens"), ("sticker", "stickers"), ("marble", "marbles"), ("eraser", "erasers")],
         start=["{Name} has {v} {units} in {his} desk drawer.",
                "At the start of the week, {Name} owns {v} {units}."],
         start_groups=["{Name} buys {g} packs of {units} with {s} {units} in each pack.",
                       "At the store, {Name} picks up {g} boxes that each hold {s} {units}."],
         gain=["{He} buys {n} more {units} at the corner shop.",
               "{Friend} gives {him} {n} {units} as a present."],
         lose=["{He} gives {n} {units} to {Friend}.", "{He} loses {n} {units} on the bus."],
         gain_groups=["Later {he} buys {g} more packs with {s} {units} in each."],
         lose_groups=["{He} gives {g} classmates {s} {units} each."],
         times=["After a lucky trade, {he} has {k} times as many {units} as before."],
         halve=["{He} gives half of {his} {units} to {Friend}."],
         plain=["How many {units} does {Name} have now?", "How many {units} does {he} end up with?"],
         split=["{He} sorts all of {his} {units} into {k} equal piles. How many {units} are in each pile?"],
         rate=["Each {unit} is worth {p} cents. How many cents are all of {his} {units} worth?"]),
    dict(name="baking", currency="dollars",
         units=[("cookie", "cookies"), ("muffin", "muffins"), ("cupcake", "cupcakes"), ("roll", "rolls")],
         start=["{Name} has baked {v} {units} for the school fair.",
                "There are {v} {units} cooling on {Name}'s counter."],
         start_groups=["{Name} bakes {g} trays of {units} with {s} {units} on each tray.",
                       "For a party, {Name} makes {g} batches of {units}, and each batch has {s} {units}."],
         gain=["{He} bakes another {n} {units} in the afternoon.", "{Friend} brings over {n} more {units}."],
         lose=["{His} family eats {n} of the {units}.", "{He} drops {n} {units} and has to throw them away."],
         gain_groups=["Then {he} bakes {g} more trays with {s} {units} on each."],
         lose_groups=["{He} sells {g} boxes with {s} {units} in each box.",
                      "{He} gives {g} neighbors {s} {units} each."],
         times=["{He} keeps baking until {he} has {k} times as many {units} as before."],
         halve=["{He} takes half of the {units} to {his} grandmother."],
         plain=["How many {units} does {Name} have now?", "How many {units} are there now?"],
         split=["{He} packs all the {units} equally into {k} boxes. How many {units} go in each box?"],
         rate=["{He} sells every {unit} for {p} dollars. "
               "How many dollars does {he} make by selling all of them?"]),
    dict(name="travel", currency="cents", units=[("kilometer", "kilometers")],
         start=["{Name} has already driven {v} kilometers on a road trip.",
                "On the first day of a bike tour, {Name} rides {v} kilometers."],
         start_groups=["{Name} drives for {g} hours at {s} kilometers per hour.",
                       "{Name} cycles for {g} hours at {s} kilometers per hour."],
         gain=["After lunch {he} travels another {n} kilometers.",
               "The next morning {he} covers {n} more kilometers."],
         gain_groups=["Then {he} travels for {g} more hours at {s} kilometers per hour.",
                      "{He} finishes with {g} days of riding {s} kilometers a day."],
         plain=["How many kilometers has {Name} traveled in total?",
                "What is the total distance {Name} covers, in kilometers?"],
         split=["{Friend} covers the same distance in {k} equal daily stages. "
                "How many kilometers long is each stage?"],
         rate=["Fuel for the trip costs {p} cents per kilometer. "
               "How many cents does the fuel cost in total?"],
         solutions={"start_groups": ["In that time {he} covers {g} * {s} = {r} kilometers."]}),
    dict(name="savings", currency="tokens", units=[("dollar", "dollars")],
         start=["{Name} has {v} dollars in {his} piggy bank.",
                "{Name} has saved {v} dollars for a new bike."],
         start_groups=["{Name} saves {s} dollars every week for {g} weeks.",
                       "{Name} earns {s} dollars a day for {g} days at a summer job."],
         gain=["{His} aunt gives {him} {n} dollars for {his} birthday.",
               "{He} earns {n} dollars by mowing lawns."],
         lose=["{He} spends {n} dollars on a video game.", "{He} pays {n} dollars for a concert ticket."],
         gain_groups=["{He} walks a neighbor's dog {g} times and gets {s} dollars each time."],
         lose_groups=["{He} buys {g} books that cost {s} dollars each.",
                      "{He} buys {g} movie tickets at {s} dollars apiece."],
         times=["{His} parents add money so that {his} savings become {k} times as large."],
         halve=["{He} donates half of {his} money to an animal shelter."],
         plain=["How many dollars does {Name} have now?",
                "How much money, in dollars, does {Name} have at the end?"],
         split=["{He} divides all of {his} money equally among {k} envelopes. "
                "How many dollars go in each envelope?"],
         rate=["At the arcade every dollar buys {p} tokens. "
               "How many tokens can {he} get with all of {his} money?"]),
    dict(name="classroom", currency="cents",
         units=[("pencil", "pencils"), ("crayon", "crayons"), ("marker", "markers"),
                ("glue stick", "glue sticks")],
         start=["{Name}'s classroom has {v} {units} in the supply cupboard.",
                "A teacher named {Name} keeps {v} {units} for art class."],
         start_groups=["{Name}'s classroom has {g} tables, and each table has {s} {units}.",
                       "{Name} orders {g} boxes of {units} with {s} {units} per box for the class."],
         gain=["The school office sends {n} more {units}.", "A parent donates {n} {units} to the class."],
         lose=["The students use up {n} {units} during a project.",
               "By Friday, {n} {units} have gone missing."],
         gain_groups=["{Name} brings in {g} more boxes holding {s} {units} each."],
         lose_groups=["{g} students each borrow {s} {units} and take them home."],
         halve=["{Name} gives half of the {units} to the class next door."],
         plain=["How many {units} does the class have now?", "How many {units} are in the classroom now?"],
         split=["{Name} shares all the {units} equally among {k} groups of students. "
                "How many {units} does each group get?"],
         rate=["Each {unit} costs {p} cents. How many cents are all the {units} worth?"]),
    dict(name="farm", currency="cents", units=[("egg", "eggs")],
         start=["{Name} collects {v} eggs from the hen house on Monday.",
                "{Name}'s farm stand has {v} eggs for sale."],
         start_groups=["{Name} has {g} hens, and each hen lays {s} eggs in a month.",
                       "{Name} finds {g} nests with {s} eggs in each."],
         gain=["{He} collects {n} more eggs on Tuesday.", "{Friend} drops off {n} eggs from the next farm."],
         lose=["On the way to the market {n} eggs crack.",
               "{He} uses {n} eggs to cook breakfast for the workers."],
         gain_groups=["{His} {g} ducks also lay {s} eggs each."],
         lose_groups=["{He} sells {g} cartons with {s} eggs in each carton."],
         halve=["{He} gives half of the eggs to {Friend}'s bakery."],
         plain=["How many eggs does {Name} have now?", "How many eggs are on the farm now?"],
         split=["{He} puts the eggs equally into {k} baskets. How many eggs are in each basket?"],
         rate=["{He} sells each egg for {p} cents. How many cents does {he} earn by selling all of them?"]),
    dict(name="quiz game", currency="tickets", units=[("point", "points")],
         start=["{Name}'s team has {v} points after the first round of a quiz.",
                "{Name} has {v} points halfway through a trivia game."],
         start_groups=["{Name} answers {g} quiz questions worth {s} points each.",
                       "In the first round, {Name} wins {g} challenges worth {s} points each."],
         gain=["{He} scores {n} more points in the next round.",
               "A bonus card gives {him} {n} extra points."],
         lose=["{He} loses {n} points as a penalty.", "The host takes away {n} points for a wrong buzz."],
         gain_groups=["In the next round {he} solves {g} puzzles worth {s} points each."],
         lose_groups=["{He} misses {g} questions, and each miss costs {s} points."],
         times=["A golden card multiplies {his} score by {k}."],
         plain=["How many points does {Name} have at the end?", "What is {Name}'s final score in points?"],
         split=["The points are shared equally among {k} teammates. How many points does each teammate get?"],
         rate=["Each point is worth {p} tickets at the prize booth. How many tickets does {Name} get?"]),
    dict(name="reading", currency="stars", units=[("page", "pages")],
         start=["{Name} has read {v} pages of a mystery novel.",
                "By Monday night {Name} has finished {v} pages of {his} history book."],
         start_groups=["{Name} reads {s} pages a day for {g} days.",
                       "{Name} reads {g} chapters that are {s} pages long each."],
         gain=["On Saturday {he} reads {n} more pages.", "{He} reads another {n} pages on the train."],
         gain_groups=["Over the weekend {he} reads {g} more chapters of {s} pages each."],
         plain=["How many pages has {Name} read in total?", "How many pages has {he} read so far?"],
         split=["If {he} had spread those pages evenly over {k} days, "
                "how many pages would {he} have read each day?"],
         rate=["{His} reading club awards {p} stars for every page read. How many stars does {Name} earn?"]),
    dict(name="factory", currency="dollars",
         units=[("toy car", "toy cars"), ("bottle", "bottles"), ("chair", "chairs"), ("lamp", "lamps")],
         start=["A factory run by {Name} makes {v} {units} on Monday.",
                "{Name}'s workshop has {v} {units} in stock."],
         start_groups=["{Name}'s factory has {g} machines, and each machine makes {s} {units} a day.",
                       "{Name}'s workshop builds {s} {units} a day for {g} days."],
         gain=["The night shift makes {n} more {units}.", "A supplier delivers {n} extra {units}."],
         lose=["{n} {units} fail the quality check and are recycled.",
               "{Name} ships {n} {units} to a store."],
         gain_groups=["The next day {g} workers each build {s} more {units}."],
         lose_groups=["{Name} ships {g} crates with {s} {units} in each crate."],
         halve=["Half of the {units} are sent to a warehouse in another city."],
         plain=["How many {units} does {Name} have now?", "How many {units} are at the factory now?"],
         split=["{Name} loads the {units} equally onto {k} trucks. How many {units} go on each truck?"],
         rate=["Each {unit} sells for {p} dollars. How many dollars are all the {units} worth?"]),
    dict(name="garden", currency="cents",
         units=[("tomato", "tomatoes"), ("strawberry", "strawberries"), ("pepper", "peppers"),
                ("carrot", "carrots")],
         start=["{Name} picks {v} {units} from {his} garden.",
                "There are {v} {units} in {Name}'s harvest basket."],
         start_groups=["{Name} has {g} {unit} plants with {s} {units} on each plant.",
                       "{Name} fills {g} buckets with {s} {units} each."],
         gain=["The next day {he} picks {n} more {units}.",
               "{Friend} brings {him} {n} {units} from another garden."],
         lose=["Birds eat {n} of the {units}.", "{He} gives {n} {units} to {Friend}."],
         gain_groups=["{Friend} brings {g} baskets holding {s} {units} each."],
         lose_groups=["{He} cooks {g} pots of soup, using {s} {units} in each pot."],
         times=["After a sunny week the harvest grows to {k} times as many {units}."],
         halve=["{He} gives half of the {units} to the neighbors."],
         plain=["How many {units} does {Name} have now?", "How many {units} does {he} have in the end?"],
         split=["{He} shares the {units} equally among {k} friends. How many {units} does each friend get?"],
         rate=["At the market each {unit} sells for {p} cents. "
               "How many cents does {he} get for all of them?"]),
    dict(name="library", currency="cents", units=[("book", "books")],
         start=["The library where {Name} works has {v} books.", "{Name}'s book club owns {v} books."],
         start_groups=["The library has {g} shelves holding {s} books each.",
                       "{Name} unpacks {g} boxes with {s} books in each box."],
         gain=["{Name} receives {n} donated books.", "The town council buys {n} new books."],
         lose=["Students borrow {n} books.", "{n} old books are too damaged to keep and are removed."],
         gain_groups=["{Name} unpacks {g} more boxes of {s} books each."],
         lose_groups=["{g} classes each borrow {s} books."],
         halve=["Half of the books are moved to the new reading room."],
         plain=["How many books are on the shelves now?",
                "How many books does {Name} have to look after now?"],
         split=["{Name} arranges all the books equally on {k} shelves. How many books go on each shelf?"],
         rate=["Labels cost {p} cents per book. How many cents does labeling all the books cost?"]),
]


def _make_problem(rng, level):
    topic = rng.choice(TOPICS)
    name, pronoun = rng.choice(NAMES)
    unit, units = rng.choice(topic["units"])
    words = dict(Name=name, Friend=rng.choice([n for n, _ in NAMES if n != name]), unit=unit,
                 units=units, currency=topic["currency"], **PRONOUNS[pronoun])
    hi, max_g, max_s, max_p = SCALE[level]
    question, steps, calcs, question_templates = [], [], [], set()

    def say(templates, **nums):
        return rng.choice(templates).format(**words, **nums)

    def ask(templates, **nums):  # prefer unused sentences: "Then he bakes... Then he bakes..." reads badly
        fresh = [t for t in templates if t not in question_templates] or templates
        template = rng.choice(fresh)
        question_templates.add(template)
        question.append(template.format(**words, **nums))

    def compute(a, op, b):  # the only place a result is made, so the chain is exact by construction
        r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert r >= 0 and (op != "/" or a % b == 0)
        calcs.append([a, op, b, r])
        return r

    def sol(kind):
        return topic.get("solutions", {}).get(kind, SOLUTIONS[kind])

    budget = level if level < 5 else rng.choice((5, 6))
    if rng.random() < 0.4:
        g, s = rng.randint(2, max_g), rng.randint(2, max_s)
        ask(topic["start_groups"], g=g, s=s)
        value = compute(g, "*", s)
        steps.append(say(sol("start_groups"), g=g, s=s, r=value))
        budget -= 1
    else:
        value = rng.randint(max(5, hi // 4), hi)
        ask(topic["start"], v=value)
    finisher = rng.choice(("split", "rate")) if budget >= 1 and rng.random() < 0.45 else "plain"
    if finisher != "plain":
        budget -= 1
    used_times, kind = False, None
    while budget > 0:
        feasible = {"gain": True, "lose": value >= 3, "times": not used_times, "halve": value % 2 == 0,
                    "gain_groups": True, "lose_groups": value >= 5}
        kinds = [k for k in EVENT_STEPS if k in topic and feasible[k] and EVENT_STEPS[k] <= budget]
        kinds = [k for k in kinds if set(topic[k]) - question_templates] or kinds  # no sentence twice
        kind = rng.choice([k for k in kinds if k != kind] or kinds)  # and no kind twice in a row
        budget -= EVENT_STEPS[kind]
        a = value
        if kind in ("gain", "lose"):
            n = rng.randint(2, max(2, hi // 2) if kind == "gain" else min(a - 1, max(2, hi // 2)))
            ask(topic[kind], n=n)
            value = compute(a, "+" if kind == "gain" else "-", n)
            steps.append(say(sol(kind), a=a, n=n, r=value))
        elif kind in ("gain_groups", "lose_groups"):
            if kind == "gain_groups":
                g, s = rng.randint(2, max_g), rng.randint(2, max_s)
            else:  # keep the removed amount below what there is, so nothing goes negative
                g = rng.randint(2, min(max_g, (a - 1) // 2))
                s = rng.randint(2, min(max_s, (a - 1) // g))
            ask(topic[kind], g=g, s=s)
            p = compute(g, "*", s)
            value = compute(a, "+" if kind == "gain_groups" else "-", p)
            first, second = rng.choice(sol(kind))
            steps += [first.format(**words, g=g, s=s, p=p), second.format(**words, a=a, p=p, r=value)]
        elif kind == "times":
            used_times, k = True, rng.randint(2, 3 if level < 3 else 4)
            ask(topic["times"], k=k)
            value = compute(a, "*", k)
            steps.append(say(sol("times"), a=a, k=k, r=value))
        else:
            ask(topic["halve"])
            value = compute(a, "/", 2)
            steps.append(say(sol("halve"), a=a, r=value))
    divisors = [d for d in range(2, 13) if value % d == 0 and value // d >= 2]
    if finisher == "split" and not divisors:
        finisher = "rate"  # a prime total cannot be shared evenly; a price keeps the step count
    a = value
    if finisher == "split":
        k = rng.choice(divisors)
        ask(topic["split"], k=k)
        value = compute(a, "/", k)
        steps.append(say(sol("split"), a=a, k=k, r=value))
    elif finisher == "rate":
        p = rng.randint(2, max_p)
        ask(topic["rate"], p=p)
        value = compute(a, "*", p)
        steps.append(say(sol("rate"), a=a, p=p, r=value))
    else:
        ask(topic["plain"])
    steps.append(f"The answer is {value}.")
    return {"source": "builtin", "question": " ".join(question), "reference_steps": steps,
            "answer": str(value), "difficulty": level, "topic": topic["name"], "computations": calcs}


def normalize_question(text):
    return " ".join(text.lower().split())


def _take_unique(rng, n, seen, difficulty=None):
    """Draw n problems whose normalized question is not in `seen` (which is updated)."""
    rows, draws = [], 0
    while len(rows) < n:
        # Cycling levels keeps them balanced; a skipped duplicate only shifts the cycle.
        level = difficulty or draws % 5 + 1
        draws += 1
        if draws > 50 * n + 1000:
            raise common.UsageError(f"the built-in generator found only {len(rows)} distinct "
                                    f"problems of the {n} asked for; ask for fewer")
        row = _make_problem(rng, level)
        key = normalize_question(row["question"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def generate_builtin(n, seed, difficulty=None):
    """n distinct problems, levels cycling 1..5 (or all `difficulty`). The generator's rows carry
    two extras, `topic` and `computations` ([a, op, b, result] per computation, in step order),
    for checking the generator itself; `finalize` drops them, so the written files have the
    schema of every source and later stages read the arithmetic from the step text."""
    return _take_unique(random.Random(seed), n, set(), difficulty)


def finalize(rows, source, split):
    """Schema-ordered rows with stable ids; extra keys are dropped so every source looks alike."""
    out = []
    for i, row in enumerate(rows):
        row = dict(row, id=f"{source}-{split}-{row.get('index', i):06d}", source=source, split=split)
        out.append({k: row.get(k) for k in SCHEMA})
    return out


def make_builtin_splits(n_train, n_test, seed):
    """(train_rows, test_rows) in the file schema. Test comes first from its own seed stream,
    then train skips any question already in test, so the splits never share a problem."""
    seen = set()
    test = _take_unique(random.Random(f"test:{seed}"), n_test, seen)
    train = _take_unique(random.Random(f"train:{seed}"), n_train, seen)
    return finalize(train, "builtin", "train"), finalize(test, "builtin", "test")


# -----------------------------------------------------------------------------
# GSM8K and MATH: read local JSONL (or the Hub) and convert to the schema
# -----------------------------------------------------------------------------
def load_hub(name, config=None, split=None):
    try:
        import datasets  # lazy: the offline default must not need it
    except ImportError:
        raise common.UsageError(f"loading {name} needs the `datasets` package; "
                                "or pass local JSONL files (see --help)") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, gated, renamed: say what to do instead of a long trace
        raise common.UsageError(f"could not load {name} from the Hugging Face Hub "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                "if this machine is offline, pass local JSONL files (see --help)") from None


CALCULATOR = re.compile(r"<<[^>]*>>")


def convert_gsm8k(row, where):
    """GSM8K keeps calculator notes like <<48/2=24>> inline and ends with '#### 72'."""
    steps, answer = [], None
    for line in row["answer"].split("\n"):
        line = CALCULATOR.sub("", line).strip()
        if line.startswith("####"):
            answer = line[4:].strip().replace(",", "")
        elif line:
            steps.append(line)
    if not answer:
        raise common.UsageError(f"{where}: no '#### answer' line in the solution")
    # No official level in GSM8K; the test-time stage bins by the actor's own pass rate instead.
    return {"question": row["question"].strip(), "reference_steps": steps + [f"The answer is {answer}."],
            "answer": answer, "difficulty": None}


def _math_open(text):
    """True while display or inline math started in `text` is still unclosed."""
    text = text.replace("\\$", "")
    singles = text.replace("$$", "").count("$")
    opened = len(re.findall(r"(?<!\\)\\\[", text)) + text.count("\\begin{")
    closed = len(re.findall(r"(?<!\\)\\\]", text)) + text.count("\\end{")
    return text.count("$$") % 2 == 1 or singles % 2 == 1 or opened > closed


ASY = re.compile(r"\[asy\].*?(?:\[/asy\]|\Z)", re.DOTALL | re.IGNORECASE)
# Where a sentence may end: after . ! ? (and a closing quote or bracket), before a space and a
# capital, digit or math. Words that end in a period without ending the sentence:
ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf", "Mr", "Mrs", "Ms", "Dr", "St", "No", "Fig")
_SENTENCE_GAP = re.compile(r"[\"')\]]*\s+(?=[A-Z0-9$\\(])")


def _line_steps(solution):
    """One step per line; lines inside unfinished math are joined with a space (which LaTeX
    treats like the newline) so a formula is never cut and each step stays on one line."""
    steps, buf = [], []
    for line in solution.split("\n"):
        if line.strip():
            buf.append(line.strip())
        if buf and not _math_open(" ".join(buf)):
            steps.append(" ".join(buf))
            buf = []
    return steps + ([" ".join(buf)] if buf else [])


def _sentence_ends(text):
    """Offsets in `text` after which a new step starts: the end of a sentence outside math, and
    the end of a display equation ($$..$$, \\[..\\], \\begin..\\end) that more text follows."""
    ends, i, close, display = [], 0, None, False
    while i < len(text):
        if close is None:
            env = re.match(r"\\begin\{([^}]*)\}", text[i:])
            if env or text.startswith(("\\[", "$$"), i):
                close = f"\\end{{{env.group(1)}}}" if env else "\\]" if text[i] == "\\" else "$$"
                display, i = True, i + (env.end() if env else 2)
                continue
            if text.startswith("\\(", i) or text[i] == "$":
                close, display, i = ("\\)" if text[i] == "\\" else "$"), False, i + (2 if text[i] == "\\" else 1)
                continue
            if text[i] == "\\":  # \$ and other escapes are text
                i += 2
                continue
            word = re.search(r"(\S*)$", text[:i]).group(1)
            if text[i] in ".!?" and not word.endswith(ABBREVIATIONS) and _SENTENCE_GAP.match(text, i + 1):
                ends.append(_SENTENCE_GAP.match(text, i + 1).start() + len(
                    re.match(r"[\"')\]]*", text[i + 1:]).group()))
            i += 1
        elif text.startswith(close, i):
            i += len(close)
            # a display ends its step; inline math ends one when its sentence ends inside it (`$x=2.$ So`)
            if (display and text[i:].strip()) or (text[i - len(close) - 1] in ".!?" and _SENTENCE_GAP.match(text, i)):
                ends.append(i)
            close = None
        else:
            i += 2 if text[i] == "\\" else 1
    return ends


def split_solution(solution):
    """A MATH solution as the steps a reader would count: one per sentence and per display
    equation, never cutting a formula; `[asy]` drawings are dropped (a drawing is not a step
    anyone can judge). Line breaks end steps too; lines inside unfinished math are joined."""
    steps = []
    for line in _line_steps(ASY.sub("\n", solution)):
        cuts = [0, *_sentence_ends(line), len(line)]
        steps += [line[a:b].strip() for a, b in zip(cuts, cuts[1:]) if line[a:b].strip()]
    return steps


def parse_level(level):
    digits = re.findall(r"\d+", str(level)) if level is not None else []  # 3, "3", "Level 3", "Level ?"
    return min(5, max(1, int(digits[0]))) if digits else None


def convert_math(row, where):
    answer = str(row.get("answer") or "").strip() or common.last_boxed(row["solution"])
    if not answer:
        raise common.UsageError(f"{where}: no answer field and no \\boxed{{}} in the solution")
    steps = split_solution(row["solution"]) + [f"The answer is \\boxed{{{answer}}}."]
    return {"question": row["problem"].strip(), "reference_steps": steps, "answer": answer,
            "difficulty": parse_level(row.get("level"))}


REQUIRED = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}  # text fields of a row
MATH_TRAIN_CONFIGS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                      "number_theory", "prealgebra", "precalculus"]


def load_external(args):
    """{split: [(where, row)]}. With any local file given, only the given splits are written;
    with none, both splits come from the Hub."""
    if args.source == "gsm8k":
        local = {"train": args.gsm8k_train, "test": args.gsm8k_test}
    else:
        local = {"train": args.math_train, "test": args.math_test}
    if any(local.values()):
        raw = {s: list(common.iter_jsonl(p, REQUIRED[args.source])) for s, p in local.items() if p}
        for s, rows in raw.items():
            if not rows:
                raise common.UsageError(f"{local[s]}: no rows")
        return raw
    if args.source == "gsm8k":
        ds = load_hub("openai/gsm8k", "main")
        return {s: [(f"openai/gsm8k[{s}][{i}]", dict(r)) for i, r in enumerate(ds[s])]
                for s in ("train", "test")}
    test = load_hub("HuggingFaceH4/MATH-500", split="test")
    train = [(f"hendrycks_math/{c}[{i}]", dict(r)) for c in MATH_TRAIN_CONFIGS
             for i, r in enumerate(load_hub("EleutherAI/hendrycks_math", c, split="train"))]
    return {"train": train, "test": [(f"MATH-500[{i}]", dict(r)) for i, r in enumerate(test)]}


def drop_test_overlap(train, test, args):
    """Train rows whose question is not a test question. Dropping a few shared problems keeps
    the splits honest; dropping all of them means the same file was passed twice, and an
    empty train split is never what was meant, so that stops the run."""
    test_questions = {normalize_question(r["question"]) for r in test}
    shared = [normalize_question(r["question"]) in test_questions for r in train]
    kept = [r for r, dup in zip(train, shared) if not dup]
    files = {"gsm8k": (args.gsm8k_train, args.gsm8k_test), "math": (args.math_train, args.math_test)}
    train_file, test_file = files[args.source]
    if train and not kept:
        raise common.UsageError(
            f"{train_file or 'train split'}: all {len(train)} train problems also appear in the test split "
            f"({test_file or 'the Hub'}), so nothing would be left to train on; pass two different files")
    if len(kept) < len(train):
        rows = [str(r["index"] + 1) for r, dup in zip(train, shared) if dup]
        print(f"dropped {len(rows)} of {len(train)} train problems that also appear in the test split "
              f"(the test copy is kept): train rows {', '.join(rows[:20])}{' ...' if len(rows) > 20 else ''}")
    return kept


def convert_external(args):
    convert = convert_gsm8k if args.source == "gsm8k" else convert_math
    raw = load_external(args)
    out = {}
    for split in ("test", "train"):  # test first, so train can be checked against it
        if split not in raw:
            continue
        limit = args.limit_train if split == "train" else args.limit_test
        rows = []
        for i, (where, row) in enumerate(common.take(raw[split], limit)):
            not_text = [k for k in REQUIRED[args.source] if not isinstance(row[k], str)]
            if not_text:
                raise common.UsageError(f"{where}: {', '.join(not_text)} must be text")
            rows.append(dict(convert(row, where), index=i))
        if split == "train" and "test" in out:
            rows = drop_test_overlap(rows, out["test"], args)
        out[split] = finalize(rows, args.source, split)
    return out


# -----------------------------------------------------------------------------
# Output
# -----------------------------------------------------------------------------
def steps_distribution(rows):
    """How many reasoning steps (the final answer line not counted) the solutions have, and
    how long the longest step is: a critic judges steps, so a one-paragraph "step" shows here."""
    counts = sorted(len(r["reference_steps"]) - 1 for r in rows)
    if not counts:
        return "no solutions"
    bins = Counter("1" if c <= 1 else "2-3" if c <= 3 else "4-6" if c <= 6 else "7-10" if c <= 10 else ">10"
                   for c in counts)
    longest = max(len(s) for r in rows for s in r["reference_steps"])
    return (f"steps per solution: median {counts[len(counts) // 2]}, {counts[0]}-{counts[-1]}; "
            + "  ".join(f"{b}:{bins[b]}" for b in ("1", "2-3", "4-6", "7-10", ">10") if bins[b])
            + f"; longest step {longest} chars")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["builtin", "gsm8k", "math"], default="builtin",
                   help="where problems come from (builtin needs no files and no network)")
    p.add_argument("--out-dir", default="data",
                   help="folder for {source}_train.jsonl and {source}_test.jsonl")
    p.add_argument("--n-train", type=common.count, default=2000, help="builtin: number of training problems")
    p.add_argument("--n-test", type=common.count, default=200, help="builtin: number of test problems")
    p.add_argument("--seed", type=int, default=0, help="builtin: seed; the same seed gives identical files")
    p.add_argument("--gsm8k-train", help="local GSM8K train JSONL (fields question, answer)")
    p.add_argument("--gsm8k-test", help="local GSM8K test JSONL (fields question, answer)")
    p.add_argument("--math-train",
                   help="local MATH train JSONL (fields problem, solution, [answer], [level])")
    p.add_argument("--math-test", help="local MATH test JSONL, e.g. MATH-500 (same fields)")
    p.add_argument("--limit-train", type=common.count, default=0,
                   help="gsm8k/math: keep only the first N train rows (0 = all)")
    p.add_argument("--limit-test", type=common.count, default=0,
                   help="gsm8k/math: keep only the first N test rows (0 = all)")
    return p.parse_args(argv)


def main(args):
    if args.source == "builtin":
        train, test = make_builtin_splits(args.n_train, args.n_test, args.seed)
        splits = {"train": train, "test": test}
    else:
        splits = convert_external(args)
    paths = {}
    for split in ("train", "test"):
        if split not in splits:
            continue
        rows = splits[split]
        paths[split] = os.path.join(args.out_dir, f"{args.source}_{split}.jsonl")
        common.write_jsonl_atomic(paths[split], rows)
        levels = Counter("none" if r["difficulty"] is None else r["difficulty"] for r in rows)
        per_level = "  ".join(f"{k}:{levels[k]}" for k in sorted(levels, key=str))
        print(f"{args.source} {split}: {len(rows)} problems -> {paths[split]}"
              f"  (difficulty {per_level or '-'}; {steps_distribution(rows)})")
    return paths


if __name__ == "__main__":
    common.run_cli(main, parse_args)
