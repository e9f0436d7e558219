"""Analysis, budget profile and report on a synthetic run (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.eval import metrics as M
from ttscale.eval.analysis import analyse_run, budgets, engine_seconds_per_token, fit_half, summary_lines
from ttscale.eval.fit import FitResult
from ttscale.eval.report import dataset_label, model_label, write_report
from ttscale.eval.store import RunStore, load_run

K = 16


PROMPT = {"system": "Be exact.", "template": "{problem}\n\nPut the answer in \\boxed{}."}


def _synthetic_run(path, n_problems=60, seed=0, levels=True, prompt=None, finished=None, edit=None):
    """Problem i has single-sample accuracy r_i; wrong answers spread over 3 distractors;
    the verifier scores correct samples higher on average. The last sample of every fourth
    problem states no answer (a long text; cut at max_tokens in every eighth problem)."""
    rng = np.random.default_rng(seed)
    st = RunStore(path)
    manifest = {
        "dataset": "synth",
        "dataset_fingerprint": "x",
        "model": "toy",
        "verifier": "toy-v",
        "k": K,
        "seed": seed,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64},
        "n_problems": n_problems,
    }
    st.open(manifest if prompt is None else {**manifest, "prompt": prompt})
    for i in range(n_problems):
        level = 1 + i % 5
        r = float(np.clip(rng.beta(6 - level, level), 0.0, 1.0))
        samples = []
        for j in range(K):
            ok = rng.random() < r
            ans = "42" if ok else str(rng.integers(0, 3))
            score = float(np.clip(rng.normal(0.7 if ok else 0.4, 0.15), 0, 1))
            samples.append(
                {
                    "i": j,
                    "seed": j,
                    "text": f"t{ans}{j % 3}",
                    "answer": ans,
                    "correct": ok,
                    "tokens": int(rng.integers(20, 40)),
                    "finish": "stop",
                    "mean_logprob": float(-rng.random() * (0.2 if ok else 0.6)),
                    "sum_logprob": -1.0,
                    "score": score,
                    "latency_s": float(rng.random()),
                }
            )
        if i % 4 == 0:
            cut = "length" if i % 8 == 0 else "stop"
            samples[-1].update(answer=None, correct=False, text=f"p{i} " + "x" * 1000 + " END", finish=cut)
        if edit is not None:  # edit(i, samples): change problem i's samples in place
            edit(i, samples)
        rec = {"id": f"p{i}", "gold": "42", "prompt_tokens": 30, "wall_s": 1.0, "samples": samples}
        if finished is not None:  # finished(i) -> (finished_at, wall_s)
            rec["finished_at"], rec["wall_s"] = finished(i)
        if levels:
            rec["level"] = level
        st.append(rec)
    st.close()


def test_budgets():
    assert budgets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert budgets(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("levels", [True, False])
def test_analysis_profile_and_report(tmp_path, levels):
    _synthetic_run(tmp_path / "run", levels=levels, prompt=PROMPT if levels else None)
    an = analyse_run(tmp_path / "run", n_boot=100, rpc_draws=4)
    g = an.global_
    # Estimators agree with the metrics module on the raw data.
    cov_K = np.mean([M.pass_at_k(p.n, int(p.correct.sum()), K) for p in an.probs])
    assert g.points["coverage"]["mean"][-1] == pytest.approx(cov_K)
    assert g.points["coverage"]["mean"][0] == pytest.approx(np.mean([p.correct.mean() for p in an.probs]))
    assert all(lo <= m <= hi for m, lo, hi in zip(*(g.points["majority"][x] for x in ("mean", "lo", "hi"))))
    assert set(g.points) == {"coverage", "majority", "verifier_best_of", "weighted", "rpc", "logprob_best_of"}
    # best-of-k by mean log-prob: at k = 1 a random sample, at k = K the likeliest sample (here the
    # correct ones are the likelier: it beats pass@1)
    lpb = g.points["logprob_best_of"]["mean"]
    assert lpb[0] == pytest.approx(g.points["coverage"]["mean"][0])
    lp_ans = [np.where(p.answered, p.mean_lp, -np.inf) for p in an.probs]
    top = [float(p.correct[lp == lp.max()].mean()) for p, lp in zip(an.probs, lp_ans)]
    assert lpb[-1] == pytest.approx(np.mean(top)) and lpb[-1] > lpb[0] + 0.05
    assert g.curves["coverage"].fittable and g.curves["coverage"].r2 > 0.95

    prof = json.loads(json.dumps(an.profile(), allow_nan=False))
    assert prof["version"] == 1 and prof["k_max"] == K and prof["model"] == "toy"
    assert prof["bucket_by"] == ("level" if levels else "pass1_quantile")
    assert len(prof["buckets"]) == 5
    for b in [*prof["buckets"], prof["global"]]:
        assert {"name", "pass1", "curves", "points", "recommended"} <= set(b)
        assert set(b["curves"]) == {"coverage", "majority", "verifier_best_of"}
        assert b["points"]["k"] == budgets(K)
        fit = FitResult.from_dict(b["curves"]["coverage"])
        if fit.fittable:
            assert 0 <= float(fit.predict(4)) <= 1
        for sel in ("majority", "verifier_best_of"):  # asymptotes bounded, with their interval and flags
            f = FitResult.from_dict(b["curves"][sel])
            assert 0 <= f.params["A_inf"] <= 1 and 0 <= f.params["A_1"] <= 1
            assert f.ci["A_inf"][0] <= f.params["A_inf"] <= f.ci["A_inf"][1] and isinstance(
                b["curves"][sel]["issues"], list
            )
        assert b["recommended"]["strategy"] in ("majority", "verifier_best_of")
        assert 1 <= b["recommended"]["k"] <= K
    assert set(prof["global"]["flaws"]) == {"completeness", "soundness", "ceiling", "optimal_k"}
    # the prompt format the curves were measured with (a run without one: the problem alone)
    assert prof["prompt"] == (PROMPT if levels else {"system": None, "template": "{problem}"})
    if not levels:  # quantile bins: easiest first
        p1 = [b["pass1"] for b in prof["buckets"]]
        assert p1 == sorted(p1, reverse=True)

    paths = write_report(an, tmp_path / "rep", command="ttscale eval report run")
    page = Path(paths["html"]).read_text()
    assert page.count("data:image/png;base64,") >= 5 and 'src="figures/' not in page
    md = Path(paths["markdown"]).read_text()
    for section in (
        "## Accuracy",
        "## Scaling curves",
        "## Coverage vs selected",
        "## Verifier",
        "## Saturation point",
        "## Tokens, latency",
        "## Recommended budget",
        "## Answer extraction",
    ):
        assert section in md
    assert "| curve | model | parameters (± s.e.) | R² | RMSE | 95% CI of A∞ | asymptote |" in md
    vf = g.curves["verifier_best_of"]
    lo, hi = vf.ci["A_inf"]
    trust = "trustworthy" if vf.trusted else "not trustworthy: " + "; ".join(vf.issues)
    assert f"| [{lo:.3f}, {hi:.3f}] | {trust} |" in md
    if levels:
        assert '| system prompt | "Be exact." |' in md
        assert '| prompt template | "{problem}\\n\\nPut the answer in \\\\boxed{}." |' in md
    else:
        assert "| system prompt | none |" in md and '| prompt template | "{problem}" (preset plain) |' in md
    assert (tmp_path / "rep" / "figures" / "curves.png").stat().st_size > 1000
    assert "| dataset | synth (unknown source, fingerprint x) |" in md and str(tmp_path) not in md


def test_the_dataset_is_named_without_this_machines_paths():
    home = "/home/someone/sets"
    packaged = {"dataset": "math500", "dataset_source": f"{home}/ttscale/eval/datasets/math500.jsonl"}
    assert (
        dataset_label({**packaged, "dataset_fingerprint": "ab12"})
        == "math500 (packaged with ttscale, fingerprint ab12)"
    )
    own = dataset_label({"dataset": "mine", "dataset_source": f"{home}/mine.jsonl", "dataset_fingerprint": "cd"})
    assert own == "mine (file mine.jsonl, fingerprint cd)" and home not in own
    hf = dataset_label({"dataset": "hf:HuggingFaceH4/MATH-500", "dataset_source": "hf:HuggingFaceH4/MATH-500"})
    assert hf == "hf:HuggingFaceH4/MATH-500"


def test_the_model_is_named_without_this_machines_paths():
    assert model_label("qwen=/tmp/gpu/models/qwen2.5-1.5b/") == "qwen (model directory qwen2.5-1.5b)"
    assert model_label("/srv/models/llama") == "llama"
    assert model_label("arith") == "arith"
    assert model_label("big=http://10.0.0.2:8000/v1") == "big=http://10.0.0.2:8000/v1"
    assert model_label(None) is None


def test_extraction_failures_are_counted_and_shown(tmp_path):
    _synthetic_run(tmp_path / "run", n_problems=40)
    an = analyse_run(tmp_path / "run", n_boot=20, rpc_draws=0)
    ex = an.extraction
    # problems 0, 4, ..., 36 (10) have one answerless sample; 0, 8, ..., 32 (5) were cut at max_tokens
    assert (ex["samples"], ex["answerless"], ex["answerless_cut_at_max_tokens"]) == (640, 10, 5)
    assert ex["rate"] == 10 / 640 and ex["problems_with_answerless"] == 10
    # level 1 + i % 5: two of those ten problems on each level
    assert ex["by_level"] == {lv: {"answerless": 2, "samples": 128, "rate": 2 / 128} for lv in range(1, 6)}
    assert [(e["id"], e["i"], e["finish"]) for e in ex["examples"]] == [
        ("p0", K - 1, "length"),
        ("p4", K - 1, "stop"),
        ("p8", K - 1, "length"),
        ("p12", K - 1, "stop"),
        ("p16", K - 1, "length"),
    ]
    text = ex["examples"][1]["text"]
    assert text.startswith("p4 xxx") and text.endswith("x END") and "[…" in text and len(text) < 700
    paths = write_report(an, tmp_path / "rep")
    md = Path(paths["markdown"]).read_text()
    assert "| 640 | 10 | 1.56% | 5 | 10 |" in md
    assert "p4, sample 15 (finish stop, " in md
    assert "no answer extracted: 10 of 640 samples (1.6%), 5 of them cut at max_tokens" in "\n".join(summary_lines(an))


def test_fit_half_is_a_deterministic_hash_split():
    ids = [f"p{i}" for i in range(12)]
    # blake2b(b"p0", digest_size=8) ends in 0xf4 (even: fit half), blake2b(b"p1") in 0x91 (odd: held out)
    assert fit_half(ids).tolist() == [True, False, True, False, True, True, False, False, True, True, True, False]
    assert fit_half(ids[::-1]).tolist() == fit_half(ids).tolist()[::-1]  # the id alone decides


@pytest.mark.parametrize("levels", [True, False])
def test_holdout_check_plans_on_one_half_and_realises_on_the_other(tmp_path, levels):
    _synthetic_run(tmp_path / "run", n_problems=80, levels=levels)
    an = analyse_run(tmp_path / "run", n_boot=50, rpc_draws=0)
    ho = an.holdout
    half = fit_half([p.id for p in an.probs])
    assert (ho["n_fit"], ho["n_heldout"]) == (int(half.sum()), int((~half).sum()))
    # the plans are exactly what a report of the fit half alone recommends
    manifest, records = load_run(tmp_path / "run")
    st = RunStore(tmp_path / "fit-half")
    st.open(manifest)
    for r, f in zip(records, half):
        if f:
            st.append(r)
    st.close()
    alone = analyse_run(tmp_path / "fit-half", n_boot=50, rpc_draws=0)
    assert [b["name"] for b in ho["buckets"]] == [b.name for b in alone.buckets]
    for row, b in zip(ho["buckets"], alone.buckets):
        assert row["n_fit"] == b.idx.size
        assert (row["strategy"], row["k"]) == (b.recommended["strategy"], b.recommended["k"])
        # the same fit (sums in another order)
        assert row["predicted"] == pytest.approx(b.recommended["expected_accuracy"], abs=1e-6)
    # realised: that strategy at that k on the held-out problems of the bucket
    held = [p for p, f in zip(an.probs, half) if not f]
    if levels:
        placed = {f"level {lv}": [p for p in held if p.level == lv] for lv in range(1, 6)}
    else:
        centres = {b.name: b.pass1.mean() for b in alone.buckets}
        placed = {name: [] for name in centres}
        for p in held:
            placed[min(centres, key=lambda n: abs(centres[n] - p.correct.mean()))].append(p)
    n_all = 0
    for row in ho["buckets"]:
        ps = placed[row["name"]]
        assert row["n_heldout"] == len(ps) > 0
        if row["strategy"] == "majority":
            want = [M.majority_at_k(p.clusters, p.correct, row["k"], seed=0) for p in ps]
        else:
            want = [float(M.best_of_k(p.scores, p.correct, np.array([row["k"]]))[0]) for p in ps]
        assert row["realised"] == pytest.approx(np.mean(want), abs=1e-12)
        assert row["realised_lo"] <= row["realised"] <= row["realised_hi"]
        assert row["difference"] == pytest.approx(row["realised"] - row["predicted"], abs=1e-12)
        n_all += len(ps)
    assert ho["all"]["n_heldout"] == n_all == ho["n_heldout"]
    md = Path(write_report(an, tmp_path / "rep")["markdown"]).read_text()
    assert "### Held-out check of the recommendations" in md
    r0 = ho["buckets"][0]
    assert f"| {r0['name']} | {r0['n_fit']} | {r0['n_heldout']} | {r0['strategy']} | {r0['k']} | " in md


def test_cli_fit_and_report(tmp_path):
    from ttscale.eval.cli import app

    _synthetic_run(tmp_path / "run", n_problems=30)
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "run"), "--n-boot", "50", "--rpc-draws", "1"])
    assert r.exit_code == 0, r.output
    assert "coverage" in r.output and (tmp_path / "run" / "fit.json").is_file()
    r = CliRunner().invoke(
        app,
        [
            "report",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "rep"),
            "--profile",
            str(tmp_path / "p.json"),
            "--n-boot",
            "50",
            "--rpc-draws",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 1


def test_cli_import_is_light():
    import subprocess
    import sys

    code = "import sys, ttscale.eval.cli; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_engine_seconds_are_the_union_of_in_flight_times_over_tokens():
    def rec(end, wall, tokens):
        return {"finished_at": end, "wall_s": wall, "samples": [{"tokens": t} for t in tokens]}

    # [0, 2] and [1, 3] overlap (3 s busy), then a pause (a resumed run), then [10, 11]: 4 s for 100 tokens
    recs = [rec(2.0, 2.0, [10, 20]), rec(3.0, 2.0, [30]), rec(11.0, 1.0, [40])]
    assert engine_seconds_per_token(recs) == pytest.approx(4.0 / 100)
    assert engine_seconds_per_token(list(reversed(recs))) == pytest.approx(4.0 / 100)
    assert engine_seconds_per_token([rec(5.0, 1.0, [10]), {"wall_s": 1.0, "samples": []}]) is None  # older record
    assert engine_seconds_per_token([rec(5.0, 1.0, [0])]) is None


def test_gpu_seconds_per_target_from_the_runs_measured_rate(tmp_path):
    # 40 problems, two at a time for 1 s each: 20 s of engine time
    _synthetic_run(tmp_path / "run", n_problems=40, finished=lambda i: (100.0 + i // 2 + 1, 1.0))
    an = analyse_run(tmp_path / "run", n_boot=50, rpc_draws=2)
    _, records = load_run(tmp_path / "run")
    tokens = sum(x["tokens"] for r in records for x in r["samples"])
    assert an.engine_s_per_token == pytest.approx(20.0 / tokens)
    rows = [r for tr in an.targets.values() for r in tr if r["k"] is not None]
    assert rows
    for r in rows:
        assert r["gpu_s"] == pytest.approx(r["k"] * an.tokens_per_sample * 20.0 / tokens)
    assert an.profile()["engine_s_per_token"] == pytest.approx(20.0 / tokens)
    md = Path(write_report(an, tmp_path / "rep", command="x")["markdown"]).read_text()
    assert "GPU-s / problem" in md and f"{tokens / 20.0:.0f} generated tokens/s" in md
    assert f"| {rows[0]['gpu_s']:.3f} |" in md
    # a run without finishing times: no GPU-s, and the report says why
    _synthetic_run(tmp_path / "old", n_problems=40)
    old = analyse_run(tmp_path / "old", n_boot=50, rpc_draws=2)
    assert old.engine_s_per_token is None and old.profile()["engine_s_per_token"] is None
    md = Path(write_report(old, tmp_path / "rep-old", command="x")["markdown"]).read_text()
    assert "GPU-s need a run recorded with the problems' finishing times" in md


def test_logprob_best_of_ranks_answerless_samples_and_ones_without_log_probs_last():
    from itertools import combinations

    from ttscale.eval.analysis import Problem, per_problem_values

    # sample 0 has no tokens (no mean log-prob, no answer), sample 3 is the likeliest but states no answer
    lp = [np.nan, -0.1, -0.5, -0.01]
    correct = [False, False, True, False]
    answered = [False, True, True, False]
    p = Problem(
        id="p",
        level=None,
        subject=None,
        correct=np.array(correct),
        clusters=[None, "b", "a", None],
        scores=None,
        mean_lp=np.array(lp),
        tokens=np.array([0, 10, 10, 10]),
        latency=np.zeros(4),
        texts=None,
        prompt_tokens=5,
        answered=np.array(answered),
    )
    got = per_problem_values([p], [1, 2, 3, 4], rpc_draws=0)["logprob_best_of"][0]

    def pick(sub):  # answered with a log-prob first, then by log-prob
        return max(sub, key=lambda i: (answered[i] and not np.isnan(lp[i]), -9 if np.isnan(lp[i]) else lp[i]))

    want = [np.mean([correct[pick(c)] for c in combinations(range(4), k)]) for k in (1, 2, 3, 4)]
    assert got.tolist() == pytest.approx(want)
    assert want[1] == pytest.approx(2 / 6)  # pairs won: {0,2} by 2, {2,3} by 2 (3 has no answer)


def test_engine_options_are_recorded_as_json_values():
    import enum

    from ttscale.eval.runner import _jsonable

    class Mode(enum.Enum):
        FAST = "fast"

    got = _jsonable({"max_model_len": 1024, "mode": Mode.FAST, "nested": {"modes": [Mode.FAST, 2]}})
    assert got == {"max_model_len": 1024, "mode": "Mode.FAST", "nested": {"modes": ["Mode.FAST", 2]}}
    json.dumps(got)


def _record(i, answers):
    return {
        "id": f"q{i}",
        "prompt_tokens": 10,
        "samples": [
            {"answer": a, "correct": False, "tokens": 5, "finish": "stop", "mean_logprob": -0.1} for a in answers
        ],
    }


def test_problems_are_clustered_at_once_over_the_workers_in_record_order(monkeypatch):
    import threading

    import ttscale.answers as answers_mod
    from ttscale.eval.analysis import load_problems

    sets = [
        ["7", "\\sqrt{8}", "x^2-1", "2\\sqrt{2}", "(x-1)(x+1)", "7.0", "x^2+1"],
        ["1/2", "0.5", "\\frac{1}{2}", None, "3"],
        ["1/3", "0.33", "0.5", "2", "-2"],
        [None, None],
        ["(x-1)(x+1)", "x^2-1", "9"],
    ]
    expected = [answers_mod.cluster_answers(a) for a in sets]
    # the first two problems must be clustered at the same time: each waits for the other
    both = threading.Barrier(2, timeout=60)
    calls = []
    real = answers_mod.cluster_answers

    def spy(answers):
        with lock:
            calls.append(answers)
            first_two = len(calls) <= 2
        if first_two:
            both.wait()
        return real(answers)

    lock = threading.Lock()
    monkeypatch.setenv("TTSCALE_SYMBOLIC_WORKERS", "2")
    monkeypatch.setattr(answers_mod, "cluster_answers", spy)
    probs = load_problems([_record(i, a) for i, a in enumerate(sets)])
    assert [p.id for p in probs] == [f"q{i}" for i in range(len(sets))]
    assert [p.clusters for p in probs] == expected
    assert len(calls) == len(sets)

    # no workers: one problem after the other in the calling thread, the same clusters
    monkeypatch.setenv("TTSCALE_SYMBOLIC_WORKERS", "0")
    monkeypatch.setattr(answers_mod, "cluster_answers", real)
    assert [p.clusters for p in load_problems([_record(i, a) for i, a in enumerate(sets)])] == expected


def test_a_cluster_graded_both_ways_is_split_into_its_correct_and_wrong_part():
    from ttscale.eval.analysis import split_by_correctness

    assert split_by_correctness([0, 1, None, 1], [True, False, False, False], ["a", "b", None, "b"]) == (
        [0, 1, None, 1],
        [],
    )
    got = split_by_correctness([0, 0, 1, None, 0, 2], [False, True, True, False, True, False], list("xyz-yw"))
    assert got == ([0, 1, 2, None, 1, 3], [["x", "y"]])


def test_answers_merged_through_a_percentage_vote_apart_when_graded_apart():
    """math-verify takes 50\\% for 0.5 and for 50, so clustering (closed transitively) puts all
    three in one cluster, while grading against the gold 50 marks 0.5 wrong (GSM8K test 1159)."""
    from ttscale.answers import cluster_answers, grade
    from ttscale.eval.analysis import load_problems

    answers = ["50\\%", "0.5", "0.5", "50", "0.5"]
    assert len(set(cluster_answers(answers))) == 1
    correct = [grade(a, "50") for a in answers]
    assert correct == [True, False, False, True, False]
    rec = {
        "id": "q",
        "prompt_tokens": 10,
        "samples": [
            {"answer": a, "correct": ok, "tokens": 5, "finish": "stop", "mean_logprob": -0.1}
            for a, ok in zip(answers, correct, strict=True)
        ],
    }
    (p,) = load_problems([rec])
    assert p.clusters == [0, 1, 1, 0, 1]
    assert p.split == [["0.5", "50", "50\\%"]]
    # three wrong votes for 0.5 against two for 50: the vote is wrong at k = 5
    assert M.majority_at_k(p.clusters, p.correct, 5) == 0.0
    assert M.majority_at_k(p.clusters, p.correct, 1) == pytest.approx(0.4)


def test_split_clusters_are_listed_in_the_report(tmp_path):
    def edit(i, samples):
        if i == 3:  # "1/2" and "0.5" cluster together; the record grades them apart
            for j, x in enumerate(samples):
                x.update(answer="1/2" if j < 6 else "0.5", correct=j < 6)

    _synthetic_run(tmp_path / "run", n_problems=24, edit=edit)
    an = analyse_run(tmp_path / "run", n_boot=20, rpc_draws=0)
    assert an.extraction["split_clusters"] == [{"id": "p3", "answers": ["0.5", "1/2"]}]
    md = Path(write_report(an, tmp_path / "rep")["markdown"]).read_text()
    assert "Answer clusters split (1, in 1 problem)" in md
    assert "| p3 | 0.5, 1/2 |" in md
