"""An eval report's answer clustering (majority / RPC votes need every problem's samples grouped by
equivalent answer, math-verify deciding the non-numeric pairs): one problem at a time against the
problems at once over the math-verify workers, on the same real records, side by side.

    python bench/report_clustering.py [--run bench/results/eval-runs/qwen-math500-k64.tar.xz]
        [--limit 40] [--rounds 2] [--workers 2]

Each configuration runs in a fresh process (empty caches, new workers) that loads the first
``--limit`` problems of the run with ``ttscale.eval.analysis.load_problems``; the two alternate for
``--rounds`` rounds. Checks that both give the same clusters and writes
``bench/results/report_clustering.json`` (machine, versions, seconds per configuration, ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(run: str, limit: int) -> None:
    from ttscale.eval.analysis import load_problems
    from ttscale.eval.store import load_run

    _, records = load_run(Path(run))
    records = records[:limit]
    t0 = time.perf_counter()
    problems = load_problems(records)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "clusters": [p.clusters for p in problems]}))


def _run_dir(path: Path, tmp: str) -> Path:
    if path.is_dir():
        return path.resolve()
    with tarfile.open(path) as tar:
        tar.extractall(tmp, filter="data")
    (sub,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
    return sub


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "bench/results/eval-runs/qwen-math500-k64.tar.xz"))
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="math-verify workers of the parallel configuration")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.run, a.limit)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import versions

    configs = {"one problem at a time": "1", f"{a.workers} workers, problems at once": str(a.workers)}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    clusters: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_dir(Path(a.run), tmp)
        for r in range(a.rounds):
            for name, workers in configs.items():
                env = {**os.environ, "TTSCALE_SYMBOLIC_WORKERS": workers}
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "--run", str(run), "--limit", str(a.limit)],
                    env=env,
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                )
                if out.returncode:
                    sys.exit(f"{name}: exit {out.returncode}\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                seconds[name].append(res["seconds"])
                clusters.setdefault(name, res["clusters"])
                print(f"round {r + 1}: {name}: {res['seconds']:.1f} s", flush=True)
    same = len({json.dumps(c) for c in clusters.values()}) == 1
    base, par = (statistics.median(v) for v in seconds.values())
    result = {
        "bench": "report_clustering",
        "machine": versions(),
        "run": Path(a.run).name,
        "problems": a.limit,
        "rounds": a.rounds,
        "seconds": seconds,
        "median_s": dict(zip(configs, (base, par), strict=True)),
        "time_ratio_parallel_over_serial": par / base,
        "same_clusters": same,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps({k: result[k] for k in ("median_s", "time_ratio_parallel_over_serial", "same_clusters")}))
    out_path = ROOT / "bench/results/report_clustering.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        sys.exit("the two configurations clustered differently")


if __name__ == "__main__":
    main()
