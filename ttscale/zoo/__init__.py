"""The embedded model zoo: arithmetic task generator, tokenizer, training and measurement.

Importing this package is cheap: its submodules are loaded on first use, and
torch, transformers and vLLM only inside the functions that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EVAL_SEED": "tasks",
    "LEVELS": "tasks",
    "eval_set": "tasks",
    "extract_answer": "tasks",
    "generate": "tasks",
    "is_correct": "tasks",
    "signature": "tasks",
    "training_stream": "tasks",
    "CHAT_TEMPLATE": "tokenizer",
    "format_prompt": "tokenizer",
    "format_scored": "tokenizer",
    "render": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'ttscale.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ttscale.zoo.{mod}"), name)
