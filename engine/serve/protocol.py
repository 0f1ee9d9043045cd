"""The OpenAI wire format: request models that validate at the boundary, response shapes, error bodies.

Field names, ranges and defaults follow OpenAI's API reference and vLLM's extensions (`top_k`, `min_p`,
`repetition_penalty`, `chat_template_kwargs`, `return_tokens_as_token_ids`). Unknown fields are ignored, as vLLM
does. As in the OpenAI API: types are strict (`"10"` is not an integer, `1.0` is not one either, `0` is not a
boolean); an explicit null in an optional field means its default (SDKs and proxies send nulls); system,
developer, user and tool messages need content, an assistant message content or tool calls. Every float must be
finite: JSON's NaN/Infinity are refused here, never reach sampling. Checks that need the model (`logit_bias` ids
inside the vocabulary) read `vocab_size` from the validation context.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticUseDefault

MAX_SEED = 2 ** 64 - 1
MAX_TOP_LOGPROBS = 20
MAX_TOKEN_ID_DIGITS = 12  # longer logit_bias keys cannot be a token id (and int() of 5,000 digits raises)


def _null_is_default(value):
    if value is None:
        raise PydanticUseDefault()
    return value


NullIsDefault = BeforeValidator(_null_is_default)  # an optional field whose explicit null means its default


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class FieldError(ValueError):
    """A check across fields, reported against the field to change (`param` of the 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _thinking_switch(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and not isinstance(value.get("enable_thinking", True), bool):
        raise ValueError("enable_thinking must be true or false")
    return value


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: Annotated[str | dict, NullIsDefault] = "{}"


class ToolCall(OpenAIModel):
    id: Annotated[str, NullIsDefault] = ""
    type: Annotated[Literal["function"], NullIsDefault] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # before `content`: its check reads them
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    reasoning_content: str | None = None
    tool_call_id: str | None = None  # not required (as in vLLM): Qwen3's template does not use it
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value, info: ValidationInfo):
        role = info.data.get("role")
        if value is None and role is not None and (role != "assistant" or not info.data.get("tool_calls")):
            needs = "content or tool_calls" if role == "assistant" else "content"
            raise ValueError(f"a message with role {role!r} needs {needs} (a string or a list of text parts), "
                             f"got null")
        if isinstance(value, list) and not value:
            raise ValueError("a list of content parts must not be empty")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Function(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(OpenAIModel):
    type: Annotated[Literal["function"], NullIsDefault] = "function"
    function: Function


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]


class StreamOptions(OpenAIModel):
    include_usage: Annotated[bool, NullIsDefault] = False


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: Annotated[float, NullIsDefault] = Field(1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, NullIsDefault] = Field(0, ge=-1, le=2 ** 31 - 1)  # vLLM: -1 or 0 = off
    min_p: Annotated[float, NullIsDefault] = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: Annotated[float, NullIsDefault] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Annotated[float, NullIsDefault] = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: Annotated[float, NullIsDefault] = Field(1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=MAX_SEED)
    stop: str | list[str] | None = None
    n: Annotated[int, NullIsDefault] = Field(1, ge=1, le=16)
    stream: Annotated[bool, NullIsDefault] = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM: logprobs name tokens "token_id:N" (decoded text is ambiguous)
    return_tokens_as_token_ids: Annotated[bool, NullIsDefault] = False

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value, info: ValidationInfo):
        """Keys are token ids in decimal ASCII digits ("15"; not "-1", "1.0", "²" or 5,000 digits), inside the
        vocabulary when the context names its size; biases in [-100, 100]."""
        vocab_size = (info.context or {}).get("vocab_size")
        for key, bias in (value or {}).items():
            shown = key if len(key) <= 20 else f"{key[:20]}... ({len(key)} characters)"
            if not (key.isascii() and key.isdigit() and len(key) <= MAX_TOKEN_ID_DIGITS):
                raise ValueError(f"keys must be token ids written in decimal digits (e.g. \"15\"), got {shown!r}")
            if vocab_size is not None and int(key) >= vocab_size:
                raise ValueError(f"token id {key} is outside the vocabulary [0, {vocab_size})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed with stream=true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Annotated[bool, NullIsDefault] = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto"], dict, None] = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    _chat_template_kwargs = field_validator("chat_template_kwargs")(_thinking_switch)

    @model_validator(mode="after")
    def _check(self):
        if self.max_tokens == 0:
            raise FieldError("max_tokens", "must be >= 1 for chat completions")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs=true")
        if self.response_format is not None and self.response_format.type != "text":
            raise FieldError("response_format", f"{self.response_format.type!r} needs guided decoding, which this "
                             f"server does not do; ask for JSON in the prompt and validate it client-side")
        if isinstance(self.tool_choice, dict):
            raise FieldError("tool_choice", "naming a function needs guided decoding; use 'auto' or 'none'")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def enable_thinking(self) -> bool:
        return (self.chat_template_kwargs or {}).get("enable_thinking", True)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Annotated[bool, NullIsDefault] = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise FieldError("suffix", "fill-in-the-middle is not supported by Qwen3 chat models")
        if self.best_of not in (None, self.n):
            raise FieldError("best_of", "must equal n (no server-side ranking)")
        prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if not prompts or any(isinstance(p, (str, list)) and len(p) == 0 for p in prompts):
            raise FieldError("prompt", "must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: Annotated[bool, NullIsDefault] = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    _chat_template_kwargs = field_validator("chat_template_kwargs")(_thinking_switch)

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("messages" if self.prompt is None else "prompt", "send exactly one of 'prompt' or "
                                                                              "'messages'")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class APIError(Exception):
    """An error answered with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def validation_error(error: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field (e.g. `messages.0.role`; the tags pydantic
    adds for union members, such as `str` or `list[TextPart]`, are left out)."""
    first = error.errors()[0]
    parts = [str(part) for part in first["loc"] if not _union_tag(part)]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        parts.append(cause.param)
    param = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param or None)


def _union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-")
                                      or part in ("str", "int", "float", "bool", "dict", "list", "none"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
