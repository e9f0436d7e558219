"""The import graph: the library never reaches the server or the eval package, strategies meet
only through the registry and their shared machinery, the run types depend on no strategy."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"none", "best_of_n", "voting", "rpc", "auto", "temperature_sweep", "refine", "speculative"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = {"server": "ttscale.server", "eval": "ttscale.eval"}.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (lazy imports count)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}"))  # `from pkg import mod`
    return out


def _exists(module: str) -> bool:
    parts = module.split(".")
    if parts[0] != "ttscale":
        return False
    top = {"server": "server", "eval": "eval"}.get(parts[1], "ttscale") if len(parts) > 1 else "ttscale"
    rest = parts[2:] if top != "ttscale" else parts[1:]
    base = ROOT.joinpath(top, *rest)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def graph(top: str) -> dict[str, set[str]]:
    return {_module(p): imports_of(p) for p in sorted((ROOT / top).rglob("*.py"))}


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    # the checker itself: an import inside a function is found
    g = graph("ttscale")
    assert "ttscale.scorers" in g["ttscale.strategies.parallel"]
    assert "vllm" in set().union(*g.values())  # vLLM is imported lazily, inside functions


def test_library_imports_neither_server_nor_eval():
    # ttscale.cli is the application: the one module that puts library, server and eval together
    bad = {
        m: sorted(i for i in imps if i.startswith(("ttscale.server", "ttscale.eval", "server", "eval")))
        for m, imps in graph("ttscale").items()
        if m != "ttscale.cli"
    }
    assert {m: v for m, v in bad.items() if v} == {}


def test_strategies_meet_only_through_the_registry():
    g = graph("ttscale")
    for name in STRATEGIES:
        mod = f"ttscale.strategies.{name}"
        others = {f"ttscale.strategies.{o}" for o in STRATEGIES - {name}}
        assert not (g[mod] & others), (mod, sorted(g[mod] & others))


def test_run_types_and_scorers_depend_on_no_strategy():
    g = graph("ttscale")
    for mod in ("ttscale.run", "ttscale.scorers", "ttscale.engine", "ttscale.budget", "ttscale.answers"):
        assert not any(i.startswith("ttscale.strategies") for i in g[mod]), (mod, sorted(g[mod]))
    assert not any(i.startswith("ttscale.scorers") for i in g["ttscale.run"])


def test_server_reaches_strategies_only_through_the_registry():
    for mod, imps in graph("server").items():
        inner = {i for i in imps if i.startswith("ttscale.strategies.")}
        assert not inner, (mod, sorted(inner))
