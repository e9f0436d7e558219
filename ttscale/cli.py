"""``ttscale`` command line: serve models, run evaluations."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Test-time-scaling inference server on vLLM.")


def default_model_args() -> list[str]:
    """The embedded family: policy first (the default model), then verifier and draft."""
    from ttscale.models import DEFAULT_MODEL, DRAFT_MODEL, VERIFIER_MODEL, embedded_path

    names = [DEFAULT_MODEL, VERIFIER_MODEL, DRAFT_MODEL]
    return [n for n in names if (embedded_path(n) / "config.json").is_file()] or [DEFAULT_MODEL]


def build_pool(models: list[str] | None, *, dtype: str = "auto", max_model_len: int | None = None,
               kv_cache_gib: float | None = None, enforce_eager: bool | None = None, seed: int = 0):
    from ttscale.engine import ModelPool, build_engine, parse_model_arg

    specs = [parse_model_arg(m) for m in (models or default_model_args())]
    return ModelPool(build_engine(s, dtype=dtype, max_model_len=max_model_len,
                                  kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager, seed=seed)
                     for s in specs)


@app.command()
def serve(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m",
        help="Model to serve: an embedded name (ttscale-arith, ttscale-arith-draft, "
             "ttscale-arith-verifier), a local Hugging Face directory, NAME=DIR, or "
             "NAME=http://host:port[@upstream-id] for an OpenAI-compatible upstream. Repeat for "
             "several; the first generating model is the default. Default: the embedded family.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    dtype: Annotated[str, typer.Option(help="Weights dtype for vLLM (auto, float32, bfloat16, ...).")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(help="Context length cap.")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="CPU: KV cache GiB per model.")] = None,
    eager: Annotated[bool | None, typer.Option("--eager/--compile",
                                               help="Skip / use torch.compile (default: eager on CPU).")] = None,
    max_concurrent_requests: Annotated[int, typer.Option(help="Beyond this, requests get 429.")] = 256,
    budget_profile: Annotated[list[str] | None, typer.Option(
        help="NAME=PATH: budget profile (from `ttscale eval report`) for adaptive budgets of model NAME; "
             "default: the profile shipped for it, if any.")] = None,
    seed: Annotated[int, typer.Option(help="Engine seed.")] = 0,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
    keep_alive: Annotated[float, typer.Option(
        help="Seconds an idle client connection stays open. Longer than the pools of common clients "
             "(httpx, which the OpenAI SDK uses, drops idle connections after 5 s), so a client never "
             "sends a request on a connection the server is closing at that moment.")] = 75.0,
) -> None:
    """Start the OpenAI-compatible server."""
    import uvicorn

    from ttscale.server import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pool = build_pool(model, dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                      enforce_eager=eager, seed=seed)
    profiles = {}
    for item in budget_profile or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--budget-profile")
        profiles[name] = path
    api = create_app(pool, max_concurrent_requests=max_concurrent_requests, profiles=profiles)
    uvicorn.run(api, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5,
                timeout_keep_alive=keep_alive)


@app.command("models")
def list_models() -> None:
    """List the embedded models."""
    from ttscale.models import EMBEDDED_MODELS, embedded_path

    for name in EMBEDDED_MODELS:
        p = embedded_path(name)
        state = "ok" if (p / "config.json").is_file() else "missing"
        typer.echo(f"{name}\t{state}\t{p}")


def _add_eval_commands() -> None:
    try:
        from ttscale.eval.cli import app as eval_app
    except ImportError:  # the eval commands are not installed
        return
    app.add_typer(eval_app, name="eval", help="Batch evaluation, scaling-curve fits, reports.")


_add_eval_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
