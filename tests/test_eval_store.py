"""Run store, seeds, dataset resolution and the runner on the fake engine (fast)."""

from __future__ import annotations

import asyncio
import json

import pytest

from ttscale.engine.fake import FakeEngine
from ttscale.eval.data import KNOWN_SETS, extract, load_dataset
from ttscale.eval.runner import EvalRunner, RunConfig, problem_seed, sample_seed
from ttscale.eval.store import ConfigMismatch, RunStore, load_run

MANIFEST = {
    "dataset": "d",
    "dataset_fingerprint": "f",
    "model": "m",
    "verifier": None,
    "k": 4,
    "seed": 0,
    "sampling": {"temperature": 1.0},
}


def test_store_append_and_resume_tolerates_truncated_tail(tmp_path):
    st = RunStore(tmp_path)
    assert st.open(MANIFEST) == set()
    st.append({"id": "a", "samples": []})
    st.append({"id": "b", "samples": []})
    st.close()
    good = (tmp_path / "problems.jsonl").read_bytes()
    with open(tmp_path / "problems.jsonl", "ab") as f:  # a write cut short by a kill
        f.write(b'{"id": "c", "samp')
    st = RunStore(tmp_path)
    assert st.open(MANIFEST) == {"a", "b"}
    assert (tmp_path / "problems.jsonl").read_bytes() == good  # the partial line is gone
    st.append({"id": "c", "samples": []})
    st.close()
    _, recs = load_run(tmp_path)
    assert [r["id"] for r in recs] == ["a", "b", "c"]


def test_store_refuses_other_config_unless_forced(tmp_path):
    RunStore(tmp_path).open(MANIFEST)
    with pytest.raises(ConfigMismatch, match="k"):
        RunStore(tmp_path).open({**MANIFEST, "k": 8})
    st = RunStore(tmp_path)
    st.open({**MANIFEST, "k": 8}, force=True)
    st.close()
    assert st.read_manifest()["forced_from"] == {"k": 4}


def test_seeds_are_deterministic_and_distinct():
    assert sample_seed(0, "p1", 3) == problem_seed(0, "p1") + 3
    assert problem_seed(0, "p1") == problem_seed(0, "p1")
    assert problem_seed(0, "p1") != problem_seed(1, "p1") != problem_seed(0, "p2")
    assert 0 <= problem_seed(7, "x") < 2**30


def test_datasets_resolve():
    ds = load_dataset("arith500")
    assert len(ds.problems) == 500 and ds.has_levels
    sub = load_dataset("arith500", limit=10)
    assert len(sub.problems) == 10 and {p["level"] for p in sub.problems} == {1, 2, 3, 4, 5}
    assert "gsm8k" in KNOWN_SETS
    assert extract("so #### 1,234", "gsm8k") == "1234"
    assert extract("\\boxed{7}", "math") == "7"


def _write_set(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "problem": f"What is {i}?", "answer": str(i % 4)}) + "\n")


def _runner(tmp_path, data, **kw):
    cfg = RunConfig(dataset=str(data), model="fake", verifier="fake-v", k=6, concurrency=3, batch=4)
    pol = FakeEngine("fake", tick_s=kw.pop("tick", 0.0))
    ver = FakeEngine("fake-v", role="score")
    return EvalRunner(cfg, tmp_path / "run", policy=pol, verifier=ver, progress=False, **kw)


def test_runner_records_everything_and_resumes_after_cancel(tmp_path):
    data = tmp_path / "set.jsonl"
    _write_set(data, 20)

    # Uninterrupted reference run.
    ref = _runner(tmp_path / "ref", data)
    ref_summary = asyncio.run(ref.run())
    _, ref_recs = load_run(tmp_path / "ref" / "run")
    assert sorted(r["id"] for r in ref_recs) == sorted(f"q{i}" for i in range(20))
    r0 = ref_recs[0]
    assert len(r0["samples"]) == 6
    # K=6 in fan-outs of 4 and 2: six engine requests read the prompt ("user: What is i?\n", a
    # token a character); all but the first found its one full 16-token block in the prefix cache
    for r in ref_recs:
        assert 16 < r["prompt_tokens"] == len(f"user: What is {r['id'][1:]}?\n") < 32
        assert (r["prefill_tokens"], r["cached_prefill_tokens"]) == (6 * r["prompt_tokens"], 5 * 16)
    assert ref_summary["prefill_tokens"] == sum(r["prefill_tokens"] for r in ref_recs)
    assert ref_summary["cached_prefill_tokens"] == 20 * 5 * 16
    assert ref_summary["tokens"] == sum(s["tokens"] for r in ref_recs for s in r["samples"])
    assert {
        "answer",
        "correct",
        "tokens",
        "finish",
        "mean_logprob",
        "sum_logprob",
        "score",
        "latency_s",
        "text",
        "seed",
    } <= set(r0["samples"][0])

    # Cancelled midway, then resumed.
    async def interrupted():
        run = _runner(tmp_path, data, tick=0.002)
        task = asyncio.create_task(run.run())
        while (
            not (tmp_path / "run" / "problems.jsonl").exists()
            or len((tmp_path / "run" / "problems.jsonl").read_text().splitlines()) < 5
        ):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    before = (tmp_path / "run" / "problems.jsonl").read_text().splitlines()
    assert 5 <= len(before) < 20
    summary = asyncio.run(_runner(tmp_path, data).run())
    assert summary["resumed_with"] == len(before)
    after = (tmp_path / "run" / "problems.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    _, recs = load_run(tmp_path / "run")
    assert sorted(r["id"] for r in recs) == sorted(f"q{i}" for i in range(20))
    assert len(after) == 20
    # Same draws as the uninterrupted run (seeds depend on run seed, problem and index only).
    strip = lambda r: [(s["seed"], s["text"], s["score"]) for s in r["samples"]]  # noqa: E731
    ref_by = {r["id"]: strip(r) for r in ref_recs}
    assert all(strip(r) == ref_by[r["id"]] for r in recs)


def test_rescore_scores_the_recorded_samples_and_resumes(tmp_path):
    from ttscale.eval.runner import rescore

    data = tmp_path / "set.jsonl"
    _write_set(data, 8)
    src = tmp_path / "src"
    asyncio.run(_runner(src, data).run())
    _, src_recs = load_run(src / "run")

    # the verifier the run used reads the same inputs again: identical scores
    same = asyncio.run(rescore(src / "run", tmp_path / "same", "fake-v", engine=FakeEngine("fake-v", role="score")))
    assert same["rescored"] == 8 and same["samples"] == 8 * 6
    _, recs = load_run(tmp_path / "same")
    assert {r["id"]: r for r in recs} == {r["id"]: r for r in src_recs}

    # another verifier: only the scores change, and they are that verifier's on those texts
    other = FakeEngine("len", role="score", scorer=lambda text: len(text) / 1000)
    asyncio.run(rescore(src / "run", tmp_path / "other", "len", engine=other))
    manifest, recs = load_run(tmp_path / "other")
    assert manifest["verifier"] == "len" and manifest["rescored_from"] == str(src / "run")
    by = {r["id"]: r for r in src_recs}
    changed = 0
    for r in recs:
        old = by[r["id"]]["samples"]
        assert [{k: v for k, v in s.items() if k != "score"} for s in r["samples"]] == [
            {k: v for k, v in s.items() if k != "score"} for s in old
        ]
        changed += sum(a["score"] != b["score"] for a, b in zip(r["samples"], old))
        assert all(0 < s["score"] < 1 for s in r["samples"])
    assert changed > 0

    # resumable: a second call finds everything done
    again = asyncio.run(rescore(src / "run", tmp_path / "other", "len", engine=other))
    assert again["resumed_with"] == 8 and again["rescored"] == 0
    assert len((tmp_path / "other" / "problems.jsonl").read_text().splitlines()) == 8


def test_rescore_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from ttscale.eval.cli import app

    data = tmp_path / "set.jsonl"
    _write_set(data, 3)
    cfg = RunConfig(dataset=str(data), model="fake", k=2, keep_text=False)
    asyncio.run(EvalRunner(cfg, tmp_path / "notext", policy=FakeEngine("fake"), progress=False).run())
    runner = CliRunner()
    res = runner.invoke(app, ["rescore", str(tmp_path / "notext"), "--verifier", "v", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--no-text" in res.output
    res = runner.invoke(
        app, ["rescore", str(tmp_path / "notext"), "--verifier", "v", "--out", str(tmp_path / "notext")]
    )
    assert res.exit_code == 2 and "must differ" in res.output
    res = runner.invoke(app, ["rescore", str(tmp_path / "missing"), "--verifier", "v", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a run directory" in res.output
