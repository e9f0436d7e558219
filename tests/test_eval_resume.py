"""`ttscale eval run` against the real embedded policy: SIGKILL midway, resume, lose nothing;
a resume with another prompt format is refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import POLICY, VERIFIER

pytestmark = pytest.mark.vllm

N_PROBLEMS = 12
K = 4
# as typed on a command line: \n is a line break (the arith models read a system line and "Q: ...")
SYSTEM = "Work it out."
TEMPLATE = "{problem}\\nShow each step."


def _cmd(out: Path, template: str = TEMPLATE) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ttscale.cli",
        "eval",
        "run",
        "arith500",
        "--model",
        POLICY,
        "--limit",
        str(N_PROBLEMS),
        "-k",
        str(K),
        "--concurrency",
        "2",
        "--max-tokens",
        "256",
        "--system-prompt",
        SYSTEM,
        "--prompt-template",
        template,
        "--out",
        str(out),
        "--quiet",
        "--max-model-len",  # a vLLM engine option, recorded in the manifest
        "1024",
    ]


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_text()
    return data.split("\n")[:-1]  # complete lines only


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_kill_and_resume_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "run"
    records = out / "problems.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_cmd(out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while len(_lines(records)) < 3:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "no problems recorded in time"
                time.sleep(0.2)
        finally:
            _kill_group(proc)
    before = _lines(records)
    assert 3 <= len(before) < N_PROBLEMS, "the run finished before it could be killed"

    res = subprocess.run(_cmd(out), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed_with"] == len(before)
    assert summary["recorded"] == N_PROBLEMS - len(before)

    after = _lines(records)
    assert after[: len(before)] == before  # finished records unchanged, byte for byte
    ids = [json.loads(x)["id"] for x in after]
    assert len(ids) == len(set(ids)) == N_PROBLEMS  # every problem exactly once
    from ttscale.eval.data import load_dataset

    assert set(ids) == {p["id"] for p in load_dataset("arith500", limit=N_PROBLEMS).problems}
    for line in after:
        rec = json.loads(line)
        assert [s["i"] for s in rec["samples"]] == list(range(K))
        assert all(s["finish"] in ("stop", "length") for s in rec["samples"])
        assert rec["wall_s"] > 0 and rec["finished_at"] > 1.7e9  # when the engine had the problem
    from ttscale.eval.analysis import engine_seconds_per_token
    from ttscale.eval.store import load_run

    spt = engine_seconds_per_token(load_run(out)[1])  # the pause between the two runs falls out
    span = max(json.loads(x)["finished_at"] for x in after) - min(
        json.loads(x)["finished_at"] - json.loads(x)["wall_s"] for x in after
    )
    tokens = sum(s["tokens"] for x in after for s in json.loads(x)["samples"])
    assert spt is not None and 0 < spt * tokens <= span
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["prompt"] == {"system": "Work it out.", "template": "{problem}\nShow each step."}
    assert manifest["engine"] == {"max_model_len": 1024}

    # another template for the same run directory: refused before any engine starts, nothing written
    res = subprocess.run(_cmd(out, template="boxed"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "another prompt" in res.stderr and "would mix samples" in res.stderr
    assert _lines(records) == after


def test_rescore_with_the_real_verifier_matches_the_run(tmp_path):
    """`eval rescore` reads the recorded samples as `eval run --verifier` does: same scores."""
    src, out = tmp_path / "src", tmp_path / "rescored"
    run = [
        sys.executable,
        "-m",
        "ttscale.cli",
        "eval",
        "run",
        "arith500",
        "--model",
        POLICY,
        "--verifier",
        VERIFIER,
        "--limit",
        "3",
        "-k",
        "3",
        "--max-tokens",
        "256",
        "--out",
        str(src),
        "--quiet",
    ]
    res = subprocess.run(run, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(
        [sys.executable, "-m", "ttscale.cli", "eval", "rescore", str(src), "--verifier", VERIFIER, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["samples"] == 9
    from ttscale.eval.store import load_run

    _, a = load_run(src)
    _, b = load_run(out)
    a_by = {r["id"]: r for r in a}
    assert len(b) == 3
    for r in b:
        for s, t in zip(r["samples"], a_by[r["id"]]["samples"]):
            assert s["text"] == t["text"] and s["correct"] == t["correct"]
            assert abs(s["score"] - t["score"]) < 2e-2
