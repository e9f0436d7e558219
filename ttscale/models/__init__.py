"""Embedded models shipped as package data, found by name or by path.

``resolve_model("ttscale-arith")`` returns the directory of the embedded
policy; ``resolve_model("/some/dir")`` returns that directory when it holds a
``config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent

DEFAULT_MODEL = "ttscale-arith"
DRAFT_MODEL = "ttscale-arith-draft"
VERIFIER_MODEL = "ttscale-arith-verifier"
EMBEDDED_MODELS: tuple[str, ...] = (DEFAULT_MODEL, DRAFT_MODEL, VERIFIER_MODEL)


def embedded_path(name: str) -> Path:
    """Directory of an embedded model (whether or not it exists)."""
    return MODELS_DIR / name


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Directory of an embedded model name or of a local model directory.

    Raises ``ttscale.errors.ModelNotFoundError`` when neither applies.
    """
    from ttscale.errors import ModelNotFoundError

    s = os.fspath(name_or_path)
    if s in EMBEDDED_MODELS:
        p = embedded_path(s)
        if (p / "config.json").is_file():
            return p
        raise ModelNotFoundError(f"embedded model {s!r} is missing its files under {p}")
    p = Path(s).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    if p.is_dir():
        raise ModelNotFoundError(f"{s!r} is a directory without config.json")
    raise ModelNotFoundError(
        f"unknown model {s!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local model directory"
    )
