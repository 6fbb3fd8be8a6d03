"""Request and response bodies of the HTTP API (they make the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


#: adapter names: no path separators, no dots (the registry and the admin endpoints check it too)
NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"


class Error(BaseModel):
    """Every 4xx / 5xx answer: ``detail`` says what is wrong and how to fix it (a list of field
    errors for an invalid body)."""

    detail: Union[str, list[Any]]
    errors: Optional[list[Any]] = None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    adapter: str = Field(pattern=NAME_PATTERN, description="the adapter whose head answers (GET /v1/adapters lists them)")
    texts: list[str] = Field(min_length=1, description="texts to classify, tag or score")
    text_pairs: Optional[list[str]] = Field(None, description="second texts of pair tasks, one per text")


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
    prompt: str = Field(min_length=1)
    adapter: Optional[str] = Field(None, pattern=NAME_PATTERN, description="an adapter, or none for the bare base model")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0: greedy; more: sampling")
    stop: Union[str, list[str], None] = Field(None, description="the text ends before the first of these")


class GenerateResponse(BaseModel):
    adapter: Optional[str]
    text: str
    finish_reason: str = Field(description="stop (a stop string was met) or length")
    tokens: int


class LoadRequest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the name requests will use")
    path: str = Field(description="an adapter folder under one of the allowed roots")


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
