"""Compute budgets of a request: samples, tokens, deadline, or ``auto``.

``tokens`` bounds every token the request makes a model process beyond the user's own
prompt: completion tokens of every candidate and round (aborted ones included) plus the
tokens scorers and judges read and write. It is a hard limit: the sampler reserves each
candidate's ``max_tokens`` against it before launching, so it can never be exceeded.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ttscale.errors import InvalidRequestError


class Budget(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    samples: int | None = Field(default=None, ge=1, le=4096)
    tokens: int | None = Field(default=None, ge=1)
    deadline_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    target_accuracy: float | None = Field(default=None, gt=0.0, lt=1.0)
    auto: bool = False

    @property
    def deadline_s(self) -> float | None:
        return None if self.deadline_ms is None else self.deadline_ms / 1000.0


def parse_budget(value: Any, *, param: str = "ttscale.budget") -> Budget:
    """``None`` / ``"auto"`` / a mapping of the fields above."""
    if value is None:
        return Budget()
    if isinstance(value, str):
        if value == "auto":
            return Budget(auto=True)
        raise InvalidRequestError(f"budget must be an object or 'auto', not {value!r}", param=param)
    if isinstance(value, Budget):
        return value
    if not isinstance(value, dict):
        raise InvalidRequestError("budget must be an object or 'auto'", param=param)
    try:
        return Budget(**value)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InvalidRequestError(
            f"invalid budget: {loc}: {err['msg']}", param=f"{param}.{loc}" if loc else param
        ) from None
    except TypeError as e:
        raise InvalidRequestError(f"invalid budget: {e}", param=param) from None
