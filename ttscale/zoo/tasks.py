"""Multi-step arithmetic word problems, deterministic from a seed.

Each problem is a short story about a quantity that changes a few times
("Ava has 37 shells. She buys 5 boxes with 24 shells in each. ...").  The
worked solution writes one arithmetic step per line and ends with
``\\boxed{N}``; all quantities are non-negative integers.

Five difficulty levels: more operations, larger operands and mixed operators
(groups of items are a multiplication inside an addition or subtraction) at
higher levels.

Records follow the schema of the shared datasets:
``{"id", "problem", "answer", "solution", "level", "source"}``.

The evaluation set ``arith500`` (100 problems per level) is generated from
:data:`EVAL_SEED`.  Training streams use other seeds and additionally drop
every problem whose *signature* (the sequence of numbers in its text,
independent of names and items) equals the signature of an evaluation
problem, so no rephrasing of an evaluation problem is ever trained on.

CLI::

    python -m ttscale.zoo.tasks eval --out eval/datasets/arith500.jsonl
    python -m ttscale.zoo.tasks generate --n 1000 --level 3 --seed 7 --out x.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

SOURCE = "ttscale-arith"
EVAL_SEED = 20240500
EVAL_PER_LEVEL = 100
LEVELS = (1, 2, 3, 4, 5)

_NAMES = [
    ("Ava", "She"),
    ("Ben", "He"),
    ("Cara", "She"),
    ("Dan", "He"),
    ("Eli", "He"),
    ("Fay", "She"),
    ("Gus", "He"),
    ("Hana", "She"),
    ("Ivan", "He"),
    ("Jo", "She"),
    ("Kai", "He"),
    ("Lena", "She"),
    ("Max", "He"),
    ("Nia", "She"),
    ("Omar", "He"),
    ("Pia", "She"),
    ("Raj", "He"),
    ("Sara", "She"),
    ("Tom", "He"),
    ("Uma", "She"),
]
_ITEMS = [
    "apples",
    "beads",
    "cards",
    "coins",
    "eggs",
    "pens",
    "shells",
    "stamps",
    "stickers",
    "marbles",
    "books",
    "nails",
    "seeds",
    "cups",
    "bricks",
    "tickets",
]
_CONTAINERS = ["boxes", "bags", "packs", "crates", "jars", "trays"]


@dataclass(frozen=True)
class LevelSpec:
    n_ops: int
    start: tuple[int, int]
    ops: tuple[str, ...]
    add: tuple[int, int]  # operand of + / -
    groups: tuple[int, int]  # number of groups k in k * m
    per_group: tuple[int, int]  # items per group m
    times: tuple[int, int]  # factor of "k times as many"
    cap: int  # largest intermediate value


SPECS: dict[int, LevelSpec] = {
    1: LevelSpec(1, (10, 99), ("add", "sub"), (2, 99), (2, 9), (2, 9), (2, 9), 999),
    2: LevelSpec(2, (10, 999), ("add", "sub", "times"), (10, 999), (2, 9), (2, 9), (2, 9), 9_999),
    3: LevelSpec(
        3,
        (100, 999),
        ("add", "sub", "add_groups", "sub_groups", "times", "divide"),
        (10, 999),
        (2, 9),
        (11, 99),
        (2, 9),
        99_999,
    ),
    4: LevelSpec(
        4,
        (100, 9_999),
        ("add", "sub", "add_groups", "sub_groups", "times", "divide"),
        (100, 9_999),
        (2, 9),
        (11, 999),
        (2, 9),
        99_999,
    ),
    5: LevelSpec(
        6,
        (1_000, 9_999),
        ("add", "sub", "add_groups", "sub_groups", "times", "divide"),
        (100, 9_999),
        (2, 9),
        (101, 999),
        (2, 9),
        999_999,
    ),
}


def _ri(rng: random.Random, lo_hi: tuple[int, int]) -> int:
    return rng.randint(lo_hi[0], lo_hi[1])


def _try_op(
    rng: random.Random, op: str, x: int, spec: LevelSpec, pron: str, item: str
) -> tuple[str, list[str], int] | None:
    """Return (sentence, step lines, new value) or None if the op does not fit."""
    cont = rng.choice(_CONTAINERS)
    if op == "add":
        b = _ri(rng, spec.add)
        y = x + b
        verb = rng.choice(["gets", "finds", "is given", "buys"])
        return f"{pron} {verb} {b} more.", [f"{x} + {b} = {y}"], y
    if op == "sub":
        b = _ri(rng, spec.add)
        if b > x:
            b = rng.randint(1, x) if x >= 1 else 0
        if b == 0:
            return None
        y = x - b
        verb = rng.choice(["gives away", "loses", "uses", "sells"])
        return f"{pron} {verb} {b}.", [f"{x} - {b} = {y}"], y
    if op in ("add_groups", "sub_groups"):
        k, m = _ri(rng, spec.groups), _ri(rng, spec.per_group)
        p = k * m
        if op == "add_groups":
            y = x + p
            return (f"{pron} buys {k} {cont} with {m} {item} in each.", [f"{k} * {m} = {p}", f"{x} + {p} = {y}"], y)
        if p > x:
            return None
        y = x - p
        return (f"{pron} packs {k} {cont} of {m} {item} and sells them.", [f"{k} * {m} = {p}", f"{x} - {p} = {y}"], y)
    if op == "times":
        k = _ri(rng, spec.times)
        y = x * k
        return f"Then {pron.lower()} has {k} times as many.", [f"{x} * {k} = {y}"], y
    if op == "divide":
        divs = [k for k in range(2, 13) if x % k == 0 and x // k >= 2]
        if not divs:
            return None
        k = rng.choice(divs)
        y = x // k
        return (f"{pron} splits them into {k} equal groups and keeps one group.", [f"{x} / {k} = {y}"], y)
    raise ValueError(op)


def generate_problem(rng: random.Random, level: int) -> dict[str, Any]:
    """One problem of ``level`` drawn from ``rng`` (without id)."""
    spec = SPECS[level]
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    x = _ri(rng, spec.start)
    sentences = [f"{name} has {x} {item}."]
    steps: list[str] = []
    used: list[str] = []
    while len(used) < spec.n_ops:
        # prefer operators not used yet so higher levels mix operators
        fresh = [o for o in spec.ops if o not in used] or list(spec.ops)
        op = rng.choice(fresh if rng.random() < 0.7 else list(spec.ops))
        res = _try_op(rng, op, x, spec, pron, item)
        if res is None:
            continue
        sent, lines, y = res
        if y > spec.cap or y < 0:
            continue
        sentences.append(sent)
        steps.extend(lines)
        used.append(op)
        x = y
    sentences.append(f"How many {item} does {name} have now?")
    answer = x
    solution = "\n".join([*steps, f"\\boxed{{{answer}}}"])
    return {
        "problem": " ".join(sentences),
        "answer": str(answer),
        "solution": solution,
        "level": level,
        "source": SOURCE,
    }


def generate(
    n: int, level: int, seed: int, prefix: str | None = None, exclude: frozenset[str] | set[str] | None = None
) -> list[dict[str, Any]]:
    """``n`` problems of ``level``, deterministic from ``seed``.

    Problems whose signature is in ``exclude`` are skipped.  Signatures are
    also de-duplicated within the call.
    """
    if level not in SPECS:
        raise ValueError(f"level must be one of {LEVELS}")
    rng = random.Random(f"{seed}:{level}")
    prefix = prefix or f"arith-s{seed}-L{level}"
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < n:
        rec = generate_problem(rng, level)
        sig = signature(rec["problem"])
        if sig in seen or (exclude is not None and sig in exclude):
            continue
        seen.add(sig)
        out.append({"id": f"{prefix}-{len(out):04d}", **rec})
    return out


_NUM = re.compile(r"\d+")


def signature(problem: str) -> str:
    """Name- and item-independent key of a problem: hash of its numbers in order."""
    nums = ",".join(_NUM.findall(problem))
    return hashlib.sha1(nums.encode()).hexdigest()[:16]


def eval_set(per_level: int = EVAL_PER_LEVEL, seed: int = EVAL_SEED) -> list[dict[str, Any]]:
    """The held-out evaluation set (``arith500`` with the defaults)."""
    out: list[dict[str, Any]] = []
    for level in LEVELS:
        out.extend(generate(per_level, level, seed, prefix=f"arith500-L{level}"))
    return out


@lru_cache(maxsize=1)
def eval_signatures() -> frozenset[str]:
    return frozenset(signature(r["problem"]) for r in eval_set())


def training_stream(
    seed: int, levels: tuple[int, ...] = LEVELS, weights: tuple[float, ...] | None = None
) -> Iterator[dict[str, Any]]:
    """Endless stream of training problems; never yields an ``arith500`` signature.

    ``seed`` must differ from :data:`EVAL_SEED`.
    """
    if seed == EVAL_SEED:
        raise ValueError("training seed must differ from the evaluation seed")
    excl = eval_signatures()
    rng = random.Random(f"train:{seed}")
    i = 0
    while True:
        level = rng.choices(levels, weights=weights)[0]
        rec = generate_problem(rng, level)
        if signature(rec["problem"]) in excl:
            continue
        yield {"id": f"train-s{seed}-{i}", **rec}
        i += 1


_BOXED = re.compile(r"\\boxed\{\s*(-?[\d,]+)\s*\}")


def extract_answer(text: str) -> int | None:
    """Integer in the last ``\\boxed{...}`` of ``text``, or None."""
    m = _BOXED.findall(text or "")
    if not m:
        return None
    try:
        return int(m[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: str | int) -> bool:
    got = extract_answer(text)
    return got is not None and got == int(answer)


def check_solution(rec: dict[str, Any]) -> bool:
    """True when every step line is arithmetically right and the box equals answer."""
    lines = rec["solution"].split("\n")
    for line in lines[:-1]:
        m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line)
        if not m:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        val = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[op]
        if val != c:
            return False
    return extract_answer(lines[-1]) == int(rec["answer"]) and lines[-1] == f"\\boxed{{{rec['answer']}}}"


def write_jsonl(records: list[dict[str, Any]], path: str | None) -> None:
    fh = open(path, "w") if path else sys.stdout  # noqa: SIM115 (stdout must not be closed)
    try:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        if path:
            fh.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttscale.zoo.tasks", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="write the arith500 evaluation set")
    e.add_argument("--out", default=None)
    e.add_argument("--per-level", type=int, default=EVAL_PER_LEVEL)
    g = sub.add_parser("generate", help="write training problems (eval signatures excluded)")
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--level", type=int, default=None, help="one level (default: mixed 1-5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "eval":
        write_jsonl(eval_set(a.per_level), a.out)
    else:
        if a.level is None:
            it = training_stream(a.seed)
            recs = [next(it) for _ in range(a.n)]
        else:
            recs = generate(a.n, a.level, a.seed, prefix=f"train-s{a.seed}-L{a.level}", exclude=eval_signatures())
        write_jsonl(recs, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
