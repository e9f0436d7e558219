"""Measure the embedded models on arith500 with vLLM.

    python -m ttscale.zoo.measure --out measure.json

Policy: ``n`` samples per problem (default 64) at T=0.8 from the chat-template
prompt; pass@1 / pass@k (unbiased estimator), majority@n (plurality of the
extracted answers, answerless samples do not vote, ties broken by the
smallest answer).  Draft: ``--draft-n`` samples per problem, pass@1.
Verifier: scores every policy sample (P(correct) from ``LLM.classify``);
AUROC over all samples, best-of-16 (the top-scored sample of each disjoint
group of 16, averaged) and the false-positive rate at threshold 0.5.

Each engine runs in its own subprocess so that its memory is released.
On CPU set ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default here 4).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttscale.zoo import tasks
from ttscale.zoo import tokenizer as T


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(x) for x in fh if x.strip()]


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers: list[int | None]) -> int | None:
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return min(a for a, v in votes.items() if v == top)


def auroc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    from ttscale.zoo.train import auroc as _auroc  # numpy only

    return _auroc(scores, labels)


def engine_kwargs(dtype: str, max_len: int = 1024) -> dict[str, Any]:
    return dict(dtype=dtype, max_model_len=max_len, gpu_memory_utilization=0.5, enforce_eager=True)


# ----------------------------------------------------------------------------- stages (subprocess)


def stage_generate(model: str, data: str, n: int, seed: int, dtype: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    recs = load_jsonl(data)
    llm = LLM(model=model, seed=seed, **engine_kwargs(dtype))
    sp = SamplingParams(
        n=n, temperature=0.8, top_p=1.0, top_k=-1, max_tokens=320
    )  # engine-level seed (per-request seeds fail on vLLM CPU)
    outs = llm.generate([T.format_prompt(r["problem"]) for r in recs], sp)
    with open(out, "w") as fh:
        for r, o in zip(recs, outs):
            fh.write(
                json.dumps(
                    {
                        "id": r["id"],
                        "level": r["level"],
                        "answer": r["answer"],
                        "completions": [c.text for c in o.outputs],
                    }
                )
                + "\n"
            )


def stage_classify(model: str, data: str, samples: str, dtype: str, out: str) -> None:
    from vllm import LLM

    probs = {r["id"]: r["problem"] for r in load_jsonl(data)}
    rows = load_jsonl(samples)
    texts = [T.format_scored(probs[r["id"]], c) for r in rows for c in r["completions"]]
    llm = LLM(model=model, runner="pooling", **engine_kwargs(dtype))
    res = llm.classify(texts)
    scores = [float(x.outputs.probs[0]) for x in res]
    Path(out).write_text(json.dumps(scores))


def stage_generate_hf(model: str, data: str, n: int, seed: int, out: str) -> None:
    """Same samples through transformers ``generate`` (for a GPU machine without vLLM)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttscale.zoo.train import sample

    recs = load_jsonl(data)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev)  # type: ignore[arg-type]  # transformers' stubs: .to(str)
    comps = sample(m, [T.format_prompt(r["problem"]) for r in recs], n, temperature=0.8, max_new_tokens=320, seed=seed)
    with open(out, "w") as fh:
        for r, cs in zip(recs, comps):
            fh.write(json.dumps({"id": r["id"], "level": r["level"], "answer": r["answer"], "completions": cs}) + "\n")


def stage_classify_hf(model: str, data: str, samples: str, out: str) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    probs = {r["id"]: r["problem"] for r in load_jsonl(data)}
    rows = load_jsonl(samples)
    texts = [T.format_scored(probs[r["id"]], c) for r in rows for c in r["completions"]]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).to(dev).eval()
    scores: list[float] = []
    with torch.no_grad():
        for s in range(0, len(texts), 512):
            enc = [T.encode(t) for t in texts[s : s + 512]]
            L = max(map(len, enc))
            ids = torch.full((len(enc), L), T.PAD_ID, dtype=torch.long)
            for j, e in enumerate(enc):
                ids[j, : len(e)] = torch.tensor(e)
            ids = ids.to(dev)
            scores += torch.sigmoid(m(input_ids=ids, attention_mask=(ids != T.PAD_ID).long()).logits[:, 0]).tolist()
    Path(out).write_text(json.dumps(scores))


def _run_stage(args: list[str]) -> None:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    subprocess.run([sys.executable, "-m", "ttscale.zoo.measure", "_stage", *args], check=True, env=env)


# ----------------------------------------------------------------------------- metrics


def policy_metrics(rows: list[dict[str, Any]], ks: Sequence[int] = (1, 4, 16, 64)) -> dict[str, Any]:
    per: dict[Any, Any] = {}
    for r in rows:
        cs = r["completions"]
        n = len(cs)
        ans = [tasks.extract_answer(c) for c in cs]
        gold = int(r["answer"])
        c = sum(a == gold for a in ans)
        d = per.setdefault(f"L{r['level']}", {"n_problems": 0})
        d["n_problems"] += 1
        for k in ks:
            if k <= n:
                d[f"pass@{k}"] = d.get(f"pass@{k}", 0.0) + pass_at_k(n, c, k)
        d[f"maj@{n}"] = d.get(f"maj@{n}", 0.0) + (majority(ans) == gold)
        d["no_answer"] = d.get("no_answer", 0.0) + sum(a is None for a in ans) / n
    res = {}
    for L, d in sorted(per.items()):
        m = d.pop("n_problems")
        res[L] = {k: v / m for k, v in d.items()}
        res[L]["n_problems"] = m
    keys = [k for k in res[next(iter(res))] if k != "n_problems"]
    tot = sum(res[L]["n_problems"] for L in per)
    res["all"] = {k: sum(res[L][k] * res[L]["n_problems"] for L in per) / tot for k in keys}
    res["all"]["n_problems"] = tot
    return res


def verifier_metrics(
    rows: list[dict[str, Any]], scores: list[float], group: int = 16, threshold: float = 0.5
) -> dict[str, Any]:
    labels, flat_by_row, i = [], [], 0
    for r in rows:
        gold = int(r["answer"])
        ls = [tasks.extract_answer(c) == gold for c in r["completions"]]
        labels += ls
        flat_by_row.append(list(zip(scores[i : i + len(ls)], ls)))
        i += len(ls)
    bo, n_groups, p1 = 0.0, 0, 0.0
    per_level: dict[Any, Any] = {}
    for r, pairs in zip(rows, flat_by_row):
        for g in range(0, len(pairs) - group + 1, group):
            grp = pairs[g : g + group]
            top = max(s for s, _ in grp)
            tied = [ok for s, ok in grp if s == top]
            acc = sum(tied) / len(tied)  # expected accuracy under random tie-breaking
            bo += acc
            n_groups += 1
            lv = per_level.setdefault(f"L{r['level']}", [0.0, 0])
            lv[0] += acc
            lv[1] += 1
        p1 += sum(ok for _, ok in pairs) / len(pairs)
    neg = [s for s, y in zip(scores, labels) if not y]
    pos = [s for s, y in zip(scores, labels) if y]
    return {
        "auroc": auroc(scores, labels),
        f"best_of_{group}": bo / max(1, n_groups),
        f"best_of_{group}_per_level": {L: v[0] / v[1] for L, v in sorted(per_level.items())},
        "policy_pass@1": p1 / len(rows),
        "threshold": threshold,
        "fpr": sum(s >= threshold for s in neg) / max(1, len(neg)),
        "tpr": sum(s >= threshold for s in pos) / max(1, len(pos)),
        "precision": (
            sum(s >= threshold for s in pos)
            / max(1, sum(s >= threshold for s in pos) + sum(s >= threshold for s in neg))
        ),
        "n_samples": len(scores),
    }


def targets(res: dict[str, Any]) -> dict[str, Any]:
    p, t = res.get("policy"), {}
    if p:
        a = p["all"]
        n = max(int(k.split("@")[1]) for k in a if k.startswith("maj@"))
        t["policy pass@1 in [0.35, 0.65]"] = 0.35 <= a["pass@1"] <= 0.65
        t["policy L1 pass@1 >= 0.85"] = p["L1"]["pass@1"] >= 0.85
        t["policy L5 pass@1 <= 0.25"] = p["L5"]["pass@1"] <= 0.25
        if "pass@64" in a:
            t["policy pass@64 >= 0.90"] = a["pass@64"] >= 0.90
        t[f"policy maj@{n} >= pass@1 + 0.10"] = a[f"maj@{n}"] >= a["pass@1"] + 0.10
    d = res.get("draft")
    if p and d:
        t["draft pass@1 <= policy pass@1 - 0.10"] = d["all"]["pass@1"] <= p["all"]["pass@1"] - 0.10
    v = res.get("verifier")
    if v:
        t["verifier AUROC >= 0.80"] = v["auroc"] >= 0.80
        t["verifier best-of-16 >= pass@1 + 0.10"] = v["best_of_16"] >= v["policy_pass@1"] + 0.10
        t["verifier FPR@0.5 > 0"] = v["fpr"] > 0
    return t


def print_table(res: dict[str, Any]) -> None:
    p = res.get("policy")
    if p:
        cols = [k for k in p["all"] if k != "n_problems"]
        print(f"\npolicy ({res['config']['policy']}) on {res['config']['data']}:")
        print("level  " + "  ".join(f"{c:>9}" for c in cols))
        for L in [k for k in p if k != "all"] + ["all"]:
            print(f"{L:<6} " + "  ".join(f"{p[L][c]:9.3f}" for c in cols))
    d = res.get("draft")
    if d:
        print(
            "\ndraft pass@1 per level: "
            + ", ".join(f"{L} {d[L]['pass@1']:.3f}" for L in d if L != "all")
            + f"; all {d['all']['pass@1']:.3f}"
        )
    v = res.get("verifier")
    if v:
        print(
            f"\nverifier: AUROC {v['auroc']:.3f}  best-of-16 {v['best_of_16']:.3f} "
            f"(policy pass@1 {v['policy_pass@1']:.3f})  FPR@0.5 {v['fpr']:.3f}  TPR@0.5 {v['tpr']:.3f}"
        )
    print("\ntargets:")
    for k, ok in targets(res).items():
        print(f"  [{'x' if ok else ' '}] {k}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_stage":
        kind, rest = argv[1], argv[2:]
        if kind == "generate_hf":
            stage_generate_hf(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[5])
        elif kind == "classify_hf":
            stage_classify_hf(rest[0], rest[1], rest[2], rest[4])
        elif kind == "generate":
            stage_generate(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4], rest[5])
        else:
            stage_classify(rest[0], rest[1], rest[2], rest[3], rest[4])
        return 0
    from ttscale.models import resolve_model

    ap = argparse.ArgumentParser(prog="python -m ttscale.zoo.measure", description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="ttscale-arith")
    ap.add_argument("--draft", default="ttscale-arith-draft")
    ap.add_argument("--verifier", default="ttscale-arith-verifier")
    ap.add_argument(
        "--data",
        default=None,
        help="problems (JSONL); default: arith500, the embedded models' held-out set (tasks.eval_set)",
    )
    ap.add_argument("--n", type=int, default=64, help="policy samples per problem")
    ap.add_argument("--draft-n", type=int, default=16, help="draft samples per problem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--backend",
        choices=["vllm", "transformers"],
        default="vllm",
        help="vllm (default) or transformers generate (e.g. on a GPU machine without vLLM)",
    )
    ap.add_argument("--only", default="policy,draft,verifier")
    ap.add_argument("--work", default=None, help="directory for samples (default: temporary)")
    ap.add_argument("--out", default="measure.json")
    a = ap.parse_args(argv)
    only = set(a.only.split(","))
    work = Path(a.work or tempfile.mkdtemp(prefix="ttscale-measure-"))
    work.mkdir(parents=True, exist_ok=True)
    data_name = a.data or "arith500 (ttscale.zoo.tasks.eval_set)"
    if a.data is None:
        a.data = str(work / "arith500.jsonl")
        tasks.write_jsonl(tasks.eval_set(), a.data)
    res: dict[str, Any] = {
        "config": {
            "policy": a.policy,
            "draft": a.draft,
            "verifier": a.verifier,
            "data": data_name,
            "n": a.n,
            "draft_n": a.draft_n,
            "temperature": 0.8,
            "seed": a.seed,
            "dtype": a.dtype,
        }
    }
    gen, cls = ("generate", "classify") if a.backend == "vllm" else ("generate_hf", "classify_hf")
    res["config"]["backend"] = a.backend
    pol_samples = work / "policy_samples.jsonl"
    if "policy" in only or "verifier" in only:
        if not pol_samples.exists():
            _run_stage([gen, str(resolve_model(a.policy)), a.data, str(a.n), str(a.seed), a.dtype, str(pol_samples)])
        rows = load_jsonl(pol_samples)
        res["policy"] = policy_metrics(rows)
    if "draft" in only:
        ds = work / "draft_samples.jsonl"
        if not ds.exists():
            _run_stage([gen, str(resolve_model(a.draft)), a.data, str(a.draft_n), str(a.seed), a.dtype, str(ds)])
        res["draft"] = policy_metrics(load_jsonl(ds), ks=(1, 4, 16))
    if "verifier" in only:
        sc = work / "verifier_scores.json"
        if not sc.exists():
            _run_stage([cls, str(resolve_model(a.verifier)), a.data, str(pol_samples), a.dtype, str(sc)])
        res["verifier"] = verifier_metrics(load_jsonl(pol_samples), json.loads(sc.read_text()))
    res["targets"] = targets(res)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"\nwrote {a.out} (samples under {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
