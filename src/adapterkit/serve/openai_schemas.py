"""The OpenAI API's request bodies (what ``openai`` clients send) and its error object.

Fields follow OpenAI's names and defaults (``max_tokens`` 16 for completions, ``temperature`` 1);
fields this server does not use (``user``, ``frequency_penalty`` at 0, ...) are accepted and
ignored, as vLLM does; a penalty other than 0, ``echo``, ``best_of`` above ``n`` or tools are
refused with a 400 naming the field. ``"model"`` names an adapter or the base model.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .schemas import MIN_TEMPERATURE, _no_surrogates, printable

#: ``n`` and ``logprobs`` bounds (OpenAI's: n <= 128, logprobs <= 5 for completions, top_logprobs <= 20 for chat)
MAX_N, MAX_LOGPROBS, MAX_TOP_LOGPROBS = 16, 5, 20

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
          504: "timeout_error"}


class OpenAIError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": printable(message), "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                              "invalid_request_error"),
                      "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every 4xx / 5xx answer of these endpoints."""

    error: ErrorDetail


#: the OpenAPI ``responses`` of every OpenAI endpoint (errors), and of the generating ones (JSON or a stream)
ERROR_RESPONSES: dict[Any, dict[str, Any]] = {code: {"model": ErrorResponse} for code in ("4XX", "5XX", 422)}
STREAM_RESPONSES: dict[Any, dict[str, Any]] = {**ERROR_RESPONSES, 200: {"content": {
    "application/json": {"schema": {"type": "object"}},
    "text/event-stream": {"schema": {"type": "string"}, "description": "with stream=true: chunk objects, then "
                                                                       "data: [DONE]"}}}}

TEXT_RESPONSES: dict[Any, dict[str, Any]] = {**ERROR_RESPONSES, 200: {"content": {
    "text/plain": {"schema": {"type": "string"}}}, "description": "vLLM's 'Success: ...' line"}}


def _texts(value: Any) -> Any:
    """Refuse a lone surrogate in any string of ``value`` (a string, or lists / dicts of them):
    the same rule as the other endpoints' ``Text`` (schemas.py); the error names the field."""
    if isinstance(value, str):
        _no_surrogates(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _texts(key)
            _texts(item)
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored (clients send many)

    model: str = Field(description="an adapter's name, or the base model's id (GET /v1/models lists them)")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (equals generate(do_sample=False))")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: Optional[Union[str, list[str]]] = Field(None, description="up to 4 strings that end the text (excluded)")
    seed: Optional[int] = Field(None, description="choice j samples with seed + j")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @field_validator("model", "user")
    @classmethod
    def _model_text(cls, value: Any) -> Any:
        return _texts(value)

    @field_validator("temperature")
    @classmethod
    def _samplable(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"a temperature of {value:g} is too small to sample with; send 0 for greedy decoding, "
                             f"or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        _texts(value)
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this server; leave them at 0")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a text, texts, token ids, or lists of token ids")
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="the top k alternatives of each token")
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: Any) -> Any:
        return _texts(value)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server; send echo=false")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    @field_validator("content")
    @classmethod
    def _content_text(cls, value: Any) -> Any:
        return _texts(value)

    def text(self) -> str:
        """The content as text (text parts of a list joined; other parts are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise OpenAIError(400, "Only text content parts are supported; send {'type': 'text', 'text': ...}.",
                              param="messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the server's --max-new-tokens")
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str

    @field_validator("lora_name", "lora_path")
    @classmethod
    def _text(cls, value: str) -> str:
        return _texts(value)


class UnloadLoraRequest(BaseModel):
    lora_name: str

    @field_validator("lora_name")
    @classmethod
    def _text(cls, value: str) -> str:
        return _texts(value)
    lora_int_id: Optional[int] = None


__all__ = ["ERROR_RESPONSES", "STREAM_RESPONSES", "TEXT_RESPONSES", "ChatMessage", "ChatRequest", "CompletionRequest",
           "ErrorResponse", "LoadLoraRequest", "OpenAIError", "StreamOptions", "UnloadLoraRequest", "error_body"]
