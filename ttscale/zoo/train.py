"""Training of the embedded models with plain PyTorch + transformers.

Commands (seeded; GPU recommended, CPU works slowly)::

    python -m ttscale.zoo.train policy   --seed 0 --out DIR [--steps N]
    python -m ttscale.zoo.train draft    --seed 0 --out DIR [--steps N]
    python -m ttscale.zoo.train sample   --model POLICY_DIR --seed 0 --out samples.jsonl
    python -m ttscale.zoo.train verifier --seed 0 --init POLICY_DIR --samples samples.jsonl --out DIR

Policy and draft are ``LlamaForCausalLM`` trained on freshly generated
problems (``ttscale.zoo.tasks.training_stream``; arith500 and the dev set
are excluded by signature), rendered with the chat template, with the loss on
the solution and EOS only.  The learning rate is constant after warm-up, so a
run stopped at step N equals a run asked for N steps.

The verifier is ``LlamaForSequenceClassification`` (one logit) initialised
from the policy's body and trained with BCE on the policy's own samples
(T=0.8 on training problems, never on arith500), labelled by the
correctness of the final answer.  Half of the training inputs are truncated
prefixes of a sample, labelled with the sample's final correctness, so the
verifier also scores partial solutions.  Optional terms: ``--pairwise W``, a
Bradley-Terry loss between distinct right and wrong samples of one problem
(so that the score ranks the samples of a problem, not only problems by
difficulty), and ``--step-aux W``, a dense BCE of the same score head at
every line end on whether all ``a op b = c`` steps so far are right (checked
in Python), which teaches the model to check each step it reads; with
``--digit-aux`` the same label is also given at every digit of every result.
``--synthetic F`` draws a share F of each batch from fresh training problems
with simulated per-digit slips (unlimited right and wrong solutions of the
same kind the policy produces); ``--extra-layers N --freeze-body`` adds N new
layers on a frozen copy of the policy.  A verifier that checks digits needs those
layers: the policy's expectation of a digit sits in its last layer at the position
*before* the digit, so only a later layer can compare it with the digit written.
``--prev-token-heads H`` starts H heads of the first new layer attending to the
previous position, and ``--expect-aux W`` adds a training-only loss on the digit that
belongs at each result digit; with both, the new layers learn the comparison (the
shipped verifier's recipe).

Slips (``--noise``, ``--noise-unit``): the policy learns to make occasional
independent arithmetic slips from training solutions that contain them (later
steps compute consistently from the slipped value).  ``step``: one digit of a
step's result with probability q; ``digit``: every digit of every result with
probability q, so long computations (high levels) fail more often; ``size``:
as ``digit`` with a rate that grows with the result's length.  ``--floor-div``: a
slip upstream of an inexact division is kept and the division floored (otherwise the
solution falls back to its clean version, which spares long division chains).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from ttscale.zoo import tasks
from ttscale.zoo import tokenizer as T

DEV_SEED = 777_001  # model-selection set (not arith500)
DEV_PER_LEVEL = 40
VERIFIER_DATA_SEED_OFFSET = 10_000

ARCHS = {
    # name: (layers, hidden, intermediate, heads, kv_heads)
    "policy": (4, 256, 704, 8, 8),
    "draft": (2, 128, 352, 4, 4),
}
DEFAULT_STEPS = {"policy": 6000, "draft": 2500}
MAX_POSITIONS = 2048


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------- data


def dev_set(per_level: int = DEV_PER_LEVEL) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for L in tasks.LEVELS:
        out += tasks.generate(per_level, L, DEV_SEED, prefix=f"dev-L{L}", exclude=tasks.eval_signatures())
    return out


_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _slip(c: int, q: float, unit: str, rng: random.Random) -> int:
    ds = list(str(c))

    def other(i: int) -> str:
        return rng.choice([d for d in "0123456789" if d != ds[i] and not (i == 0 and d == "0" and len(ds) > 1)])

    if unit in ("digit", "size"):
        # every digit of the result slips independently: long results are harder; with
        # "size" the per-digit rate also grows with the result's length (q for 3 digits)
        qd = q * (1 + 0.15 * max(0, len(ds) - 3)) if unit == "size" else q
        for i in range(len(ds)):
            if rng.random() < qd:
                ds[i] = other(i)
    elif rng.random() < q:
        i = rng.randrange(len(ds))
        ds[i] = other(i)
    return int("".join(ds))


def noisy_solution(solution: str, q: float, rng: random.Random, unit: str = "step", floor_div: bool = False) -> str:
    """Simulated slips; later steps compute consistently from the wrong value.

    ``unit="step"``: each step's result has, with probability ``q``, one digit
    replaced.  ``unit="digit"``: each digit of each result is replaced with
    probability ``q`` (so a step's error rate grows with the size of its result,
    and a sampled solution's with the number of digits it writes).  ``unit="size"``:
    as "digit" with the per-digit rate ``q * (1 + 0.15 * max(0, digits - 3))``.

    Returns the clean solution when a slip would make a later step invalid
    (negative result, division by zero, or an inexact division unless
    ``floor_div``, which writes the floored quotient instead, as a careless
    solver would).
    """
    if q <= 0:
        return solution
    lines = solution.split("\n")
    sub: dict[int, int] = {}
    out = []
    for line in lines[:-1]:
        m = _STEP.fullmatch(line)
        if not m:
            return solution
        a, op, b = int(m[1]), m[2], int(m[3])
        a, b = sub.get(a, a), sub.get(b, b)
        if op == "+":
            c = a + b
        elif op == "-":
            c = a - b
        elif op == "*":
            c = a * b
        else:
            if b == 0 or (a % b and not floor_div):
                return solution
            c = a // b
        if c < 0:
            return solution
        true_c = int(m[4])
        c = _slip(c, q, unit, rng)
        if c != true_c:
            sub[true_c] = c
        out.append(f"{a} {op} {b} = {c}")
    boxed = re.search(r"\{(\d+)\}", lines[-1])
    assert boxed is not None, "a solution ends with its boxed answer"
    final = sub.get(int(boxed[1]))
    ans = out[-1].rsplit(" ", 1)[1] if out else None
    if final is None and ans is None:
        return solution
    return "\n".join([*out, f"\\boxed{{{ans}}}"])


def _stream_examples(
    seed: int, noise: float = 0.0, unit: str = "step", floor_div: bool = False
) -> Iterator[tuple[list[int], list[int]]]:
    """Endless (input_ids, labels) for causal-LM training; excludes eval and dev."""
    dev = frozenset(tasks.signature(r["problem"]) for r in dev_set())
    rng = random.Random(f"noise:{seed}")
    for rec in tasks.training_stream(seed):
        if tasks.signature(rec["problem"]) in dev:
            continue
        p = T.encode(T.format_prompt(rec["problem"]))
        sol = noisy_solution(rec["solution"], noise, rng, unit, floor_div) if noise > 0 else rec["solution"]
        s = [*T.encode(sol), T.EOS_ID]
        yield p + s, [-100] * len(p) + s


def _make_loader(
    seed: int, batch: int, workers: int, noise: float = 0.0, unit: str = "step", floor_div: bool = False
) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class DS(IterableDataset[tuple[list[int], list[int]]]):
        def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
            wi = get_worker_info()
            wid = wi.id if wi is not None else 0
            torch.set_num_threads(1)
            return _stream_examples(seed * 1000 + wid + 1, noise, unit, floor_div)

    def collate(items: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = max(len(x) for x, _ in items)
        ids = torch.full((len(items), n), T.PAD_ID, dtype=torch.long)
        lab = torch.full((len(items), n), -100, dtype=torch.long)
        att = torch.zeros((len(items), n), dtype=torch.long)
        for i, (x, y) in enumerate(items):
            ids[i, : len(x)] = torch.tensor(x)
            lab[i, : len(y)] = torch.tensor(y)
            att[i, : len(x)] = 1
        return ids, lab, att

    # collate turns the examples into tensor batches (torch types a loader by its dataset's items)
    batches = DataLoader(
        DS(),
        batch_size=batch,
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=8 if workers else None,
        persistent_workers=bool(workers),
    )
    return cast("Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]", batches)


# ----------------------------------------------------------------------------- models


def llama_config(arch: Sequence[int], classifier: bool = False, attention_bias: bool = False) -> LlamaConfig:
    from transformers import LlamaConfig

    layers, hidden, inter, heads, kv = arch
    cfg = LlamaConfig(
        vocab_size=T.VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        # transformers 5 takes rope_theta through **kwargs (into rope_parameters); 4.x names it
        rope_theta=10000.0,  # type: ignore[call-arg]
        tie_word_embeddings=not classifier,
        bos_token_id=T.BOS_ID,
        eos_token_id=T.EOS_ID,
        pad_token_id=T.PAD_ID,
        attention_bias=attention_bias,
        mlp_bias=False,
    )
    if classifier:
        cfg.num_labels = 1
        # one logit trained with BCE: transformers uses BCEWithLogits for this problem type
        # and vLLM's classify applies a sigmoid, returning P(correct)
        cfg.problem_type = "multi_label_classification"
    return cfg


def arch_of(c: PreTrainedConfig) -> tuple[int, int, int, int, int]:
    """(layers, hidden, intermediate, heads, kv_heads) of a Llama config."""
    return (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: PreTrainedModel, out: str | os.PathLike[str], card_extra: dict[str, Any] | None = None) -> None:
    """save_pretrained in bfloat16 + tokenizer files."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to mistypes the bound call
    m.config.use_cache = True
    m.save_pretrained(str(out), safe_serialization=True)
    gc = out / "generation_config.json"
    if gc.exists():  # keep only token ids: no sampling defaults that servers would pick up
        g = json.loads(gc.read_text())
        keep = {k: g[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version") if k in g}
        gc.write_text(json.dumps(keep, indent=2) + "\n")
    T.save_tokenizer(out)
    if card_extra:
        (out / "training_info.json").write_text(json.dumps(card_extra, indent=2) + "\n")


# ----------------------------------------------------------------------------- sampling


def sample(
    model: LlamaForCausalLM,
    prompts: list[str],
    n: int,
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    batch: int = 2048,
    seed: int = 0,
) -> list[list[str]]:
    """n samples per prompt with HF generate (left padding); returns decoded completions."""
    import torch

    dev = next(model.parameters()).device
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    out: list[list[str]] = [[] for _ in prompts]
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    torch.manual_seed(seed)
    model.eval()
    for s in range(0, len(flat), batch):
        chunk = flat[s : s + batch]
        enc = [T.encode(p) for _, p in chunk]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), T.PAD_ID, dtype=torch.long)
        att = torch.zeros((len(enc), L), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, L - len(e) :] = torch.tensor(e)
            att[j, L - len(e) :] = 1
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            gen = model.generate(  # type: ignore[misc]  # transformers types generate's self as a protocol its models miss
                input_ids=ids.to(dev),
                attention_mask=att.to(dev),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=None,
                top_p=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=T.PAD_ID,
                eos_token_id=T.EOS_ID,
            )
        for (i, _), row in zip(chunk, gen[:, L:].tolist()):
            if T.EOS_ID in row:
                row = row[: row.index(T.EOS_ID)]
            out[i].append(T.decode(row))
    return out


def evaluate(
    model: LlamaForCausalLM, records: list[dict[str, Any]], n: int = 16, seed: int = 0
) -> dict[str, dict[str, float]]:
    """pass@1 / pass@n / maj@n per level at T=0.8."""
    from collections import Counter

    comps = sample(model, [T.format_prompt(r["problem"]) for r in records], n, seed=seed)
    per: dict[int, list[float]] = {}
    for r, cs in zip(records, comps):
        ans = [tasks.extract_answer(c) for c in cs]
        c = sum(a == int(r["answer"]) for a in ans)
        votes = Counter(a for a in ans if a is not None)
        maj = votes.most_common(1)[0][0] if votes else None
        d = per.setdefault(r["level"], [0.0, 0.0, 0.0, 0])
        d[0] += c / n
        d[1] += c > 0
        d[2] += maj == int(r["answer"])
        d[3] += 1
    res = {
        f"L{L}": {"pass1": v[0] / v[3], f"pass{n}": v[1] / v[3], f"maj{n}": v[2] / v[3]} for L, v in sorted(per.items())
    }
    for k in ("pass1", f"pass{n}", f"maj{n}"):
        res.setdefault("all", {})[k] = sum(res[f"L{L}"][k] for L in per) / len(per)
    return res


# ----------------------------------------------------------------------------- causal LM


def train_lm(kind: str, a: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch: tuple[int, ...] = ARCHS[kind]
    if a.arch:
        arch = tuple(int(x) for x in a.arch.split(","))
    if a.init:
        # continue training: a model directory or a --ckpt-dir checkpoint (its arch wins)
        init = Path(a.init)
        if init.is_dir():
            model = LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32)
        else:
            meta = json.loads((init.parent / "history.json").read_text())
            model = LlamaForCausalLM(llama_config(tuple(meta["arch"])))
            model.load_state_dict({k: v.float() for k, v in torch.load(str(init), map_location="cpu").items()})
        arch = arch_of(model.config)
        model.to(dev)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to mistypes the bound call
    else:
        model = LlamaForCausalLM(llama_config(arch)).to(dev)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to mistypes the bound call
    log(f"{kind}: arch={arch} params={n_params(model):,} device={dev} init={a.init}")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.1)
    warm = a.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    loader = _make_loader(a.seed, a.batch, a.workers, a.noise, a.noise_unit, a.floor_div)
    dev_recs = dev_set()
    t0 = time.time()
    history = []
    step = 0
    model.train()
    for ids, lab, att in loader:
        ids, lab, att = ids.to(dev, non_blocking=True), lab.to(dev, non_blocking=True), att.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            # right padding under a causal mask: no real token sees a pad, so no attention
            # mask is needed and SDPA takes its fused causal kernel (same loss, far less memory)
            loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 200 == 0:
            log(f"{kind} step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
        done = step >= a.steps or (a.max_minutes and time.time() - t0 > 60 * a.max_minutes)
        if a.eval_every and (step % a.eval_every == 0 or done):
            res = evaluate(model, dev_recs, n=a.eval_n, seed=a.seed)
            model.train()
            history.append({"step": step, "time_s": round(time.time() - t0, 1), **res})
            log(
                f"{kind} EVAL step {step}: "
                + json.dumps({k: {m: round(x, 3) for m, x in v.items()} for k, v in res.items()})
            )
            if a.ckpt_dir:
                Path(a.ckpt_dir).mkdir(parents=True, exist_ok=True)
                torch.save(
                    {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()},
                    str(Path(a.ckpt_dir) / f"step{step}.pt"),
                )
                (Path(a.ckpt_dir) / "history.json").write_text(
                    json.dumps(
                        {
                            "kind": kind,
                            "arch": list(arch),
                            "lr": a.lr,
                            "noise": a.noise,
                            "noise_unit": a.noise_unit,
                            "floor_div": a.floor_div,
                            "init": a.init,
                            "batch": a.batch,
                            "seed": a.seed,
                            "history": history,
                        },
                        indent=1,
                    )
                )
        if done:
            break
    info = {
        "kind": kind,
        "arch": list(arch),
        "params": n_params(model),
        "seed": a.seed,
        "steps": step,
        "batch": a.batch,
        "lr": a.lr,
        "warmup": warm,
        "noise": a.noise,
        "noise_unit": a.noise_unit,
        "floor_div": a.floor_div,
        "init": a.init,
        "train_seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "dev_history": history,
    }
    save_model(model, a.out, info)
    log(f"{kind}: saved to {a.out} after {step} steps")


# ----------------------------------------------------------------------------- verifier data


def cmd_sample(a: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to mistypes the bound call
    excl = frozenset(tasks.signature(r["problem"]) for r in dev_set())
    if a.dev:
        recs = dev_set()
    else:
        it = tasks.training_stream(VERIFIER_DATA_SEED_OFFSET + a.seed)
        recs = []
        while len(recs) < a.problems:
            r = next(it)
            if tasks.signature(r["problem"]) not in excl:
                recs.append(r)
    log(f"sampling {len(recs)} problems x {a.n}")
    comps = sample(model, [T.format_prompt(r["problem"]) for r in recs], a.n, seed=a.seed + 1, batch=a.batch)
    n_ok = 0
    with open(a.out, "w") as fh:
        for r, cs in zip(recs, comps):
            for c in cs:
                ok = tasks.is_correct(c, r["answer"])
                n_ok += ok
                fh.write(
                    json.dumps(
                        {
                            "id": r["id"],
                            "level": r["level"],
                            "problem": r["problem"],
                            "answer": r["answer"],
                            "completion": c,
                            "correct": ok,
                        }
                    )
                    + "\n"
                )
    log(f"wrote {a.out}: accuracy {n_ok / (len(recs) * a.n):.3f}")


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    import numpy as np

    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    npos, nneg = y.sum(), (~y).sum()
    if npos == 0 or nneg == 0:
        return float("nan")
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks of ties
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.zeros(len(cnt))
    np.add.at(sums, inv, ranks)
    ranks = (sums / cnt)[inv]
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def init_previous_token_heads(
    layer: LlamaDecoderLayer, config: PreTrainedConfig, heads: int, sharpness: float = 12.0
) -> None:
    """Make the first ``heads`` attention heads of ``layer`` attend to the previous position.

    The query and key of those heads are constant biases (their weights are zeroed), chosen
    so that after the rotary embedding ``q_m . k_n = A * sum_i cos((n - m + 1) * theta_i)``,
    which peaks at ``n = m - 1``.  Value, output and MLP weights stay as initialised and are
    trained: the layer then sees, at every token, the body's final state at the token
    before, which holds the policy's prediction of this token.  A verifier needs that to
    tell a written digit from the expected one; learning the attention pattern from a random
    start is slow.
    """
    import torch

    d = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    q = torch.full((d,), 1.0, dtype=torch.float64)
    # k = R(1) q in the rotate-half layout: pairs (i, i + d/2) rotated by theta_i
    c, s_ = torch.cos(inv), torch.sin(inv)
    k = torch.cat([q[: d // 2] * c - q[d // 2 :] * s_, q[d // 2 :] * c + q[: d // 2] * s_])
    scale = math.sqrt(sharpness * math.sqrt(d) / float((1 - torch.cos(inv)).sum()))
    attn = layer.self_attn
    with torch.no_grad():
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            attn.q_proj.weight[sl].zero_()
            attn.k_proj.weight[sl].zero_()
            attn.q_proj.bias[sl] = (q * scale).to(attn.q_proj.bias.dtype)
            attn.k_proj.bias[sl] = (k * scale).to(attn.k_proj.bias.dtype)


def _truncate(completion: str, rng: random.Random) -> str:
    """A random strict prefix of a completion (cut at a line end or inside a line)."""
    if len(completion) < 2:
        return completion
    cut = rng.randint(1, len(completion) - 1)
    return completion[:cut]


def _true_result(m: re.Match[str]) -> str:
    """The right result of a written step ``a op b = c`` as a string ("" if there is none)."""
    x, op, y = int(m[1]), m[2], int(m[3])
    v = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else (x // y if y and x % y == 0 else None)
    return str(v) if v is not None and v >= 0 else ""


def _complete_lines(solution: str) -> Iterator[tuple[int, str, re.Match[str] | None]]:
    """(character index of the line's start, line, its ``a op b = c`` match or None) for every
    line followed by a newline."""
    pos = 0
    for line in solution.split("\n")[:-1]:
        yield pos, line, _STEP.fullmatch(line)
        pos += len(line) + 1


def step_labels(solution: str) -> list[tuple[int, float]]:
    """(character index of each complete line's newline, 1.0 if every step line up to and
    including it is arithmetically right, else 0.0): the dense step-checking target."""
    out, ok = [], 1.0
    for pos, line, m in _complete_lines(solution):
        if m and _true_result(m) != m[4]:
            ok = 0.0
        out.append((pos + len(line), ok))
    return out


def dense_labels(solution: str) -> list[tuple[int, float]]:
    """(character index, 1.0 if nothing is wrong up to and including it): at every digit of
    every step's result (its prefix agrees with the true result of the written operands) and
    at every line end (as :func:`step_labels`).  The score head learns "no slip so far"."""
    out, ok = [], 1.0
    for pos, line, m in _complete_lines(solution):
        if m and ok:
            z, true = m[4], _true_result(m)
            start = pos + m.start(4)
            for j in range(len(z)):
                good = ok if z[: j + 1] == true[: j + 1] else 0.0
                out.append((start + j, good))
            if z != true:
                ok = 0.0
        out.append((pos + len(line), ok))
    return out


def expected_digits(solution: str) -> list[tuple[int, str]]:
    """(character index, the digit that belongs there) for each digit of each step's result,
    up to and including the first wrong one of that line: what a careful reader expects to
    see at that position, given the operands as written."""
    out = []
    for pos, _, m in _complete_lines(solution):
        if m:
            z, true = m[4], _true_result(m)
            start = pos + m.start(4)
            for j in range(min(len(z), len(true))):
                out.append((start + j, true[j]))
                if z[j] != true[j]:
                    break
    return out


def _token_targets(
    items: Sequence[tuple[str, str]], offsets: Sequence[int], label_fn: Callable[[str], Sequence[tuple[int, Any]]]
) -> tuple[list[int], list[int], list[Any]]:
    """(batch rows, token positions, targets) of ``label_fn(completion)``'s (character index,
    target) pairs for (problem, completion) items whose completions start at token
    ``offsets[j]``; one token per character."""
    bi: list[int] = []
    ti: list[int] = []
    out: list[Any] = []
    for j, ((_, comp), off) in enumerate(zip(items, offsets)):
        for pos, target in label_fn(comp):
            bi.append(j)
            ti.append(off + pos)
            out.append(target)
    return bi, ti, out


def _synthetic_stream(seed: int, q: float) -> Iterator[tuple[str, str, float]]:
    """Fresh training problems with simulated per-digit slips: (problem, solution, correct)."""
    dev = frozenset(tasks.signature(r["problem"]) for r in dev_set())
    rng = random.Random(f"synthetic:{seed}")
    for rec in tasks.training_stream(VERIFIER_DATA_SEED_OFFSET * 2 + seed):
        if tasks.signature(rec["problem"]) in dev:
            continue
        sol = noisy_solution(rec["solution"], q, rng, "digit", floor_div=True)
        yield rec["problem"], sol, float(tasks.is_correct(sol, rec["answer"]))


def train_verifier(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = LlamaForCausalLM.from_pretrained(a.init, dtype=torch.float32)
    c = base.config
    arch = arch_of(c)
    n_body = arch[0]
    arch = (n_body + a.extra_layers, *arch[1:])
    prev_heads = a.prev_token_heads if a.extra_layers else 0
    model = LlamaForSequenceClassification(llama_config(arch, classifier=True, attention_bias=bool(prev_heads)))
    missing, unexpected = model.model.load_state_dict(base.model.state_dict(), strict=False)
    assert not unexpected and all(
        (k.startswith("layers.") and int(k.split(".")[1]) >= n_body) or k.endswith("_proj.bias") for k in missing
    ), (missing, unexpected)
    if prev_heads:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, proj).bias.zero_()
        init_previous_token_heads(model.model.layers[n_body], model.config, prev_heads)
    torch.nn.init.normal_(model.score.weight, std=0.02)
    # --expect-aux: a training-only head, started from the policy's output layer, that reads
    # the same hidden state as the score head and predicts the digit that belongs at this
    # position (the policy predicts it one position earlier); dropped when saving
    expect_head = None
    if a.expect_aux > 0:
        expect_head = torch.nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        with torch.no_grad():
            expect_head.weight.copy_(base.get_output_embeddings().weight)
        expect_head.to(dev)
    if a.freeze_body:
        # the policy's own layers stay as they are (they already predict every digit); the
        # extra layers and the head learn to compare what was written with what was expected
        for prm in list(model.model.embed_tokens.parameters()) + [
            q for layer in model.model.layers[:n_body] for q in layer.parameters()
        ]:
            prm.requires_grad_(False)
    model.to(dev)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to mistypes the bound call
    del base
    synth = _synthetic_stream(a.seed, a.synthetic_q) if a.synthetic > 0 else None
    rows = [json.loads(x) for x in Path(a.samples).read_text().splitlines()]
    if a.mixed_only:
        # keep problems whose samples are partly right and partly wrong: the verifier must
        # then tell solutions of the same problem apart instead of predicting difficulty
        outcome: dict[str, set[bool]] = {}
        for r in rows:
            outcome.setdefault(r["id"], set()).add(bool(r["correct"]))
        rows = [r for r in rows if len(outcome[r["id"]]) == 2]
    dev_rows = [json.loads(x) for x in Path(a.dev_samples).read_text().splitlines()] if a.dev_samples else []
    # within-problem ranking data: distinct completions per problem (correct samples of one
    # problem are often the identical string), problems with both outcomes only, sorted for
    # reproducibility
    groups: list[tuple[str, list[str], list[str]]] = []
    if a.pairwise > 0:
        by_id: dict[str, tuple[str, dict[str, None], dict[str, None]]] = {}
        for r in rows:
            g = by_id.setdefault(r["id"], (r["problem"], {}, {}))
            (g[1] if r["correct"] else g[2])[r["completion"]] = None
        groups = [(p_, list(c_), list(w_)) for _, (p_, c_, w_) in sorted(by_id.items()) if c_ and w_]
        log(f"verifier: {len(groups)} problems with right and wrong samples for the pairwise loss")
    log(
        f"verifier: arch={arch} params={n_params(model):,}; {len(rows)} samples "
        f"(acc {sum(r['correct'] for r in rows) / len(rows):.3f}), dev {len(dev_rows)}"
    )
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    if expect_head is not None:
        params += list(expect_head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 0.5 * (1 + math.cos(math.pi * s / a.steps)))
    )

    def batchify(items: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = [T.encode(T.format_scored(p, c)) for p, c in items]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), T.PAD_ID, dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e)  # right padding; last non-pad token is pooled
        return ids.to(dev), (ids != T.PAD_ID).long().to(dev)

    def score(items: Sequence[tuple[str, str]], bs: int = 1024) -> list[float]:
        model.eval()
        out: list[float] = []
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for s in range(0, len(items), bs):
                ids, att = batchify(items[s : s + bs])
                out += model(input_ids=ids, attention_mask=att).logits[:, 0].float().tolist()
        model.train()
        return out

    def dev_eval() -> dict[str, float]:
        if not dev_rows:
            return {}
        sc = score([(r["problem"], r["completion"]) for r in dev_rows])
        y = [r["correct"] for r in dev_rows]
        pre_rng = random.Random(123)
        pre = [(r["problem"], _truncate(r["completion"], pre_rng)) for r in dev_rows]
        sp = score(pre)
        fp = sum(1 for s_, t in zip(sc, y) if s_ > 0 and not t)
        neg = sum(1 for t in y if not t)
        # best-of-n over each problem's samples
        by: dict[str, list[tuple[float, bool]]] = {}
        for s_, r in zip(sc, dev_rows):
            by.setdefault(r["id"], []).append((s_, r["correct"]))
        bo = 0.0
        for v in by.values():
            top = max(x for x, _ in v)
            tied = [ok for x, ok in v if x == top]
            bo += sum(tied) / len(tied)
        bo /= len(by)
        return {
            "auroc": auroc(sc, y),
            "auroc_prefix": auroc(sp, y),
            "fpr@0.5": fp / max(1, neg),
            "best_of_group": bo,
            "pass1": sum(y) / len(y),
        }

    model.train()
    t0 = time.time()
    hist = []
    best = None
    for step in range(1, a.steps + 1):
        items: list[tuple[str, str]] = []
        labels: list[float] = []
        n_pair = a.batch // 2 if a.pairwise > 0 else 0
        pairs: list[tuple[int, int]] = []
        while len(items) < n_pair:
            p_, cs, ws = groups[rng.randrange(len(groups))]
            k_c = min(len(cs), rng.randint(1, a.group - 1))
            k_w = min(len(ws), a.group - k_c)
            c_idx = list(range(len(items), len(items) + k_c))
            for comp in rng.sample(cs, k_c):
                items.append((p_, comp))
                labels.append(1.0)
            w_idx = list(range(len(items), len(items) + k_w))
            for comp in rng.sample(ws, k_w):
                items.append((p_, comp))
                labels.append(0.0)
            pairs += [(i, j) for i in c_idx for j in w_idx]
        if synth is not None:
            for _ in range(int(a.batch * a.synthetic)):
                p_, sol, ok = next(synth)
                items.append((p_, sol))
                labels.append(ok)
        for r in rng.sample(rows, a.batch - len(items)):
            comp = r["completion"]
            if rng.random() < a.prefix_frac:
                comp = _truncate(comp, rng)
            items.append((r["problem"], comp))
            labels.append(float(r["correct"]))
        ids, att = batchify(items)
        y = torch.tensor(labels, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            hid = model.model(input_ids=ids).last_hidden_state  # right padding, causal: no mask needed
            tok_logit = model.score(hid)[..., 0].float()  # the score head at every position
        last = att.sum(1) - 1
        logit = tok_logit[torch.arange(len(items), device=dev), last]  # last-token pooling
        loss = F.binary_cross_entropy_with_logits(logit, y)
        if pairs:
            pi = torch.tensor(pairs, device=dev)
            # Bradley-Terry: P(correct sample outranks wrong sample of the same problem)
            loss = loss + a.pairwise * F.softplus(logit[pi[:, 1]] - logit[pi[:, 0]]).mean()
        # where each completion starts in its token sequence (one token per character)
        offsets = [len(T.encode(T.format_prompt(p_))) for p_, _ in items]
        if a.step_aux > 0:
            # dense step checking: at each line end (and with --digit-aux at each result
            # digit), was everything so far right?
            bi, ti, sl = _token_targets(items, offsets, dense_labels if a.digit_aux else step_labels)
            if bi:
                aux = F.binary_cross_entropy_with_logits(
                    tok_logit[torch.tensor(bi, device=dev), torch.tensor(ti, device=dev)], torch.tensor(sl, device=dev)
                )
                loss = loss + a.step_aux * aux
        if expect_head is not None:
            bi, ti, tgt = _token_targets(items, offsets, expected_digits)
            tgt = [T.encode(d)[0] for d in tgt]
            if bi:
                h_sel = hid[torch.tensor(bi, device=dev), torch.tensor(ti, device=dev)]  # final norm applied
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    ex_logits = expect_head(h_sel).float()
                ex_loss = F.cross_entropy(ex_logits, torch.tensor(tgt, device=dev))
                loss = loss + a.expect_aux * ex_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            extra = f" expect {ex_loss.item():.4f}" if expect_head is not None and bi else ""
            log(f"verifier step {step} loss {loss.item():.4f}{extra} {time.time() - t0:.0f}s")
        out_of_time = (bool(a.max_minutes) and time.time() - t0 > 60 * a.max_minutes) or step == a.stop_at
        if step % a.eval_every == 0 or step == a.steps or out_of_time:
            res = dev_eval()
            hist.append({"step": step, **res})
            log(f"verifier EVAL step {step}: {json.dumps(res)}")
            if a.keep_best and res and (best is None or res["best_of_group"] > best[0]):
                best = (res["best_of_group"], step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if out_of_time:
            log(f"verifier: stopping at step {step} (--max-minutes / --stop-at)")
            break
    if a.keep_best and best is not None:
        model.load_state_dict(best[2])
        log(f"verifier: keeping step {best[1]} (dev best-of-group {best[0]:.3f})")
    info = {
        "kind": "verifier",
        "arch": list(arch),
        "params": n_params(model),
        "seed": a.seed,
        "steps": step,
        "batch": a.batch,
        "lr": a.lr,
        "prefix_frac": a.prefix_frac,
        "train_samples": len(rows),
        "mixed_only": a.mixed_only,
        "init": "policy body",
        "pairwise": a.pairwise,
        "group": a.group,
        "step_aux": a.step_aux,
        "pair_problems": len(groups),
        "digit_aux": a.digit_aux,
        "extra_layers": a.extra_layers,
        "freeze_body": a.freeze_body,
        "prev_token_heads": prev_heads,
        "expect_aux": a.expect_aux,
        "synthetic": a.synthetic,
        "synthetic_q": a.synthetic_q,
        "kept_step": best[1] if (a.keep_best and best) else a.steps,
        "dev_history": hist,
        "train_seconds": round(time.time() - t0, 1),
    }
    save_model(model, a.out, info)
    log(f"verifier saved to {a.out}")


# ----------------------------------------------------------------------------- selection


def select(a: argparse.Namespace) -> None:
    """Pick the checkpoint whose dev metrics best fit the policy targets."""
    best = None
    for run in a.runs:
        hist = json.loads((Path(run) / "history.json").read_text())["history"]
        for h in hist:
            al = h["all"]
            p1 = al["pass1"]
            pk = next(v for k, v in al.items() if k.startswith("pass") and k != "pass1")
            mk = next(v for k, v in al.items() if k.startswith("maj"))
            viol = (
                max(0, 0.42 - p1)
                + max(0, p1 - 0.58)
                + max(0, 0.90 - h["L1"]["pass1"])
                + max(0, h["L5"]["pass1"] - 0.20)
                + max(0, p1 + 0.12 - mk)
                + max(0, 0.95 - pk)
            )
            key = (round(viol, 3), -pk)
            if best is None or key < best[0]:
                best = (key, run, h["step"], h)
    if best is None:
        raise SystemExit("select: no evaluated checkpoints in the given runs")
    print(json.dumps({"run": best[1], "step": best[2], "violation": best[0][0], "metrics": best[3]}))


def export(a: argparse.Namespace) -> None:
    """Turn a checkpoint written with --ckpt-dir into a model directory."""
    import torch
    from transformers import LlamaForCausalLM

    meta = json.loads((Path(a.ckpt).parent / "history.json").read_text())
    model = LlamaForCausalLM(llama_config(tuple(meta["arch"])))
    sd = torch.load(a.ckpt, map_location="cpu")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    step = int(Path(a.ckpt).stem.removeprefix("step"))
    hist = [h for h in meta["history"] if h["step"] <= step]
    for k in ("lr", "noise", "noise_unit", "floor_div", "batch", "seed"):
        if k in meta:
            hist_meta = meta[k]
            a.info = json.dumps({**json.loads(a.info or "{}"), k: hist_meta})
    save_model(
        model,
        a.out,
        {
            "kind": meta["kind"],
            "arch": meta["arch"],
            "params": n_params(model),
            "steps": step,
            "dev_history": hist,
            **json.loads(a.info or "{}"),
        },
    )
    log(f"exported {a.ckpt} -> {a.out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttscale.zoo.train")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for kind in ("policy", "draft"):
        p = sub.add_parser(kind)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=DEFAULT_STEPS[kind])
        p.add_argument("--max-minutes", type=float, default=0.0)
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--warmup", type=int, default=300)
        p.add_argument("--workers", type=int, default=3)
        p.add_argument("--arch", default=None, help="layers,hidden,intermediate,heads,kv_heads")
        p.add_argument(
            "--noise",
            type=float,
            default=0.0,
            help="probability of a simulated slip (per step or per digit, --noise-unit)",
        )
        p.add_argument("--noise-unit", choices=("step", "digit", "size"), default="step")
        p.add_argument(
            "--floor-div",
            action="store_true",
            help="after a slip, an inexact division writes the floored quotient (instead "
            "of dropping the slips of that solution)",
        )
        p.add_argument("--init", default=None, help="continue from a model directory or a --ckpt-dir checkpoint")
        p.add_argument("--eval-every", type=int, default=0)
        p.add_argument("--eval-n", type=int, default=16)
        p.add_argument("--ckpt-dir", default=None)
    s = sub.add_parser("sample")
    s.add_argument("--model", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--problems", type=int, default=6000)
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--dev", action="store_true", help="sample the dev set instead")
    s.add_argument("--batch", type=int, default=2048, help="sequences per generate call")
    s.add_argument("--out", required=True)
    v = sub.add_parser("verifier")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--init", required=True, help="policy directory")
    v.add_argument("--samples", required=True)
    v.add_argument("--dev-samples", default=None)
    v.add_argument("--out", required=True)
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--batch", type=int, default=128)
    v.add_argument("--lr", type=float, default=3e-4)
    v.add_argument("--prefix-frac", type=float, default=0.5)
    v.add_argument("--eval-every", type=int, default=250)
    v.add_argument("--mixed-only", action="store_true")
    v.add_argument("--keep-best", action="store_true", help="keep the step with the best dev best-of-n")
    v.add_argument(
        "--pairwise",
        type=float,
        default=0.0,
        help="weight of a within-problem Bradley-Terry loss (half of each batch: groups of "
        "distinct right and wrong samples of one problem); BCE stays on",
    )
    v.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long")
    v.add_argument(
        "--stop-at", type=int, default=0, help="stop at this step (the learning-rate schedule still spans --steps)"
    )
    v.add_argument("--group", type=int, default=4, help="samples per problem in a pairwise group")
    v.add_argument(
        "--step-aux",
        type=float,
        default=0.0,
        help="weight of a dense BCE at each line end: were all steps so far arithmetically right",
    )
    v.add_argument(
        "--digit-aux", action="store_true", help="with --step-aux: also label every digit of every step's result"
    )
    v.add_argument(
        "--expect-aux",
        type=float,
        default=0.0,
        help="weight of a training-only loss: predict, at each result digit, the digit "
        "that belongs there (teaches the reader to hold the expected digit where it "
        "can compare it with the written one)",
    )
    v.add_argument("--extra-layers", type=int, default=0, help="layers added on top of the policy body")
    v.add_argument("--freeze-body", action="store_true", help="train only the extra layers, norm and head")
    v.add_argument(
        "--prev-token-heads",
        type=int,
        default=0,
        help="with --extra-layers: start this many heads of the first extra layer as "
        "previous-token heads (adds attention biases to the architecture)",
    )
    v.add_argument(
        "--synthetic",
        type=float,
        default=0.0,
        help="share of each batch drawn from fresh problems with simulated slips",
    )
    v.add_argument("--synthetic-q", type=float, default=0.04, help="per-digit slip rate of those")
    se = sub.add_parser("select")
    se.add_argument("runs", nargs="+")
    ex = sub.add_parser("export")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--info", default=None, help="extra JSON for training_info.json")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        export(a)
        return 0
    if a.cmd in ("policy", "draft"):
        train_lm(a.cmd, a)
    elif a.cmd == "sample":
        cmd_sample(a)
    elif a.cmd == "verifier":
        train_verifier(a)
    else:
        select(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
