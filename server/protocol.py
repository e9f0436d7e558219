"""OpenAI request shapes (the fields ttscale honours), validated with pydantic.

Unknown top-level fields are ignored, as OpenAI-compatible servers do; the ``ttscale``
object is validated by the strategy it names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

MAX_N = 256
MAX_STOP = 16
MAX_TOKEN_ID = 2**31  # beyond any vocabulary


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None, info: ValidationInfo) -> str | list[TextPart] | None:
        # as OpenAI's API: only an assistant message may leave its content out (null)
        role = info.data.get("role")
        if v is None and role is not None and role != "assistant":
            raise ValueError(f"a {role} message needs content")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    # vLLM's extension: each choice's chunk carries that choice's usage so far
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, lt=2**31)
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    user: str | None = None
    ttscale: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty")
        for s in items:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("stop sequences must be valid Unicode (no lone surrogates)") from None
        return items


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return v

    @field_validator("continue_final_message")
    @classmethod
    def _continue(cls, v: bool, info: ValidationInfo) -> bool:
        msgs = info.data.get("messages")
        if v and msgs and msgs[-1].role != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        return v

    _max_tokens_param: str = PrivateAttr(default="max_tokens")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
            self._max_tokens_param = "max_completion_tokens"
        return self

    @property
    def max_tokens_param(self) -> str:
        """The parameter the client set the completion length with."""
        return self._max_tokens_param

    def message_dicts(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[Annotated[int, Field(ge=0, lt=MAX_TOKEN_ID)]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("send one prompt per request (a list of one string is fine)")
                return v[0]
        elif v == "":
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_input(self) -> str | list[int]:
        """The prompt as validated: one string or token ids (a list of one string is unpacked)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if p and isinstance(p[0], str):
            return str(p[0])
        return [int(t) for t in p]


# -- responses (published in /openapi.json; the bodies are built by ttscale.server.render) -------


class PromptTokensDetailsOut(BaseModel):
    cached_tokens: int = Field(description="of prompt_tokens, those served from an engine's prefix cache")


class UsageOut(BaseModel):
    """OpenAI's usage: each fan-out's prompt counted once, however many candidates share it."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetailsOut | None = Field(
        default=None, description="where the engines reported their prefix-cache hits"
    )


class ModelUsageOut(BaseModel):
    """One model's tokens: billed (as OpenAI's usage) and the engine's work."""

    prompt_tokens: int
    completion_tokens: int
    aborted_tokens: int = Field(description="of completion_tokens, those of aborted candidates")
    requests: int = Field(description="engine requests: one per candidate, per verifier or target read")
    redrawn: int = Field(default=0, description="candidates redrawn on another replica after theirs was lost")
    prefill_tokens: int = Field(description="the prompt tokens of every engine request (K per fan-out of K)")
    cached_prefill_tokens: int | None = Field(
        description="of prefill_tokens, those the prefix cache served (null: the engine did not say)"
    )
    decode_tokens: int = Field(description="tokens generated, aborted candidates' included")
    cached_prompt_tokens: int | None = Field(description="of prompt_tokens, those the prefix cache served")


class UsageDetailOut(BaseModel):
    """The ``ttscale.usage`` object: totals of the engine's work and every model's usage."""

    aborted_tokens: int
    prefill_tokens: int
    cached_prefill_tokens: int | None
    decode_tokens: int
    models: dict[str, ModelUsageOut]


class SampleOut(BaseModel):
    """One drawn sample (``ttscale.return_samples``)."""

    model_config = ConfigDict(extra="allow")  # per-strategy details: answer, cluster, score, role
    index: int
    text: str
    finish_reason: str | None
    tokens: int
    mean_logprob: float | None


class TTScaleOut(BaseModel):
    """What the request's strategy did and spent."""

    model_config = ConfigDict(extra="allow")  # strategy-specific details (votes, waves, ...)
    strategy: str
    samples_used: int
    stop_reason: str
    selected_index: int | None
    answer: str | None = None
    scores: list[float | None] | None = None
    budget: dict[str, Any] = Field(description="the request's budget")
    budget_in_effect: dict[str, Any] | None = Field(
        default=None, description="the budget the strategy ran under, where it differs (auto)"
    )
    usage: UsageDetailOut = Field(description="prefill, cached and decode tokens; per-model usage")
    elapsed_ms: float
    samples: list[SampleOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoiceOut(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoiceOut]
    usage: UsageOut
    ttscale: TTScaleOut


class CompletionChoiceOut(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoiceOut]
    usage: UsageOut
    ttscale: TTScaleOut
