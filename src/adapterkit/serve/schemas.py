"""Request and response bodies of the HTTP API (they make the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


#: adapter names: no path separators, no dots (the registry and the admin endpoints check it too)
NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
#: the smallest sampling temperature: far below it ``logits / temperature`` overflows float32 (1e-45
#: is a denormal, 1e-300 rounds to 0); at it sampling is already as good as greedy
MIN_TEMPERATURE = 1e-6


def _no_surrogates(text: str) -> str:
    """Refuse a lone UTF-16 surrogate (``"\\ud800"`` in JSON): it is no character, and neither
    the tokenizer nor a JSON answer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[err.start]):04X}) at character {err.start}, which "
                         "is not text; send valid Unicode") from None
    return text


#: a string of real characters (no lone surrogates)
Text = Annotated[str, AfterValidator(_no_surrogates)]


def printable(value: Any) -> Any:
    """Field errors made safe for a JSON answer: the ``input`` they echo may hold NaN or
    infinity (not JSON) or a lone surrogate (not UTF-8), which are shown as text instead."""
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def one_line(err: Exception) -> str:
    """An exception's first line, at most 500 characters, printable (for a 4xx's message)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return printable(text if len(text) <= 500 else text[:497] + "...")


class Error(BaseModel):
    """Every 4xx / 5xx answer: ``detail`` says what is wrong and how to fix it (a list of field
    errors for an invalid body)."""

    detail: Union[str, list[Any]]
    errors: Optional[list[Any]] = None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    adapter: str = Field(pattern=NAME_PATTERN, description="the adapter whose head answers (GET /v1/adapters lists them)")
    texts: list[Text] = Field(min_length=1, description="texts to classify, tag or score")
    text_pairs: Optional[list[Text]] = Field(None, description="second texts of pair tasks, one per text")


class ClassifyResult(BaseModel):
    """Classification: ``label``, ``probability``, ``probabilities``; multilabel: ``labels``,
    ``probabilities``; regression: ``values``; tagging: ``tokens`` and one of ``tags`` each."""

    label: Optional[str] = None
    probability: Optional[float] = None
    labels: Optional[list[str]] = None
    probabilities: Optional[dict[str, float]] = None
    values: Optional[list[float]] = None
    tokens: Optional[list[str]] = None
    tags: Optional[list[str]] = None


class ClassifyResponse(BaseModel):
    adapter: str
    head: str = Field(description="the head's type: classification, regression or tagging")
    results: list[ClassifyResult]


class GenerateRequest(_Strict):
    prompt: Text = Field(min_length=1, description="the text to continue; longer than the server's max_length "
                                                   "tokens: 413")
    adapter: Optional[str] = Field(None, pattern=NAME_PATTERN, description="an adapter, or none for the bare base model")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description=f"0: greedy; {MIN_TEMPERATURE:g} to 5: sampling")
    stop: Union[Text, list[Text], None] = Field(None, description="the text ends before the first of these")

    @field_validator("temperature")
    @classmethod
    def _samplable(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"a temperature of {value:g} is too small to sample with; send 0 for greedy decoding, "
                             f"or at least {MIN_TEMPERATURE:g}")
        return value


class GenerateResponse(BaseModel):
    adapter: Optional[str]
    text: str
    finish_reason: str = Field(description="stop (a stop string or the end-of-sequence token was met) or length "
                                           "(max_new_tokens were generated)")
    tokens: int


class LoadRequest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the name requests will use")
    path: Text = Field(description="an adapter folder under one of the allowed roots")


class HeadInfo(BaseModel):
    type: str
    num_labels: int
    multilabel: bool
    labels: list[str]


class AdapterInfo(BaseModel):
    name: str
    method: str
    head: Optional[HeadInfo] = None


class Health(BaseModel):
    status: str
    model: str
    adapters: int
    queue: int
