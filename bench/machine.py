"""The machine and versions a bench result was measured with (every result file names them)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def versions() -> dict:
    """Python, CPU count, and where installed vLLM, torch and the GPU's name."""
    out: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
        import vllm

        out.update(vllm=vllm.__version__, torch=torch.__version__)
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # informative only
        pass
    return out


def fanout_args(doc: str | None, *, k: int, max_tokens: int, rounds: int, name: str) -> argparse.ArgumentParser:
    """The options of the benches that time fan-outs of streamed candidates with top-k log-probs
    on one engine (``logprob_path.py``, ``gc_pauses.py``); ``name``: the result file's stem."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ttscale-arith", help="a model name or directory (default: the embedded)")
    ap.add_argument("--k", type=int, default=k, help="candidates of a fan-out")
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--top", type=int, default=20, help="top log-probs per token")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--prompt", default="What is 17 + 25?")
    ap.add_argument("--out", help=f"result JSON (default: bench/results/{name}-<cpu|gpu>.json)")
    return ap


def write_fanout_result(a: argparse.Namespace, bench: str, name: str, rows: list[dict], **extra: object) -> None:
    """The result JSON of a :func:`fanout_args` bench: its setup, ``extra``, ``rows`` and the machine,
    to ``--out`` or ``bench/results/<name>-<cpu|gpu>.json``."""
    machine = versions()
    out = {
        "bench": bench,
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
        "model": a.model,
        "k": a.k,
        "max_tokens": a.max_tokens,
        "top_logprobs": a.top,
        **extra,
        "rounds": a.rounds,
        "rows": rows,
        "machine": machine,
    }
    kind = "gpu" if machine.get("gpu") else "cpu"
    dest = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"{name}-{kind}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
