"""Prediction heads that sit on the backbone's last hidden states.

A head belongs to the adapter of the same name: it is trained, saved and loaded with it. Heads
are described by a ``HeadConfig`` (JSON round-trip) so that a checkpoint can rebuild them.

* ``classification``: pooled sequence -> labels; cross-entropy, or BCE with ``multilabel``.
* ``regression``: pooled sequence -> one value (or ``num_labels`` values); MSE.
* ``tagging``: every token -> labels; cross-entropy ignoring label -100.

Pooling: ``"cls"`` (first token), ``"mean"`` (mean over the attention mask) or ``"last"`` (last
non-padding token, for decoder models). ``"auto"`` picks ``mean`` for encoders and ``last`` for
decoders: all-MiniLM-L6-v2 and most sentence encoders are trained with mean pooling.

``build_head(config, layout, like)`` is the one way to make a head for a model: it reads the
hidden size and decoder-ness from the model's ``Layout`` and puts the head on ``like``'s device
and dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError
from .typecheck import check_field_types

if TYPE_CHECKING:  # pragma: no cover
    from .layouts import Layout

HEAD_TYPES = ("classification", "regression", "tagging")
POOLINGS = ("auto", "cls", "mean", "last")


@dataclass(frozen=True)
class HeadConfig:
    """What a head is: type, label count, depth, pooling and label names."""

    type: str
    num_labels: int
    layers: int = 2
    pooling: str = "auto"
    multilabel: bool = False
    dropout: float = 0.1
    id2label: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:  # JSON object keys are strings: {"0": "negative"}
            object.__setattr__(self, "id2label", {int(k): str(v) for k, v in dict(self.id2label).items()})
        except (TypeError, ValueError):
            raise AdapterError(f"id2label={self.id2label!r} must map label numbers to names, e.g. "
                               "{0: 'negative', 1: 'positive'}.") from None
        try:
            check_field_types(self)
        except TypeError as err:
            raise AdapterError(f"Invalid head option: {err}.") from None
        if self.type not in HEAD_TYPES:
            raise AdapterError(f"Unknown head type '{self.type}'; use one of {', '.join(HEAD_TYPES)}.")
        if self.num_labels < 1:
            raise AdapterError(f"num_labels must be >= 1, got {self.num_labels}.")
        if self.layers < 1:
            raise AdapterError(f"A head needs layers >= 1, got {self.layers}.")
        if self.pooling not in POOLINGS:
            raise AdapterError(f"pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise AdapterError(f"Unknown head options {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """(B, T, d) -> (B, d)."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1) if how == "mean" else hidden[:, -1]
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    # last non-padding token; works for right padding (and left padding, where it is the last one)
    last = (mask.cumsum(1) * mask).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Head(nn.Module):
    """An MLP of ``layers`` linear layers (tanh between), as AdapterHub's prediction heads."""

    def __init__(self, config: HeadConfig, hidden_size: int, is_decoder: bool = False):
        super().__init__()
        self.config = config
        self.pooling = config.pooling if config.pooling != "auto" else ("last" if is_decoder else "mean")
        mods: list[nn.Module] = []
        for _ in range(config.layers - 1):
            mods += [nn.Dropout(config.dropout), nn.Linear(hidden_size, hidden_size), nn.Tanh()]
        mods += [nn.Dropout(config.dropout), nn.Linear(hidden_size, config.num_labels)]
        self.mlp = nn.Sequential(*mods)

    def forward(
        self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        cfg = self.config
        features = hidden if cfg.type == "tagging" else pool(hidden, attention_mask, self.pooling)
        logits = self.mlp(features)
        if labels is None:
            return None, logits
        if cfg.type == "regression":
            loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(logits.squeeze(-1).shape))
        elif cfg.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        else:
            loss = F.cross_entropy(logits.reshape(-1, cfg.num_labels), labels.reshape(-1), ignore_index=-100)
        return loss, logits


def build_head(config: HeadConfig, layout: "Layout", like: Optional[torch.Tensor] = None) -> Head:
    """A fresh head for a model with this ``layout``: ``"auto"`` pooling from ``layout.is_decoder``,
    the width from ``layout.hidden_size``, on the device and dtype of ``like`` (a model parameter)."""
    if layout.hidden_size is None:
        raise AdapterError("Cannot tell the model's hidden size (no config.hidden_size); heads need it.")
    head = Head(config, layout.hidden_size, is_decoder=layout.is_decoder)
    if like is not None:
        head.to(device=like.device, dtype=like.dtype)
    return head


@dataclass
class RoutedHeadsOutput:
    """Per-example heads (``model(..., adapter_names=names, routed_heads=True)``): the body ran
    once, then each head on the rows routed to its adapter.

    ``head_names[i]`` is the head example ``i`` went through (the head named like its adapter),
    ``None`` when its adapter is ``None`` or has no head; ``logits[i]`` is that example's output
    (``(num_labels,)`` for a sequence head, ``(T, num_labels)`` for a tagging head over the
    batch's padded length) or ``None`` for an example without a head. ``hidden_states`` is the
    body's last hidden state ``(B, T, d)`` for every row, headless or not."""

    logits: list[Optional[torch.Tensor]]
    head_names: list[Optional[str]]
    hidden_states: torch.Tensor


def run_routed_heads(heads: "nn.ModuleDict", hidden: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     names: "list[Optional[str]]") -> RoutedHeadsOutput:
    """Each head of ``heads`` on the rows of ``hidden`` (B, T, d) whose name in ``names`` it bears."""
    head_names = [n if n is not None and n in heads else None for n in names]
    logits: list[Optional[torch.Tensor]] = [None] * len(names)
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(head_names):
        if name is not None:
            rows.setdefault(name, []).append(i)
    for name, index in rows.items():
        picked = torch.tensor(index, device=hidden.device)
        mask = attention_mask.index_select(0, picked) if attention_mask is not None else None
        _, out = heads[name](hidden.index_select(0, picked), mask)
        for i, row in zip(index, out):
            logits[i] = row
    return RoutedHeadsOutput(logits, head_names, hidden)
