"""``ttscale`` command line: serve models, run evaluations."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from ttscale.engine import ModelPool, ModelSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Test-time-scaling inference server on vLLM.")


def default_model_args() -> list[str]:
    """The embedded family: policy first (the default model), then verifier and draft."""
    from ttscale.models import DEFAULT_MODEL, DRAFT_MODEL, VERIFIER_MODEL, embedded_path

    names = [DEFAULT_MODEL, VERIFIER_MODEL, DRAFT_MODEL]
    return [n for n in names if (embedded_path(n) / "config.json").is_file()] or [DEFAULT_MODEL]


def build_pool(
    models: list[str] | None,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    kv_cache_gib: float | None = None,
    enforce_eager: bool | None = None,
    seed: int = 0,
    engine_args: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    placement: str | None = None,
) -> ModelPool:
    """The served models: ``models`` (command-line ``--model`` values; default the embedded
    family) or a config file's ``models``, each with the vLLM ``engine_args`` given for all and
    its own on top.

    ``gpu_memory_utilization`` given for all models is the GPU share of the whole server, split
    by the memory plan; set per model (config file) it is that engine's own share.
    """
    from ttscale.engine import ModelPool, build_engine, parse_model_arg, with_engine_options
    from ttscale.engine.options import parse_engine_mapping

    common = dict(engine_args or {})
    specs: list[tuple[ModelSpec, dict[str, Any]]] = []
    if config and config.get("models"):
        if models:
            raise typer.BadParameter(
                "give models either with --model / MODEL or in the config file", param_hint="--model"
            )
        common = {**parse_engine_mapping(config.get("engine"), where="the config's engine"), **common}
        for i, m in enumerate(config["models"]):
            if isinstance(m, str):
                specs.append((parse_model_arg(m), {}))
                continue
            src = m.get("urls") or m.get("url") or m["path"]
            if isinstance(src, list):  # replicas of one model
                src = ",".join(map(str, src))
            spec = parse_model_arg(f"{m['name']}={src}" if m.get("name") else str(src))
            if m.get("replicas") is not None:
                if not isinstance(m["replicas"], dict) or not spec.is_upstream:
                    raise typer.BadParameter(
                        f"models[{i}].replicas is a mapping of replica options, for upstream URLs",
                        param_hint="--config",
                    )
                from dataclasses import replace

                spec = replace(spec, replica_options=tuple(m["replicas"].items()))
            if m.get("upstream_model"):
                from dataclasses import replace

                spec = replace(spec, upstream_model=m["upstream_model"])
            if m.get("role"):
                if m["role"] not in ("generate", "score"):
                    raise typer.BadParameter(f"models[{i}].role must be generate or score", param_hint="--config")
                from dataclasses import replace

                spec = replace(spec, role=m["role"])
            specs.append((spec, parse_engine_mapping(m.get("engine"), where=f"the config's models[{i}]")))
    else:
        if config and config.get("engine"):
            common = {**parse_engine_mapping(config["engine"], where="the config's engine"), **common}
        specs = [(parse_model_arg(m), {}) for m in (models or default_model_args())]
    in_process = [s for s, _ in specs if not s.is_upstream]
    share = None
    if len(in_process) > 1 and "gpu_memory_utilization" in common:
        share = float(common.pop("gpu_memory_utilization"))
    if "served_model_name" in common and len(specs) > 1:
        raise typer.BadParameter(
            "--served-model-name names one model; with several use NAME=PATH", param_hint="--served-model-name"
        )
    engines, aliases = [], {}
    for spec, own in specs:
        spec = with_engine_options(spec, {**common, **own})
        if placement is not None and spec.replicas and "placement" not in dict(spec.replica_options):
            from dataclasses import replace

            spec = replace(spec, replica_options=(*spec.replica_options, ("placement", placement)))
        engines.append(
            build_engine(
                spec,
                dtype=dtype,
                max_model_len=max_model_len,
                kv_cache_gib=kv_cache_gib,
                enforce_eager=enforce_eager,
                seed=seed,
            )
        )
        aliases.update({a: spec.name for a in spec.aliases})
    return ModelPool(engines, gpu_share=share, aliases=aliases)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to serve: an embedded name (ttscale-arith, ttscale-arith-draft, "
            "ttscale-arith-verifier), a local Hugging Face directory, NAME=DIR, or "
            "NAME=http://host:port[@upstream-id] for an OpenAI-compatible upstream, "
            "NAME=http://a:port,http://b:port[@upstream-id] for replicas of one model. Repeat for "
            "several; the first generating model is the default. A first bare argument "
            "(`ttscale serve DIR`) is taken as a model too. Default: the embedded family.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML or JSON file: models with per-model vLLM engine options (see ttscale.engine.options)."),
    ] = None,
    placement: Annotated[
        str,
        typer.Option(
            help="Where the candidates of a request to a replicated model run, unless the request says "
            "(ttscale.placement): 'auto' (the prompt's replica by rendezvous hashing, overflowing to the "
            "next when it holds more than its share of the load; spread over replicas under a deadline), "
            "'affinity' (all on the prompt's replica), 'spread' (split over the replicas), 'round_robin'."
        ),
    ] = "auto",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    kv_cache_gib: Annotated[float | None, typer.Option(help="CPU: KV cache GiB per model.")] = None,
    eager: Annotated[
        bool | None,
        typer.Option(
            "--eager/--compile",
            help="Skip / use torch.compile and CUDA graphs (default: eager on CPU, compiled on GPU).",
        ),
    ] = None,
    max_concurrent_requests: Annotated[
        int, typer.Option(min=1, help="Beyond this, requests queue (--max-queued-requests) or get 429.")
    ] = 256,
    max_queued_requests: Annotated[
        int,
        typer.Option(
            min=0, help="Requests beyond the concurrency limit that wait for a slot, first come first served."
        ),
    ] = 0,
    queue_timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds a queued request waits for a slot before it gets 429.")
    ] = 30.0,
    budget_profile: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PATH: budget profile (from `ttscale eval report`) for adaptive budgets of model NAME; "
            "repeat for profiles fitted on several prompt formats (a request gets the one of its format, else "
            "the first); default: the profile shipped for it, if any."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
    keep_alive: Annotated[
        float,
        typer.Option(
            help="Seconds an idle client connection stays open. Longer than the pools of common clients "
            "(httpx, which the OpenAI SDK uses, drops idle connections after 5 s), so a client never "
            "sends a request on a connection the server is closing at that moment."
        ),
    ] = 75.0,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="A key clients must send as 'Authorization: Bearer <key>' (repeat for several; also "
            "$TTSCALE_API_KEY, comma-separated). Without any key the server is open: bind it to loopback."
        ),
    ] = None,
    api_key_file: Annotated[
        list[Path] | None, typer.Option(help="File of API keys, one per line ('#' starts a comment).")
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option("--public-metrics", help="With API keys: serve /metrics without a key.")
    ] = False,
    public_docs: Annotated[
        bool, typer.Option("--public-docs", help="With API keys: serve /docs and /openapi.json without a key.")
    ] = False,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="Browser origin allowed to call the API (repeat; '*' for any).")
    ] = None,
    max_request_bytes: Annotated[
        int, typer.Option(min=1, help="Request bodies beyond this many bytes get 413 before they are parsed.")
    ] = 16 << 20,
    on_engine_death: Annotated[
        str,
        typer.Option(
            help="When an engine process dies: 'exit' (the server stops with exit code 4, so a supervisor "
            "restarts it) or 'stay' (it keeps serving its other models; /health answers 503)."
        ),
    ] = "exit",
    shutdown_grace: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="On SIGTERM: seconds the requests in flight have to finish (no new ones are admitted); "
            "those still running then get a 503 'shutting_down' error (streams: a final error event).",
        ),
    ] = 20.0,
    help_engine: Annotated[bool, typer.Option("--help-engine", help="Show vLLM's engine options and exit.")] = False,
) -> None:
    """Start the OpenAI-compatible server.

    Every other option is a vLLM engine option (`--tensor-parallel-size 2`,
    `--gpu-memory-utilization 0.5`, `--max-num-seqs 64`, `--quantization awq`, `--kv-cache-dtype fp8`,
    `--served-model-name`, `--trust-remote-code`, ...: see --help-engine), applied to every model
    served in-process.
    """
    from ttscale.engine.options import engine_help, load_config, parse_engine_cli
    from ttscale.errors import ConfigError
    from ttscale.server.auth import load_api_keys

    if help_engine:
        typer.echo(engine_help())
        raise typer.Exit()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_args, bare = parse_engine_cli(list(ctx.args))  # `ttscale serve MODEL [vLLM options]`
        models = bare + list(model or [])
        cfg = load_config(config) if config is not None else None
        from ttscale.engine.base import PLACEMENTS

        if placement not in PLACEMENTS:
            raise ConfigError(f"--placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
        pool = build_pool(
            models or None,
            kv_cache_gib=kv_cache_gib,
            enforce_eager=eager,
            engine_args=engine_args,
            config=cfg,
            placement=placement,
        )
        keys = load_api_keys(api_key or [], api_key_file or [])
        if on_engine_death not in ("exit", "stay"):
            raise ConfigError(f"--on-engine-death must be 'exit' or 'stay', not {on_engine_death!r}")
    except ConfigError as e:
        typer.echo(f"Error: {e.message}", err=True)
        raise typer.Exit(2) from None
    profiles: dict[str, list[str]] = {}
    for item in budget_profile or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--budget-profile")
        profiles.setdefault(name, []).append(path)
    run_server(
        pool,
        host=host,
        port=port,
        log_level=log_level,
        keep_alive=keep_alive,
        max_concurrent_requests=max_concurrent_requests,
        max_queued_requests=max_queued_requests,
        queue_timeout_s=queue_timeout,
        profiles=profiles,
        api_keys=keys,
        public_metrics=public_metrics,
        public_docs=public_docs,
        cors_origins=cors_origin or [],
        max_request_bytes=max_request_bytes,
        exit_on_engine_death=on_engine_death == "exit",
        shutdown_grace_s=shutdown_grace,
    )


def run_server(
    pool: ModelPool,
    *,
    host: str,
    port: int,
    log_level: str,
    keep_alive: float,
    max_concurrent_requests: int,
    profiles: dict[str, list[str]],
    max_queued_requests: int = 0,
    queue_timeout_s: float = 30.0,
    api_keys: Sequence[str] = (),
    public_metrics: bool = False,
    public_docs: bool = False,
    cors_origins: Sequence[str] = (),
    max_request_bytes: int = 16 << 20,
    exit_on_engine_death: bool = True,
    shutdown_grace_s: float = 20.0,
) -> None:
    """Serve ``pool``; a startup failure of the engines (e.g. models that do not fit the GPU)
    ends the process with a one-paragraph error, not a traceback."""
    import uvicorn

    from ttscale.errors import ConfigError
    from ttscale.server import create_app

    died: list[str] = []

    def engine_died(names: list[str]) -> None:  # uvicorn then shuts down gracefully
        died.extend(names)
        server.should_exit = True

    api = create_app(
        pool,
        max_concurrent_requests=max_concurrent_requests,
        max_queued_requests=max_queued_requests,
        queue_timeout_s=queue_timeout_s,
        profiles=profiles,
        api_keys=api_keys,
        public_metrics=public_metrics,
        public_docs=public_docs,
        cors_origins=cors_origins,
        max_request_bytes=max_request_bytes,
        on_engine_death=engine_died if exit_on_engine_death else None,
    )
    if not api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("serving on %s without API keys: anyone who reaches it can use it", host)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            api.state.drain.begin(shutdown_grace_s)  # no new requests; those in flight end by the grace
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(
            api,
            host=host,
            port=port,
            log_level=log_level.lower(),
            # beyond the grace the drain answers what is left with 503s; uvicorn cancels only stragglers
            timeout_graceful_shutdown=int(shutdown_grace_s) + 5,
            timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # uvicorn annotates int; any timeout works
        )
    )
    try:
        pool.plan()  # the GPU memory plan, before anything starts: a clear error if it cannot fit
    except ConfigError as e:
        typer.echo(f"Error: {e.message}", err=True)
        raise typer.Exit(2) from None
    server.run()
    if not server.started:  # an engine failed to start (logged above)
        raise typer.Exit(3)
    if died:
        typer.echo(
            f"Error: the engine of {', '.join(died)} stopped; the server exits (--on-engine-death exit)", err=True
        )
        raise typer.Exit(4)


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
