"""Prompt formats of an evaluation run: an optional system prompt and a user-message template.

The user message of problem p is the template with ``{problem}`` replaced by p's statement
(plain replacement, not ``str.format``: the template may hold LaTeX braces such as
``\\boxed{}``). The template must hold ``{problem}`` exactly once.

Defaults, by dataset name:

* ``math500``, ``aime24``, ``aime25``, ``amc23``, ``gsm8k``: the ``boxed`` preset, the Qwen-style
  instruction after the problem, no system prompt::

      {problem}

      Please reason step by step, and put your final answer within \\boxed{}.

* every other set (``arith500``, JSONL files, Hugging Face ids): the ``plain`` preset, the problem
  alone (what the embedded ``ttscale-arith`` models were trained on).

The format is recorded in the run's manifest (``run.json``, key ``prompt``), shown in the report
and stored in the budget profile: a run resumes only with the same format, since samples drawn
with two prompts would be mixed in one record set, and a profile's curves hold for requests
written in the format they were measured with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOXED",
    "BOXED_SETS",
    "PLACEHOLDER",
    "PLAIN",
    "PRESETS",
    "PromptFormat",
    "default_prompt",
    "resolve_prompt",
    "unescape",
]

PLACEHOLDER = "{problem}"
BOXED = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
PLAIN = "{problem}"
#: Names ``--prompt-template`` accepts in place of a template.
PRESETS = {"boxed": BOXED, "plain": PLAIN}
#: Packaged sets whose default template is the ``boxed`` preset.
BOXED_SETS = ("math500", "aime24", "aime25", "amc23", "gsm8k")


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes chat messages: ``system`` (or none) and the user ``template``."""

    template: str = PLAIN
    system: str | None = None

    def __post_init__(self) -> None:
        n = self.template.count(PLACEHOLDER)
        if n != 1:
            where = "does not contain" if n == 0 else f"contains {n} times"
            raise ValueError(
                f"--prompt-template {where} {PLACEHOLDER} (it must hold it exactly once, where the problem "
                f"goes), got {self.template!r}; presets: {', '.join(PRESETS)}"
            )
        if self.system is not None and not self.system.strip():
            raise ValueError("--system-prompt is blank: give a text, or leave the option out for no system prompt")

    def user(self, problem: str) -> str:
        return self.template.replace(PLACEHOLDER, problem)

    def messages(self, problem: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*msgs, {"role": "user", "content": self.user(problem)}]

    @property
    def preset(self) -> str | None:
        """The preset name of this format (no system prompt, a preset template), else None."""
        if self.system is not None:
            return None
        return next((name for name, t in PRESETS.items() if t == self.template), None)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "template": self.template}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PromptFormat:
        """Inverse of :meth:`to_dict`; ``None`` (a run recorded before prompts were recorded,
        when the problem alone was the user message) gives the plain format."""
        if d is None:
            return cls()
        return cls(template=str(d.get("template", PLAIN)), system=d.get("system"))


def default_prompt(dataset: str) -> PromptFormat:
    """The default format of a dataset name (see the module docstring)."""
    return PromptFormat(BOXED if dataset in BOXED_SETS else PLAIN)


def resolve_prompt(dataset: str, template: str | None = None, system: str | None = None) -> PromptFormat:
    """The format of a run: ``template`` (a preset name or a template; None: the dataset's
    default) and ``system`` (None or empty: no system prompt)."""
    base = default_prompt(dataset)
    tmpl = base.template if template is None else PRESETS.get(template, template)
    return PromptFormat(tmpl, system or None)


_ESCAPE = re.compile(r"\\([\\n])")


def unescape(text: str) -> str:
    """Command-line text with ``\\n`` as a line break and ``\\\\`` as one backslash (nothing
    else changes: ``\\boxed{}`` stays as written; write ``\\\\neq`` for a literal ``\\neq``)."""
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", text)
