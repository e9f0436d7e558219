"""The built wheel holds what the installed package needs at run time: the embedded models, the
evaluation sets (with their licence notes) and the budget profiles; `ttscale eval run gsm8k` works
from it with no repository and no data directory around."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETS = ("arith500", "math500", "aime24", "aime25", "amc23", "gsm8k")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
        cwd=out,
    )
    (whl,) = out.glob("ttscale-*.whl")
    return whl


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_holds_models_sets_and_profiles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for s in SETS:
        assert f"ttscale/eval/datasets/{s}.jsonl" in names
    assert "ttscale/eval/datasets/README.md" in names
    for m in ("ttscale-arith", "ttscale-arith-verifier", "ttscale-arith-draft"):
        assert f"ttscale/models/{m}/model.safetensors" in names
    assert any(n.startswith("ttscale/profiles/") and n.endswith(".json") for n in names)
    assert not any(n.startswith(("server/", "eval/", "tests/", "bench/")) for n in names)


def _run(unpacked: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TTSCALE_DATA_DIR"}
    env["PYTHONPATH"] = str(unpacked)  # ahead of the development install
    return subprocess.run(
        [sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_sets_load_by_name_from_the_installed_package(unpacked, tmp_path):
    code = (
        "import json, ttscale.eval.data as d\n"
        "print(json.dumps({n: [len(d.load_dataset(n).problems), str(d.load_dataset(n).source)] "
        f"for n in {SETS!r}}}))"
    )
    r = _run(unpacked, tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert {n: v[0] for n, v in got.items()} == {
        "arith500": 500,
        "math500": 500,
        "aime24": 30,
        "aime25": 30,
        "amc23": 40,
        "gsm8k": 1319,
    }
    assert all(v[1].startswith(str(unpacked)) for v in got.values()), got  # not the repository's copies


@pytest.mark.vllm
def test_eval_run_gsm8k_from_the_wheel(unpacked, tmp_path):
    r = _run(
        unpacked,
        tmp_path,
        "-m",
        "ttscale.cli",
        "eval",
        "run",
        "gsm8k",
        "--limit",
        "5",
        "-k",
        "2",
        "--max-tokens",
        "48",
        "-m",
        "ttscale-arith",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
    )
    assert r.returncode == 0, (r.stdout[-1000:], r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["problems"] == 5, summary
    records = [json.loads(line) for line in (tmp_path / "run" / "problems.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(rec["samples"]) == 2 for rec in records)
