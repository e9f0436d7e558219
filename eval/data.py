"""Evaluation problems: named sets, JSONL files, Hugging Face datasets; grading of answers.

A problem is a dict with at least ``id``, ``problem`` and ``answer`` (the common schema of the
shared data directory); ``level`` and ``subject`` are used for per-group metrics when present.

Names resolve as follows:

* ``arith500``, ``math500``, ``aime24``, ``aime25``, ``amc23``, ``gsm8k``: the sets packaged with
  ttscale (``ttscale/eval/datasets/<name>.jsonl``; sources and licences in the README there), or
  ``<data dir>/<name>.jsonl`` when a data directory is given (``--data-dir`` or
  ``$TTSCALE_DATA_DIR``);
* a path ending in ``.jsonl`` / ``.json``: that file;
* ``hf:OWNER/NAME[:SPLIT]`` (or any other ``OWNER/NAME``): a Hugging Face dataset, loaded with
  ``datasets`` (``pip install ttscale[hf]``); the problem / answer columns are guessed from
  common names or given with ``--hf-problem-field`` / ``--hf-answer-field``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DATASETS = Path(__file__).resolve().parent / "datasets"
SHARED_SETS = ("math500", "aime24", "aime25", "amc23", "gsm8k")
PACKAGED = {name: _DATASETS / f"{name}.jsonl" for name in ("arith500", *SHARED_SETS)}
KNOWN_SETS = tuple(PACKAGED)

_PROBLEM_FIELDS = ("problem", "question", "prompt", "input", "Problem", "Question")
_ANSWER_FIELDS = ("answer", "final_answer", "solution", "target", "Answer", "output")


@dataclass
class Dataset:
    name: str
    source: str  # file path or hf id
    problems: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "math"  # "math" or "gsm8k" (numeric answers, '####' fallback)

    @property
    def has_levels(self) -> bool:
        return bool(self.problems) and all(p.get("level") is not None for p in self.problems)

    def fingerprint(self) -> str:
        """Hash of the problem ids, statements and answers (what a run's records depend on)."""
        h = hashlib.sha256()
        for p in self.problems:
            h.update(json.dumps([p["id"], p["problem"], p["answer"]], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


def default_data_dir() -> Path | None:
    """``$TTSCALE_DATA_DIR``, if set: a directory of ``<name>.jsonl`` files that replace the
    packaged sets of those names."""
    env = os.environ.get("TTSCALE_DATA_DIR")
    return Path(env).expanduser() if env else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".json":
            data = json.load(f)
            return list(data if isinstance(data, list) else data.get("data", []))
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _normalise(
    rows: list[dict[str, Any]], name: str, problem_field: str | None = None, answer_field: str | None = None
) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for i, r in enumerate(rows):
        pf = problem_field or next((f for f in _PROBLEM_FIELDS if f in r), None)
        af = answer_field or next((f for f in _ANSWER_FIELDS if f in r), None)
        if pf is None or af is None:
            raise ValueError(f"{name}: row {i} has no problem/answer field (keys: {sorted(r)})")
        ans = r[af]
        if af != "answer" and isinstance(ans, str) and "####" in ans:  # raw GSM8K solutions
            ans = ans.rsplit("####", 1)[1].strip().replace(",", "")
        pid = str(r.get("id", r.get("unique_id", f"{name}-{i}")))
        if pid in seen:
            pid = f"{pid}#{i}"
        seen.add(pid)
        p = {"id": pid, "problem": str(r[pf]), "answer": str(ans)}
        for k in ("level", "subject"):
            if r.get(k) is not None:
                p[k] = r[k]
        out.append(p)
    return out


def load_dataset(
    spec: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    hf_problem_field: str | None = None,
    hf_answer_field: str | None = None,
) -> Dataset:
    """Resolve ``spec`` (name, JSONL path or Hugging Face id) to a :class:`Dataset`."""
    path: Path | None = None
    name = spec
    if spec in PACKAGED:
        base = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if base is not None:
            if not (base / f"{spec}.jsonl").is_file():
                raise FileNotFoundError(f"dataset {spec!r}: no {spec}.jsonl in the data directory {base}")
            path = base / f"{spec}.jsonl"
        else:
            path = PACKAGED[spec]
    elif spec.endswith((".jsonl", ".json")) or Path(spec).is_file():
        path = Path(spec).expanduser()
        name = path.stem
    if path is not None:
        rows = _normalise(read_jsonl(path), name)
        source = str(path)
    else:
        rows, source = _load_hf(spec, hf_problem_field, hf_answer_field)
        name = source
    if limit is not None:
        rows = _spread(rows, limit)
    kind = "gsm8k" if "gsm8k" in name.lower() else "math"
    return Dataset(name=name, source=source, problems=rows, kind=kind)


def _spread(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """``limit`` problems spread evenly over the set (so every level is represented)."""
    if limit >= len(rows):
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def _load_hf(spec: str, pf: str | None, af: str | None) -> tuple[list[dict[str, Any]], str]:
    ident = spec.removeprefix("hf:")
    repo, _, split = ident.partition(":")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional extra
        raise ImportError("Hugging Face datasets need `pip install ttscale[hf]`") from e
    ds = datasets.load_dataset(repo, split=split or "test")
    rows = [dict(r) for r in ds]
    return _normalise(rows, repo.replace("/", "_"), pf, af), f"hf:{repo}:{split or 'test'}"


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------

_GSM_RE = re.compile(r"####\s*(-?[$0-9.,]+)")
_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract(text: str | None, kind: str = "math") -> str | None:
    """The final answer of a completion: the last ``\\boxed{}`` (or the spec's fallbacks);
    for GSM8K-style sets also ``#### N`` and, failing all, the last number."""
    from ttscale.answers import extract_answer

    ans = extract_answer(text)
    if ans is not None or kind != "gsm8k" or not text:
        return ans
    m: list[str] = _GSM_RE.findall(text)
    if m:
        return m[-1].replace(",", "").replace("$", "").rstrip(".")
    nums: list[str] = _NUM_RE.findall(text)
    return nums[-1].replace(",", "") if nums else None


def grade(answer: str | None, gold: str) -> bool:
    """Gold-first Math-Verify with the standard MATH normalisation as fallback (integers as
    integers); see :func:`ttscale.answers.grade`."""
    from ttscale.answers import grade as _grade

    return bool(answer is not None and _grade(answer, gold))
