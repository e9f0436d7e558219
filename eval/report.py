"""Evaluation report: a self-contained HTML page (figures embedded as base64 PNG), the same
content as Markdown (figures under ``figures/``), and the budget profile ``profile.json``."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ttscale.eval import metrics as M
from ttscale.eval.analysis import FLAWS_COSTS, LABELS, SELECTING, SELECTORS, Analysis
from ttscale.eval.data import KNOWN_SETS
from ttscale.eval.fit import MAX_CI_WIDTH, MIN_TRUST_POINTS, FitResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLORS = {
    "coverage": "#1f77b4",
    "majority": "#ff7f0e",
    "verifier_best_of": "#2ca02c",
    "weighted": "#9467bd",
    "rpc": "#8c564b",
    "logprob_best_of": "#e377c2",
}


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.{nd}f}"
    return str(x)


def _ci(t: tuple[float, ...]) -> str:
    m, lo, hi = t[0], t[1], t[2]
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _params(f: FitResult) -> str:
    if not f.fittable:
        return f"not fittable: {f.reason}"
    return ", ".join(
        f"{k} = {v:.4g} ± {f.stderr[k]:.2g}" if math.isfinite(f.stderr[k]) else f"{k} = {v:.4g}"
        for k, v in f.params.items()
    )


def _ci_of(f: FitResult) -> str:
    lo_hi = f.ci.get("A_inf")
    return "–" if lo_hi is None else f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"


def _trust(f: FitResult) -> str:
    """'trustworthy', or why not (fits without an asymptote: '–')."""
    if not f.fittable:
        return "not fittable"
    if f.name != "selected_accuracy_ceiling":
        return "–"
    return "trustworthy" if f.trusted else "not trustworthy: " + "; ".join(f.issues)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _figures(an: Analysis) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}
    ks = np.array(an.ks)
    kk = np.unique(np.round(np.logspace(0, math.log10(an.k_max), 200)))
    g = an.global_

    def save(name: str, fig: Figure) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        figs[name] = buf.getvalue()

    def logx(ax: Axes) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("samples per problem k")
        ax.grid(alpha=0.3)

    # 1. all strategies with fitted curves
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for s, pts in g.points.items():
        m, lo, hi = (np.array(pts[x]) for x in ("mean", "lo", "hi"))
        ax.errorbar(ks, m, yerr=[m - lo, hi - m], fmt="o", ms=4, capsize=3, color=COLORS[s], label=LABELS[s])
        f = g.curves.get(s)
        if f is not None and f.fittable:
            ax.plot(kk, f.predict(kk), "-", color=COLORS[s], alpha=0.8, lw=1.4)
        elif s in SELECTING and s not in SELECTORS:  # no fitted curve: the points joined
            ax.plot(ks, m, ":", color=COLORS[s], alpha=0.7)
    vf = g.curves.get("verifier_best_of")
    if vf is not None and vf.fittable:
        ax.axhline(
            vf.params["A_inf"],
            color=COLORS["verifier_best_of"],
            ls="--",
            lw=0.9,
            label=f"verifier fit asymptote A∞ = {vf.params['A_inf']:.3f}{'' if vf.trusted else ' (not trustworthy)'}",
        )
    if g.flaws:
        ax.axhline(
            g.flaws["ceiling"],
            color="crimson",
            ls="--",
            lw=0.9,
            label=f"fLaws ceiling (resampling) = {g.flaws['ceiling']:.3f}",
        )
    logx(ax)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Accuracy vs samples (points: measured, 95% bootstrap CI; lines: fits)")
    ax.legend(fontsize=8, loc="lower right")
    save("curves", fig)

    # 2. per bucket
    shown = [s for s in ("coverage", *SELECTORS) if s in g.points]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.0), sharey=True)
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("viridis")
    for ax, s in zip(axes, shown):
        for bi, b in enumerate(an.buckets):
            col = cmap(bi / max(1, len(an.buckets) - 1))
            ax.plot(ks, b.points[s]["mean"], "o", ms=3.5, color=col)
            f = b.curves.get(s)
            if f is not None and f.fittable:
                ax.plot(kk, np.clip(f.predict(kk), 0, 1), "-", color=col, lw=1.2, label=b.name)
            else:
                ax.plot(ks, b.points[s]["mean"], ":", color=col, lw=1.2, label=b.name)
        logx(ax)
        ax.set_title(LABELS[s])
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Per {'level' if an.bucket_by == 'level' else 'difficulty bin'} (lines: fits)", y=1.02)
    save("buckets", fig)

    # 3. coverage vs selected gap
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    cov = an.values["coverage"]
    for s in SELECTING:
        if s not in an.values:
            continue
        d = [M.paired_bootstrap_diff(cov[:, j], an.values[s][:, j], n_boot=500, seed=j) for j in range(len(ks))]
        m, lo, hi = (np.array([x[i] for x in d]) for i in range(3))
        ax.errorbar(
            ks, m, yerr=[m - lo, hi - m], fmt="o-", ms=4, capsize=3, color=COLORS[s], label=f"coverage − {LABELS[s]}"
        )
    logx(ax)
    ax.set_ylabel("accuracy gap")
    ax.set_title("What selection leaves on the table: coverage − selected accuracy (paired 95% CI)")
    ax.legend(fontsize=8)
    save("gap", fig)

    # 4. verifier
    if g.verifier is not None and g.flaws is not None:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13.5, 4.0))
        sc = np.concatenate([p.scores for p in an.probs])
        y = np.concatenate([p.correct for p in an.probs])
        bins = np.linspace(0, 1, 41)
        a1.hist(sc[y], bins=bins, alpha=0.6, density=True, color="#2ca02c", label="correct samples")
        a1.hist(sc[~y], bins=bins, alpha=0.6, density=True, color="#d62728", label="incorrect samples")
        a1.axvline(0.5, color="k", ls="--", lw=0.8)
        a1.set_xlabel("verifier score P(correct)")
        a1.set_title(f"Verifier scores (AUROC {g.verifier['auroc']:.3f})")
        a1.legend(fontsize=8)
        K = np.arange(len(g.flaws["accuracy_curve"]))
        a2.plot(K[1:], np.array(g.flaws["accuracy_curve"])[1:], color="#2ca02c", label="P(accepted & correct)")
        a2.plot(K[1:], np.array(g.flaws["fp_curve"])[1:], color="#d62728", label="P(false positive)")
        a2.axhline(g.flaws["ceiling"], color="crimson", ls="--", lw=0.9, label="ceiling")
        a2.set_xscale("log")
        a2.set_xlabel("attempts K (resample until accepted)")
        a2.set_title(f"fLaws model: TPR {g.flaws['completeness']:.2f}, FPR {1 - g.flaws['soundness']:.2f}")
        a2.legend(fontsize=8)
        a2.grid(alpha=0.3)
        for C in FLAWS_COSTS:
            eu = np.array(g.flaws["expected_utility"][f"C={C:g}"])
            (line,) = a3.plot(K, eu, label=f"C = {C:g}: K* = {g.flaws['optimal_k'][f'C={C:g}']}")
            k_opt = g.flaws["optimal_k"][f"C={C:g}"]
            a3.plot([k_opt], [eu[k_opt]], "o", color=line.get_color())
        a3.set_xscale("symlog", linthresh=1)
        a3.set_xlabel("attempts K")
        a3.set_ylabel("expected utility")
        a3.set_title("Expected utility (+1 correct, −C false positive)")
        a3.legend(fontsize=8)
        a3.grid(alpha=0.3)
        save("verifier", fig)

    # 5. TTSPM saturation
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for s, f in g.saturation.items():
        ax.plot(ks, g.points[s]["mean"], "o", color=COLORS[s])
        if f.fittable:
            ax.plot(
                kk,
                f.predict(kk),
                "-",
                color=COLORS[s],
                label=f"{LABELS[s]}: F_max={f.params['F_max']:.3f}, p={f.params['p']:.3f}",
            )
            n1 = f.saturation(1e-3) if f.params["F_max"] > 0 else None
            if n1 is not None and n1 <= an.k_max * 4:
                ax.axvline(n1, color=COLORS[s], ls=":", lw=1)
    logx(ax)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("TTSPM saturating fits F(N) = F_max(1 − (1 − p)^N); dotted: saturation point (ε = 1e-3)")
    ax.legend(fontsize=8, loc="lower right")
    save("saturation", fig)

    # 6. accuracy vs tokens and latency
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    toks = an.prompt_tokens + ks * an.tokens_per_sample
    lat = np.array(an.latency_at_k)[ks - 1]
    for s, pts in g.points.items():
        a1.plot(toks, pts["mean"], "o-", color=COLORS[s], label=LABELS[s], ms=4)
        a2.plot(lat, pts["mean"], "o-", color=COLORS[s], label=LABELS[s], ms=4)
    a1.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    a1.xaxis.set_major_formatter(ScalarFormatter())
    a1.xaxis.set_minor_formatter(NullFormatter())
    a1.set_xlabel("tokens per problem (prompt + k completions)")
    a2.set_xlabel("wall time of a k-sample fan-out, s (E[max of k latencies])")
    for a in (a1, a2):
        a.set_ylabel("accuracy")
        a.grid(alpha=0.3)
        a.set_ylim(0, 1.02)
    a1.legend(fontsize=8)
    a1.set_title("Accuracy per token")
    a2.set_title("Accuracy per latency (as measured in this run)")
    save("cost", fig)
    return figs


# --------------------------------------------------------------------------------------------
# Document
# --------------------------------------------------------------------------------------------


class _Doc:
    """Builds the HTML and Markdown versions side by side."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str, code: bool = False) -> None:
        if code:
            self.html.append(f"<pre>{html.escape(text)}</pre>")
            runs = [len(r) for r in re.findall(r"`+", text)]
            fence = "`" * max(3, max(runs, default=0) + 1)  # longer than any backtick run of the text
            self.md.append(f"{fence}\n{text}\n{fence}\n")
        else:
            self.html.append(f"<p>{html.escape(text)}</p>")
            self.md.append(text + "\n")

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        hs = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{hs}</tr></thead><tbody>{body}</tbody></table>")
        self.md.append("| " + " | ".join(head) + " |")
        self.md.append("|" + "---|" * len(head))
        for r in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        self.md.append("")

    def fig(self, name: str, png: bytes, alt: str) -> None:
        b64 = base64.b64encode(png).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>"
        )
        self.md.append(f"![{alt}](figures/{name}.png)\n")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:24px auto;
padding:0 18px;color:#222;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:6px}h2{margin-top:34px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:10px 0 18px;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 9px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:8px 10px;overflow-x:auto;font-size:13px}
figure{margin:12px 0}img{max-width:100%}figcaption{font-size:13px;color:#555}
"""


def _extraction_section(d: _Doc, an: Analysis) -> None:
    ex = an.extraction
    if not ex:
        return
    d.h(2, "Answer extraction")
    d.p(
        "Samples from which no final answer was extracted (no \\boxed{}, no 'the answer is …' or "
        "'Answer: …', no #### …, no literal result of a final code block) are answerless: they count "
        "as wrong and do not vote. A high rate means the prompt format or the extractor does not fit "
        "the model's outputs (or max_tokens cuts them off), not that the model cannot solve the problems."
    )
    d.table(
        ["samples", "no answer extracted", "rate", "of these cut at max_tokens", "problems with one"],
        [
            [
                ex["samples"],
                ex["answerless"],
                f"{100 * ex['rate']:.2f}%",
                ex["answerless_cut_at_max_tokens"],
                ex["problems_with_answerless"],
            ]
        ],
    )
    if ex.get("by_level"):
        d.table(
            ["level", "samples", "no answer", "rate"],
            [[str(lv), v["samples"], v["answerless"], f"{100 * v['rate']:.2f}%"] for lv, v in ex["by_level"].items()],
        )
    if ex["examples"]:
        d.p(
            f"The first answerless sample of each of the first {len(ex['examples'])} problems with one "
            "(texts shortened to their start and end):"
        )
        for e in ex["examples"]:
            d.p(f"{e['id']}, sample {e['i']} (finish {e['finish']}, {e['tokens']} tokens):")
            d.p(e["text"] if e["text"] is not None else "(texts not recorded: --no-text)", code=True)
    split = ex.get("split_clusters") or []
    if split:
        n = len({x["id"] for x in split})
        d.p(
            f"Answer clusters split ({len(split)}, in {n} problem{'' if n == 1 else 's'}): answer "
            "equivalence is closed transitively, so a cluster can join answers that grading against the "
            "gold tells apart; its correct and its wrong samples vote as two clusters."
        )
        d.table(["problem", "answers in the cluster"], [[x["id"], ", ".join(x["answers"])] for x in split[:20]])


def dataset_label(m: dict[str, Any]) -> str:
    """The set as a reader can find it again, without this machine's paths: a packaged set by
    name, an ``hf:`` set by its id, a file by its name and the content fingerprint."""
    name, source, fp = m.get("dataset"), str(m.get("dataset_source") or ""), m.get("dataset_fingerprint")
    tail = f", fingerprint {fp}" if fp else ""
    if name in KNOWN_SETS:
        return f"{name} (packaged with ttscale{tail})"
    if source.startswith("hf:"):
        return source + (f" (fingerprint {fp})" if fp else "")
    if not source:
        return f"{name} (unknown source{tail})"
    return f"{name} (file {Path(source).name}{tail})"


def model_label(arg: str | None) -> str | None:
    """A model argument without this machine's paths: ``name=/a/b/dir`` reads ``name (model
    directory dir)``; a bare local path its directory's name; names and URLs stay as given."""
    if not arg:
        return arg
    name, sep, target = arg.partition("=")
    if not sep:
        name, target = "", arg
    if target.startswith(("/", "./", "../", "~")):
        base = Path(target.rstrip("/")).name
        return f"{name} (model directory {base})" if name else base
    return arg


def build(an: Analysis, figs: dict[str, bytes], command: str | None) -> _Doc:
    m = an.manifest
    g = an.global_
    d = _Doc()
    title = f"ttscale eval: {model_label(m.get('model'))} on {m.get('dataset')} (K = {an.k_max})"
    d.h(1, title)

    d.h(2, "Run")
    samp = m.get("sampling", {})
    rows: list[list[Any]] = [
        ["model", model_label(m.get("model"))],
        ["verifier", model_label(m.get("verifier")) or "–"],
        ["dataset", dataset_label(m)],
        ["problems", f"{len(an.probs)} of {m.get('n_problems')}"],
        ["samples per problem K", an.k_max],
        ["system prompt", "none" if an.prompt.system is None else json.dumps(an.prompt.system, ensure_ascii=False)],
        [
            "prompt template",
            json.dumps(an.prompt.template, ensure_ascii=False)
            + (f" (preset {an.prompt.preset})" if an.prompt.preset else ""),
        ],
        [
            "sampling",
            f"temperature {samp.get('temperature')}, top_p {samp.get('top_p')}, "
            f"max_tokens {samp.get('max_tokens')}, seed {m.get('seed')}",
        ],
        ["completion tokens per sample (mean)", f"{an.tokens_per_sample:.1f}"],
        ["prompt tokens per problem (mean)", f"{an.prompt_tokens:.1f}"],
        ["samples", sum(p.n for p in an.probs)],
        [
            "cost model",
            f"{an.cost_per_1k_tokens:g} per 1000 tokens (value of a correct answer = 1) "
            f"→ {an.cost_per_sample:.2e} per sample",
        ],
        ["ttscale", m.get("ttscale_version")],
        ["recorded", m.get("created")],
    ]
    d.table(["run", ""], rows)
    for n in an.notes:
        d.p(f"Note: {n}")
    if command:
        d.p("Regenerate:")
        d.p(command, code=True)

    d.h(2, "Accuracy")
    jK = len(an.ks) - 1
    head = ["strategy"] + [f"k={k}" for k in an.ks]
    d.table(head, [[LABELS[s]] + [f"{v:.3f}" for v in pts["mean"]] for s, pts in g.points.items()])
    d.p(
        "All metrics use all K samples of each problem (unbiased estimators: the expectation over "
        "random k-subsets, not the first k). 95% percentile-bootstrap intervals over problems:"
    )
    d.table(
        ["strategy", "k = 1", f"k = {an.k_max}"],
        [
            [
                LABELS[s],
                f"{pts['mean'][0]:.3f} [{pts['lo'][0]:.3f}, {pts['hi'][0]:.3f}]",
                f"{pts['mean'][jK]:.3f} [{pts['lo'][jK]:.3f}, {pts['hi'][jK]:.3f}]",
            ]
            for s, pts in g.points.items()
        ],
    )
    for title_, tab in (("level", an.levels), ("subject", an.subjects)):
        if not tab:
            continue
        d.h(3, f"Per {title_} (mean [95% CI])")
        cols = list(tab)
        keys = list(tab[cols[0]])
        d.table([title_, "n", *cols], [[str(k), tab[cols[0]][k][3], *(_ci(tab[c][k]) for c in cols)] for k in keys])

    _extraction_section(d, an)

    d.h(2, "Scaling curves and fits")
    d.fig("curves", figs["curves"], "Accuracy vs k for every strategy with the fitted curves")
    rows = []
    for s, f in g.curves.items():
        rows.append([LABELS[s], f.name, _params(f), _fmt(f.r2, 4), _fmt(f.rmse, 4), _ci_of(f), _trust(f)])
    d.table(["curve", "model", "parameters (± s.e.)", "R²", "RMSE", "95% CI of A∞", "asymptote"], rows)
    d.p(
        "coverage: exponentiated power law c(k) = exp(a·k^b) (fit in log-coverage space, Large "
        "Language Monkeys); selected accuracy: A(k) = A∞ − (A∞ − A₁)·k^(−β), A∞ the asymptote, "
        "bounded to what is possible (selected accuracy ≤ coverage ≤ 1: A∞ ∈ [0, 1], A₁ ∈ [0, 1]). "
        "The 95% interval of A∞ is its profile interval; an asymptote is not trustworthy with fewer "
        f"than {MIN_TRUST_POINTS} budgets, an interval wider than {MAX_CI_WIDTH:g}, A∞ held at a bound "
        "(the fit without bounds would leave [0, 1]), β on a bound, or R² < 0.9. The standard errors "
        "treat the points as independent, which points over the same problems are not."
    )
    brows = [
        [b.name, LABELS[s], _fmt(f.params["A_inf"]) if f.fittable else "–", _ci_of(f), _trust(f)]
        for b in an.buckets
        for s, f in b.curves.items()
        if f.name == "selected_accuracy_ceiling"
    ]
    if brows:
        d.table(["bucket", "curve", "A∞", "95% CI of A∞", "asymptote"], brows)
    d.fig("buckets", figs["buckets"], "Per-bucket curves")

    d.h(2, "Coverage vs selected accuracy")
    d.fig("gap", figs["gap"], "Coverage minus selected accuracy")
    gap_rows = []
    for s in SELECTING:
        if s in g.points:
            gap_rows.append([LABELS[s], f"{g.points['coverage']['mean'][jK] - g.points[s]['mean'][jK]:.3f}"])
    d.table(["strategy", f"gap at k = {an.k_max}"], gap_rows)

    if g.verifier is not None:
        d.h(2, "Verifier and the false-positive ceiling")
        v = g.verifier
        d.table(
            ["AUROC", "TPR @0.5", "FPR @0.5", "precision @0.5", "accept rate"],
            [[_fmt(v["auroc"]), _fmt(v["tpr"]), _fmt(v["fpr"]), _fmt(v["precision"]), _fmt(v["accept_rate"])]],
        )
        if "verifier" in figs:
            d.fig("verifier", figs["verifier"], "Verifier score distributions, resampling model, expected utility")
        fl = g.flaws
        if fl:
            vf = g.curves.get("verifier_best_of")
            d.p(
                f"Resampling with an imperfect verifier (completeness c = TPR = {fl['completeness']:.3f}, "
                f"soundness s = 1 − FPR = {fl['soundness']:.3f}; per-problem single-sample accuracy r): the "
                f"accuracy of 'resample until accepted' tends to c·r/(c·r + (1−s)(1−r)), a ceiling of "
                f"{fl['ceiling']:.3f} averaged over problems, however large K is. The fitted asymptote of "
                f"verifier best-of-k is A∞ = {_fmt(vf.params['A_inf']) if vf and vf.fittable else '–'}"
                + (f" (95% CI {_ci_of(vf)}; {_trust(vf)})." if vf and vf.fittable else ".")
            )
            d.table(
                ["false-positive cost C"] + [k for k in fl["optimal_k"]],
                [["optimal K (0 = abstain)"] + [str(x) for x in fl["optimal_k"].values()]],
            )
            brow = [
                [
                    b.name,
                    _fmt(b.flaws["ceiling"]) if b.flaws else "–",
                    " / ".join(str(x) for x in b.flaws["optimal_k"].values()) if b.flaws else "–",
                    _fmt(b.verifier["tpr"]) if b.verifier else "–",
                    _fmt(b.verifier["fpr"]) if b.verifier else "–",
                ]
                for b in an.buckets
            ]
            d.table(
                ["bucket", "ceiling", "optimal K for C = " + " / ".join(f"{c:g}" for c in FLAWS_COSTS), "TPR", "FPR"],
                brow,
            )

    d.h(2, "Saturation point (TTSPM)")
    d.fig("saturation", figs["saturation"], "Saturating exponential fits and saturation points")
    eps_cost = an.cost_per_sample
    rows = []
    for s, f in g.saturation.items():
        n1 = f.saturation(1e-3) if f.fittable and f.params["F_max"] > 0 else None
        n2 = f.saturation(eps_cost) if f.fittable and f.params["F_max"] > 0 and eps_cost > 0 else None
        rows.append([LABELS[s], _params(f), _fmt(f.r2, 4), _fmt(n1), _fmt(n2)])
    d.table(
        ["curve", "F(N) = F_max(1 − (1 − p)^N)", "R²", "N* (ε = 1e-3)", f"N* (ε = cost/sample = {eps_cost:.1e})"], rows
    )
    d.p("N* is the smallest N whose next sample gains at most ε: ⌈ln(ε/(F_max·p))/ln(1 − p)⌉.")

    d.h(2, "Tokens, latency and cost per target accuracy")
    d.fig("cost", figs["cost"], "Accuracy vs tokens and latency")
    rows = []
    for s, tr in an.targets.items():
        for r in tr:
            if r["k"] is None:
                rows.append([LABELS[s], f"{r['target']:.2f}", f"> {an.k_max}", "–", "–", "–", "–"])
            else:
                rows.append(
                    [
                        LABELS[s],
                        f"{r['target']:.2f}",
                        r["k"],
                        f"{r['tokens']:.0f}",
                        f"{r['latency_s']:.2f}",
                        "–" if r.get("gpu_s") is None else f"{r['gpu_s']:.3f}",
                        f"{r['cost']:.4f}",
                    ]
                )
    d.table(
        ["strategy", "target accuracy", "k (fit)", "tokens / problem", "latency s", "GPU-s / problem", "cost"], rows
    )
    spt = an.engine_s_per_token
    d.p(
        "Latency is the expected wall time of a k-sample fan-out under this run's load (the slowest "
        "of k recorded sample latencies); tokens count the prompt once (shared prefix) plus k completions. "
        + (
            f"GPU-s are seconds of this run's engine for the k completions at its measured rate, "
            f"{1 / spt:.0f} generated tokens/s (the union of the problems' in-flight times over their tokens; "
            "on a GPU shared by several engines, the share this run had)."
            if spt
            else "GPU-s need a run recorded with the problems' finishing times."
        )
    )

    d.h(2, "Recommended budget per difficulty bucket")
    d.p(
        f"k maximises accuracy(k) − cost·k on the fitted curve (on the measured points, "
        f"interpolated in log k, where the fit's R² < 0.9), k ≤ {an.k_max}, cost per sample "
        f"{an.cost_per_sample:.2e}. Buckets by {an.bucket_by.replace('_', ' ')}."
    )
    rows = []
    for b in [*an.buckets, g]:
        r = b.recommended
        if not r:
            continue
        bs = r["by_strategy"]
        rows.append(
            [
                b.name,
                b.idx.size,
                f"{b.pass1.mean():.3f}",
                r["strategy"],
                r["k"],
                f"{r['expected_accuracy']:.3f}",
                *(f"k={bs[s]['k']} → {bs[s]['expected_accuracy']:.3f}" if s in bs else "–" for s in SELECTORS),
            ]
        )
    d.table(["bucket", "n", "pass@1", "strategy", "K", "expected accuracy", *(f"{LABELS[s]}" for s in SELECTORS)], rows)
    d.p("The budget profile (profile.json) holds these curves and recommendations for the server's adaptive budget.")
    _holdout_section(d, an)
    return d


def _holdout_section(d: _Doc, an: Analysis) -> None:
    ho = an.holdout
    if not ho:
        return
    d.h(3, "Held-out check of the recommendations")
    d.p(
        f"The problems are split in two by a hash of their id ({ho['n_fit']} to fit, {ho['n_heldout']} held "
        "out). The fit half's buckets get their curves and recommended strategy and K as above; each "
        "held-out problem goes to its "
        + ("level's bucket" if an.bucket_by == "level" else "bucket of nearest mean pass@1")
        + ". Predicted: the fit half's expected accuracy of the recommendation; realised: the accuracy "
        "of that strategy and K on the held-out problems of the bucket (mean [95% bootstrap CI])."
    )
    if ho.get("note"):
        d.p(f"Note: {ho['note']}")
        return
    rows = []
    for b in ho["buckets"]:
        if "strategy" not in b:
            rows.append([b["name"], b["n_fit"], b["n_heldout"], "–", "–", "–", "–", "–"])
            continue
        real = (
            f"{b['realised']:.3f} [{b['realised_lo']:.3f}, {b['realised_hi']:.3f}]"
            if "realised" in b
            else "no problems"
        )
        diff = f"{b['difference']:+.3f}" if "difference" in b else "–"
        rows.append([b["name"], b["n_fit"], b["n_heldout"], b["strategy"], b["k"], f"{b['predicted']:.3f}", real, diff])
    a = ho.get("all")
    if a:
        rows.append(
            [
                "all (per-bucket plans)",
                ho["n_fit"],
                a["n_heldout"],
                "–",
                f"{a['mean_k']:.1f} (mean)",
                f"{a['predicted']:.3f}",
                f"{a['realised']:.3f} [{a['realised_lo']:.3f}, {a['realised_hi']:.3f}]",
                f"{a['difference']:+.3f}",
            ]
        )
    d.table(["bucket", "n fit", "n held out", "strategy", "K", "predicted", "realised", "realised − predicted"], rows)


def write_report(an: Analysis, out_dir: str | Path, *, command: str | None = None) -> dict[str, str]:
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figs = _figures(an)
    doc = build(an, figs, command)
    title = f"ttscale eval: {an.manifest.get('model')} on {an.manifest.get('dataset')}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(doc.html)}</body></html>\n"
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    (out / "report.md").write_text("\n".join(doc.md).lstrip() + "\n", encoding="utf-8")
    for name, png in figs.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    (out / "profile.json").write_text(json.dumps(an.profile(), indent=1, allow_nan=False) + "\n")
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"), "profile": str(out / "profile.json")}
