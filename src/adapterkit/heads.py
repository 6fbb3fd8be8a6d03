"""Prediction heads that sit on the backbone's last hidden states.

A head belongs to the adapter of the same name: it is trained, saved and loaded with it. Heads
are described by a ``HeadConfig`` (JSON round-trip) so that a checkpoint can rebuild them.

* ``classification``: pooled sequence -> labels; cross-entropy, or BCE with ``multilabel``.
* ``regression``: pooled sequence -> one value (or ``num_labels`` values); MSE.
* ``tagging``: every token -> labels; cross-entropy ignoring label -100.
* ``ctc``: every frame -> vocabulary logits (speech recognition, as ``Wav2Vec2ForCTC``'s
  ``lm_head``); CTC loss over the frames the attention mask keeps, labels padded with -100 as
  ``transformers`` pads them, blank = ``blank`` (the tokenizer's pad id, 0 by default),
  ``reduction="mean"`` (per target length, then over the batch), ``zero_infinity=True``.

Pooling: ``"cls"`` (first token), ``"mean"`` (mean over the attention mask; on images the mean
of the patches, leaving out the CLS / distillation tokens) or ``"last"`` (last non-padding token,
for decoder models). ``"auto"`` picks ``mean`` for text encoders and audio (frames, under the
feature-level mask), ``last`` for decoders and ``cls`` for images (ViT's own classifier reads the
CLS token): all-MiniLM-L6-v2 and most sentence encoders are trained with mean pooling.

``build_head(config, layout, like)`` is the one way to make a head for a model: it reads the
hidden size and decoder-ness from the model's ``Layout`` and puts the head on ``like``'s device
and dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .errors import AdapterError
from .typecheck import check_field_types

if TYPE_CHECKING:  # pragma: no cover
    from .layouts import Layout

HEAD_TYPES = ("classification", "regression", "tagging", "ctc")
#: head types that label every position instead of a pooled sequence
PER_TOKEN = ("tagging", "ctc")
#: "auto" pooling per modality (text encoders; decoders always take "last")
_AUTO_POOLING = {"text": "mean", "image": "cls", "audio": "mean"}
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
    blank: int = 0

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
        if self.type == "ctc" and not 0 <= self.blank < self.num_labels:
            raise AdapterError(f"The CTC blank id {self.blank} is not in the vocabulary of {self.num_labels} labels; "
                               "pass blank= the tokenizer's pad id.")

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


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], how: str, skip: int = 0) -> torch.Tensor:
    """(B, T, d) -> (B, d). ``skip``: leading positions a mean leaves out (ViT's CLS token)."""
    if how == "cls":
        return hidden[:, 0]
    if skip:
        hidden = hidden[:, skip:]
        attention_mask = attention_mask[:, skip:] if attention_mask is not None else None
    if attention_mask is None:
        return hidden.mean(dim=1) if how == "mean" else hidden[:, -1]
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    # last non-padding token; works for right padding (and left padding, where it is the last one)
    last = (mask.cumsum(1) * mask).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _classification_loss(cfg: HeadConfig, logits: torch.Tensor, labels: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
    if cfg.multilabel:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, cfg.num_labels), labels.reshape(-1), ignore_index=-100)


def _regression_loss(cfg: HeadConfig, logits: torch.Tensor, labels: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(logits.squeeze(-1).shape))


def ctc_loss(cfg: HeadConfig, logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """CTC over the frames ``mask`` keeps (all without one); ``labels`` (B, L) padded with -100,
    as ``Wav2Vec2ForCTC`` computes it (there with ``ctc_loss_reduction="mean"``,
    ``ctc_zero_infinity=True``)."""
    if labels.max() >= cfg.num_labels:
        raise AdapterError(f"CTC label id {int(labels.max())} is outside the head's vocabulary of {cfg.num_labels}; "
                           "make the head with the tokenizer's vocabulary size.")
    frames = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
    input_lengths = mask.sum(-1).long() if mask is not None else frames
    keep = labels >= 0
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)  # (T, B, V)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(log_probs, labels.masked_select(keep), input_lengths, keep.sum(-1), blank=cfg.blank,
                          reduction="mean", zero_infinity=True)


#: head type -> loss(config, logits, labels, frame mask)
_LOSSES = {"classification": _classification_loss, "regression": _regression_loss, "tagging": _classification_loss,
           "ctc": ctc_loss}


class Head(nn.Module):
    """An MLP of ``layers`` linear layers (tanh between), as AdapterHub's prediction heads.

    Args:
        config: what the head is.
        hidden_size: the width of the hidden states it reads.
        is_decoder: the model is a decoder (``"auto"`` pooling takes the last token).
        modality: ``"text"``, ``"image"`` or ``"audio"`` (``"auto"`` pooling per modality).
        prefix_tokens: leading positions that are not patches (ViT's CLS token), left out of an
            image's mean.
    """

    def __init__(self, config: HeadConfig, hidden_size: int, is_decoder: bool = False, modality: str = "text",
                 prefix_tokens: int = 0):
        super().__init__()
        self.config = config
        auto = "last" if is_decoder else _AUTO_POOLING.get(modality, "mean")
        self.pooling = config.pooling if config.pooling != "auto" else auto
        self.skip = prefix_tokens
        mods: list[nn.Module] = []
        for _ in range(config.layers - 1):
            mods += [nn.Dropout(config.dropout), nn.Linear(hidden_size, hidden_size), nn.Tanh()]
        mods += [nn.Dropout(config.dropout), nn.Linear(hidden_size, config.num_labels)]
        self.mlp = nn.Sequential(*mods)

    def forward(
        self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        cfg = self.config
        per_token = cfg.type in PER_TOKEN
        features = hidden if per_token else pool(hidden, attention_mask, self.pooling, self.skip)
        logits = self.mlp(features)
        if labels is None:
            return None, logits
        return _LOSSES[cfg.type](cfg, logits, labels, attention_mask), logits


def build_head(config: HeadConfig, layout: "Layout", like: Optional[torch.Tensor] = None) -> Head:
    """A fresh head for a model with this ``layout``: ``"auto"`` pooling from ``layout.is_decoder``
    and the layout's modality, the width from ``layout.hidden_size``, on the device and dtype of
    ``like`` (a model parameter)."""
    if layout.hidden_size is None:
        raise AdapterError("Cannot tell the model's hidden size (no config.hidden_size); heads need it.")
    spec = layout.spec
    modality = spec.modality if spec is not None else "text"
    if config.type == "ctc" and modality != "audio":
        raise AdapterError(f"A CTC head labels audio frames, but this {layout.model_type} model reads {modality}; "
                           "use a tagging head for per-token labels.")
    head = Head(config, layout.hidden_size, is_decoder=layout.is_decoder, modality=modality,
                prefix_tokens=spec.prefix_tokens if spec is not None else 0)
    if like is not None:
        head.to(device=like.device, dtype=like.dtype)
    return head


@dataclass
class AdapterModelOutput(SequenceClassifierOutput):
    """A head's output, with the adapters' auxiliary loss (``l2_lambda``) when there is one;
    ``loss`` already includes it."""

    aux_loss: Optional[torch.Tensor] = None


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


def last_hidden(body_output: Any) -> torch.Tensor:
    """The last hidden states (B, T, d) of a backbone's output (a tensor or a ``ModelOutput``)."""
    return body_output if isinstance(body_output, torch.Tensor) else body_output[0]


def run_heads(heads: "Mapping[str, nn.Module]", layout: "Layout", hidden: torch.Tensor,
              attention_mask: Optional[torch.Tensor], names: "Sequence[Optional[str]]",
              labels: Optional[torch.Tensor] = None) -> "list[Optional[tuple[Optional[torch.Tensor], torch.Tensor]]]":
    """"Run the heads" after the body, for every path (one head, ``Parallel``, routed heads).

    ``hidden`` (R, T, d) is ``len(names)`` equal parts of ``k = R / len(names)`` rows: part ``i``
    goes to head ``names[i]`` (``None``: no head). ``attention_mask`` covers either all ``R`` rows
    or one part (``Parallel``'s copies share the batch's mask); it becomes the frame-level mask
    on speech models (``Layout.hidden_mask``). With ``labels`` (``k`` rows) each part gets its own
    loss; without, the parts of one head run as one batch. Returns ``(loss, logits)`` per part
    (``None`` for a part without a head)."""
    parts = len(names)
    rows = hidden.shape[0] // parts
    mask = layout.hidden_mask(attention_mask, hidden)
    if mask is not None and mask.shape[0] != hidden.shape[0]:
        mask = mask.repeat(hidden.shape[0] // mask.shape[0], *([1] * (mask.dim() - 1)))  # one copy per part
    out: "list[Optional[tuple[Optional[torch.Tensor], torch.Tensor]]]" = [None] * parts
    jobs: list[tuple[str, list[int]]] = [(name, [i]) for i, name in enumerate(names) if name is not None]
    if labels is None:  # the parts of one head run as one batch
        groups: dict[str, list[int]] = {}
        for name, members in jobs:
            groups.setdefault(name, []).extend(members)
        jobs = list(groups.items())
    for name, members in jobs:
        head = heads[name]
        index = torch.tensor([i * rows + r for i in members for r in range(rows)], device=hidden.device)
        whole = len(members) == parts
        part_hidden = hidden if whole else hidden.index_select(0, index)
        part_mask = mask if whole or mask is None else mask.index_select(0, index)
        loss, logits = head(part_hidden, part_mask, labels)
        for j, i in enumerate(members):
            out[i] = (loss, logits[j * rows:(j + 1) * rows])
    return out


def run_routed_heads(heads: "Mapping[str, nn.Module]", layout: "Layout", hidden: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], names: "list[Optional[str]]") -> RoutedHeadsOutput:
    """Each head of ``heads`` on the rows of ``hidden`` (B, T, d) whose name in ``names`` it bears."""
    head_names = [n if n is not None and n in heads else None for n in names]
    results = run_heads(heads, layout, hidden, attention_mask, head_names)
    logits = [r[1][0] if r is not None else None for r in results]
    return RoutedHeadsOutput(logits, head_names, hidden)
