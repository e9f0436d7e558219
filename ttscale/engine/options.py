"""vLLM engine options, taken from vLLM's own engine-argument definitions.

``ttscale serve MODEL --tensor-parallel-size 2 --max-num-seqs 64`` passes every option ttscale
does not define itself to vLLM's ``AsyncEngineArgs`` parser, so the accepted names, types,
choices and help are those of the installed vLLM. A config file (YAML or JSON) gives options
per model; its values go through the same parser::

    models:
      - name: qwen
        path: /models/qwen2.5-1.5b-instruct
        engine: {max_num_seqs: 128, kv_cache_dtype: fp8}
      - name: prm
        path: /models/prm
        role: score
        engine: {gpu_memory_utilization: 0.08}
      - name: big                          # replicas of one model elsewhere
        urls: [http://gpu1:8000, http://gpu2:8000]
        upstream_model: qwen-72b
        replicas: {placement: affinity, retries: 2}
    engine: {max_model_len: 8192}          # every model

Only options the user set are returned: ttscale fills in what it picks per machine, and vLLM
the rest. vLLM is imported on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError

# Engine arguments ttscale sets itself from the model spec; setting them as options is an error.
OWNED = frozenset({"model", "runner"})


@lru_cache(maxsize=1)
def _parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="ttscale", description="vLLM engine options"))
    defaults = vars(parser.parse_args([]))
    return parser, defaults


def engine_help() -> str:
    """vLLM's own help text of its engine options (what ``ttscale serve --help-engine`` prints)."""
    return _parser()[0].format_help()


def parse_engine_args(tokens: list[str], *, where: str = "the command line") -> dict[str, Any]:
    """The engine options that ``tokens`` (command-line words) set, by vLLM field name.

    Raises :class:`ConfigError` naming the offending option, with vLLM's own message.
    """
    return parse_engine_cli(tokens, where=where, positionals=0)[0]


def parse_engine_cli(
    tokens: list[str], *, where: str = "the command line", positionals: int = 1
) -> tuple[dict[str, Any], list[str]]:
    """Like :func:`parse_engine_args`, also returning up to ``positionals`` bare words that name a
    model (the ``MODEL`` of ``ttscale serve MODEL --opt ...``: the first word, or an existing
    directory / embedded model name anywhere). The rest goes through vLLM's own parser as it is
    (``--max_num_seqs``, ``--compilation-config.mode 3`` and ``-O3`` forms included); an option
    counts as set when it is given, even at vLLM's default value."""
    if not tokens:
        return {}, []
    from ttscale.models import EMBEDDED_MODELS

    parser, defaults = _parser()
    bare: list[str] = []
    rest: list[str] = []
    for i, t in enumerate(tokens):
        model_like = not t.startswith("-") and (
            i == 0 or t in EMBEDDED_MODELS or ("/" in t and Path(t).expanduser().is_dir())
        )
        if model_like and len(bare) < positionals:
            bare.append(t)
        else:
            rest.append(t)
    unset = object()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = vars(parser.parse_args(rest, namespace=argparse.Namespace(**{k: unset for k in defaults})))
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        # argparse's last line, less its "PROG: error: " head (the parser serves every command)
        why = msg[-1].split(": error: ", 1)[-1] if msg else " ".join(tokens)
        raise ConfigError(
            f"bad vLLM engine option in {where}: {why}",
            param=next((t for t in tokens if t.startswith("-")), None),
        ) from None
    explicit = {k: v for k, v in ns.items() if v is not unset}
    owned = OWNED & set(explicit)
    if owned:
        raise ConfigError(
            f"--{sorted(owned)[0].replace('_', '-')} is set by ttscale from the model "
            f"argument; give the model as MODEL or --model NAME=PATH",
            param=sorted(owned)[0],
        )
    return explicit, bare


def to_tokens(options: dict[str, Any], *, where: str) -> list[str]:
    """Command-line words for a mapping of options (config files), so they are parsed, typed and
    checked by vLLM's parser exactly as on the command line."""
    parser, _ = _parser()
    actions = {s: a for a in parser._actions for s in a.option_strings}
    words: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None:
            raise ConfigError(f"unknown vLLM engine option {key!r} in {where}", param=str(key))
        if value is None:
            continue
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                words.append(flag if value else "--no-" + flag[2:])
            elif action.nargs == 0:  # store_true
                if value:
                    words.append(flag)
            else:
                words += [flag, str(value).lower()]
        elif isinstance(value, (list, tuple)):
            if action.nargs in ("+", "*") or isinstance(action.nargs, int):
                words += [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
            else:
                words += [flag, json.dumps(value)]
        elif isinstance(value, dict):
            words += [flag, json.dumps(value)]
        else:
            words += [flag, str(value)]
    return words


def parse_engine_mapping(options: dict[str, Any] | None, *, where: str) -> dict[str, Any]:
    if not options:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: engine options must be a mapping, got {type(options).__name__}")
    return parse_engine_args(to_tokens(options, where=where), where=where)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON serve config (see the module docstring)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}", param="--config") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(
            f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}", param="--config"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top", param="--config")
    unknown = set(data) - {"models", "engine"}
    if unknown:
        raise ConfigError(
            f"config file {p}: unknown key {sorted(unknown)[0]!r} (expected models, engine)", param="--config"
        )
    models = data.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"config file {p}: 'models' must be a list", param="--config")
    for i, m in enumerate(models):
        if isinstance(m, str):
            continue
        if not isinstance(m, dict) or not ({"path", "url", "urls"} & set(m)):
            raise ConfigError(f"config file {p}: models[{i}] needs a 'path' (or 'url', 'urls')", param="--config")
        bad = set(m) - {"name", "path", "url", "urls", "upstream_model", "role", "engine", "replicas"}
        if bad:
            raise ConfigError(f"config file {p}: models[{i}] has unknown key {sorted(bad)[0]!r}", param="--config")
    return data
