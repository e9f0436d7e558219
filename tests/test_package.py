"""Packaging: the library stays light, and a wheel installs no generic top-level modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_imports_without_server_or_vllm():
    code = (
        "import sys, ttscale, ttscale.engine, ttscale.strategies, ttscale.budget, ttscale.models, "
        "ttscale.zoo; bad = [m for m in ('vllm', 'torch', 'fastapi', 'ttscale.server', 'transformers') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_library_never_imports_the_server():
    import re

    pat = re.compile(r"^\s*(from ttscale\.server|import ttscale\.server)", re.M)
    # the CLI's `serve` command is the one place that starts the server
    offenders = [str(p) for p in (ROOT / "ttscale").rglob("*.py") if pat.search(p.read_text()) and p.name != "cli.py"]
    assert offenders == []


def test_wheel_layout(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("ttscale-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert not {"server", "eval", "tests", "bench"} & tops, tops
    assert "ttscale/server/app.py" in names and "ttscale/eval/__init__.py" in names
    assert "ttscale/eval/datasets/arith500.jsonl" in names
    for model in ("ttscale-arith", "ttscale-arith-draft", "ttscale-arith-verifier"):
        if (ROOT / "ttscale" / "models" / model / "config.json").exists():
            for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
                assert f"ttscale/models/{model}/{f}" in names
