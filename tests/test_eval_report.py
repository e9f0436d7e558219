"""Analysis, budget profile and report on a synthetic run (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.eval import metrics as M
from ttscale.eval.analysis import analyse_run, budgets
from ttscale.eval.fit import FitResult
from ttscale.eval.report import write_report
from ttscale.eval.store import RunStore

K = 16


def _synthetic_run(path, n_problems=60, seed=0, levels=True):
    """Problem i has single-sample accuracy r_i; wrong answers spread over 3 distractors;
    the verifier scores correct samples higher on average."""
    rng = np.random.default_rng(seed)
    st = RunStore(path)
    st.open(
        {
            "dataset": "synth",
            "dataset_fingerprint": "x",
            "model": "toy",
            "verifier": "toy-v",
            "k": K,
            "seed": seed,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64},
            "n_problems": n_problems,
        }
    )
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
        rec = {"id": f"p{i}", "gold": "42", "prompt_tokens": 30, "wall_s": 1.0, "samples": samples}
        if levels:
            rec["level"] = level
        st.append(rec)
    st.close()


def test_budgets():
    assert budgets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert budgets(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("levels", [True, False])
def test_analysis_profile_and_report(tmp_path, levels):
    _synthetic_run(tmp_path / "run", levels=levels)
    an = analyse_run(tmp_path / "run", n_boot=100, rpc_draws=4)
    g = an.global_
    # Estimators agree with the metrics module on the raw data.
    cov_K = np.mean([M.pass_at_k(p.n, int(p.correct.sum()), K) for p in an.probs])
    assert g.points["coverage"]["mean"][-1] == pytest.approx(cov_K)
    assert g.points["coverage"]["mean"][0] == pytest.approx(np.mean([p.correct.mean() for p in an.probs]))
    assert all(lo <= m <= hi for m, lo, hi in zip(*(g.points["majority"][x] for x in ("mean", "lo", "hi"))))
    assert set(g.points) == {"coverage", "majority", "verifier_best_of", "weighted", "rpc"}
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
        assert b["recommended"]["strategy"] in ("majority", "verifier_best_of")
        assert 1 <= b["recommended"]["k"] <= K
    assert set(prof["global"]["flaws"]) == {"completeness", "soundness", "ceiling", "optimal_k"}
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
    ):
        assert section in md
    assert (tmp_path / "rep" / "figures" / "curves.png").stat().st_size > 1000


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
