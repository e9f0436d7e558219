"""``ttscale eval``: ``run`` (sample and record), ``fit`` (scaling-curve fits), ``report``
(HTML + Markdown report and the budget profile).

    ttscale eval run arith500 --model ttscale-arith --verifier ttscale-arith-verifier -k 64 --out runs/arith
    ttscale eval fit runs/arith
    ttscale eval report runs/arith --out eval/reports/ttscale-arith-arith500

Importing this module loads neither vLLM nor torch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch evaluation, scaling-curve fits, reports.")


ENGINE_EPILOG = (
    "Every other option is a vLLM engine option of the models run in-process (`--gpu-memory-utilization 0.45`, "
    "`--tensor-parallel-size 2`, `--max-model-len 8192`, `--kv-cache-dtype fp8`, ...: see --help-engine)."
)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
HelpEngineOpt = Annotated[bool, typer.Option("--help-engine", help="Show vLLM's engine options and exit.")]


def _engine_options(ctx: typer.Context, help_engine: bool) -> dict[str, Any]:
    """The vLLM engine options among the command's extra words (exit 2 naming a bad one)."""
    from ttscale.engine.options import engine_help, parse_engine_args
    from ttscale.errors import ConfigError

    if help_engine:
        typer.echo(engine_help())
        raise typer.Exit()
    try:
        return parse_engine_args(list(ctx.args))
    except ConfigError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(2) from None


@app.command(context_settings=EXTRA, epilog=ENGINE_EPILOG)
def run(
    ctx: typer.Context,
    dataset: Annotated[
        str,
        typer.Argument(
            help="arith500 | math500 | aime24 | aime25 | amc23 | gsm8k, a JSONL path, or a Hugging "
            "Face dataset id (hf:OWNER/NAME[:SPLIT])."
        ),
    ] = "arith500",
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help=(
                "Policy: embedded name, local directory, or NAME=http://host:port[@upstream-id] for a "
                "running OpenAI-compatible server."
            ),
        ),
    ] = "ttscale-arith",
    verifier: Annotated[
        str | None, typer.Option(help="Scoring model (same forms as --model); its P(correct) is recorded per sample.")
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Samples per problem.")] = 16,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default runs/<model>-<dataset>-k<K>).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed (sample seeds derive from it).")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Completion token cap per sample.")] = 512,
    batch: Annotated[int | None, typer.Option(help="Samples per fan-out (default: all K).")] = None,
    concurrency: Annotated[int, typer.Option(help="Problems in flight.")] = 8,
    limit: Annotated[int | None, typer.Option(help="Only this many problems, spread over the set.")] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Directory of <name>.jsonl files replacing the packaged sets (default $TTSCALE_DATA_DIR)."),
    ] = None,
    keep_text: Annotated[bool, typer.Option("--keep-text/--no-text", help="Store completion texts.")] = True,
    kv_cache_gib: Annotated[float | None, typer.Option(help="CPU: KV cache GiB per model.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="vLLM max_num_seqs.")] = None,
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="User message: 'boxed' (the problem, then 'Please reason step by step, and put your final "
            "answer within \\boxed{}.'), 'plain' (the problem alone), or a template holding {problem} once "
            "(\\n is a line break, \\\\ a backslash). Default: boxed for math500, aime24, aime25, amc23 and "
            "gsm8k, plain otherwise."
        ),
    ] = None,
    system_prompt: Annotated[
        str | None, typer.Option(help="System message before each problem (\\n is a line break); default none.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Continue a run directory with a different configuration (never a different prompt)."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    help_engine: HelpEngineOpt = False,
) -> None:
    """Draw K samples per problem once and record them (resumable: rerun to continue)."""
    from ttscale.eval.prompts import unescape
    from ttscale.eval.runner import RunConfig, run_sync
    from ttscale.eval.store import ConfigMismatch

    engine = _engine_options(ctx, help_engine)
    logging.basicConfig(level=logging.WARNING)
    cfg = RunConfig(
        dataset=dataset,
        model=model,
        verifier=verifier,
        k=k,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        batch=batch,
        concurrency=concurrency,
        keep_text=keep_text,
        limit=limit,
        data_dir=data_dir,
        kv_cache_gib=kv_cache_gib,
        max_num_seqs=max_num_seqs,
        prompt_template=None if prompt_template is None else unescape(prompt_template),
        system_prompt=None if system_prompt is None else unescape(system_prompt),
        engine=tuple(engine.items()),
    )
    if out is None:
        name = Path(dataset).stem if dataset.endswith((".jsonl", ".json")) else dataset.replace("/", "_")
        out = Path("runs") / f"{Path(model.split('=')[0]).name}-{name}-k{k}"
    try:
        summary = run_sync(cfg, out, progress=False if quiet else None, force=force)
    except (ConfigMismatch, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps(summary))


@app.command(context_settings=EXTRA, epilog=ENGINE_EPILOG)
def rescore(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A run recorded with completion texts.")],
    verifier: Annotated[
        str, typer.Option(help="Scoring model: embedded name, local directory, or NAME=http://host:port.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New run directory.")],
    concurrency: Annotated[int, typer.Option(help="Problems in flight.")] = 4,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Directory of <name>.jsonl files replacing the packaged sets (default $TTSCALE_DATA_DIR)."),
    ] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="CPU: KV cache GiB.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="vLLM max_num_seqs.")] = None,
    force: Annotated[bool, typer.Option(help="Continue an output directory with a different configuration.")] = False,
    help_engine: HelpEngineOpt = False,
) -> None:
    """Score a run's recorded samples with another verifier (no sample is redrawn; resumable)."""
    from ttscale.eval.runner import rescore_sync
    from ttscale.eval.store import ConfigMismatch

    engine = _engine_options(ctx, help_engine)
    logging.basicConfig(level=logging.WARNING)
    try:
        summary = rescore_sync(
            run_dir,
            out,
            verifier,
            data_dir=data_dir,
            concurrency=concurrency,
            kv_cache_gib=kv_cache_gib,
            max_num_seqs=max_num_seqs,
            engine_options=engine,
            force=force,
        )
    except (ConfigMismatch, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps(summary))


# analysis options shared by `fit` and `report`
CostOpt = Annotated[
    float, typer.Option(help="Cost of 1000 generated tokens in units of the value of one correct answer.")
]
NBootOpt = Annotated[int, typer.Option(help="Bootstrap resamples.")]
RpcDrawsOpt = Annotated[int, typer.Option(help="Random k-subsets per problem and k for RPC (0: skip RPC).")]
RpcPruneOpt = Annotated[bool, typer.Option(help="RPC with reasoning pruning (a mixture fit per subset: slow).")]


@app.command()
def fit(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ttscale eval run`.")],
    out: Annotated[Path | None, typer.Option(help="Write the analysis JSON here (default <run>/fit.json).")] = None,
    cost_per_1k_tokens: CostOpt = 0.05,
    n_boot: NBootOpt = 1000,
    rpc_draws: RpcDrawsOpt = 2,
    rpc_prune: RpcPruneOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Metrics vs k with bootstrap CIs and the fits (coverage power law, ceilings, saturation)."""
    from ttscale.eval.analysis import analyse_run, summary_lines

    res = analyse_run(
        run_dir, cost_per_1k_tokens=cost_per_1k_tokens, n_boot=n_boot, rpc_draws=rpc_draws, rpc_prune=rpc_prune
    )
    path = out or Path(run_dir) / "fit.json"
    path.write_text(json.dumps(res.to_json(), indent=1, allow_nan=False) + "\n")
    if not quiet:
        for line in summary_lines(res):
            typer.echo(line)
    typer.echo(f"wrote {path}", err=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ttscale eval run`.")],
    out: Annotated[Path | None, typer.Option(help="Report directory (default <run>/report).")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="Also copy the budget profile JSON here (e.g. eval/profiles/<model>.json).")
    ] = None,
    cost_per_1k_tokens: CostOpt = 0.05,
    n_boot: NBootOpt = 1000,
    rpc_draws: RpcDrawsOpt = 2,
    rpc_prune: RpcPruneOpt = False,
    command: Annotated[str | None, typer.Option(help="Command line shown in the report.")] = None,
) -> None:
    """Self-contained HTML report, Markdown report and the budget profile (profile.json)."""
    from ttscale.eval.analysis import analyse_run
    from ttscale.eval.report import write_report

    res = analyse_run(
        run_dir, cost_per_1k_tokens=cost_per_1k_tokens, n_boot=n_boot, rpc_draws=rpc_draws, rpc_prune=rpc_prune
    )
    out_dir = out or Path(run_dir) / "report"
    paths = write_report(res, out_dir, command=command or " ".join(["ttscale", "eval", "report", *sys.argv[3:]]))
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(Path(paths["profile"]).read_text())
        paths["profile_copy"] = str(profile)
    typer.echo(json.dumps(paths))
