"""Input hosts: the module of each architecture that takes the whole input sequence and its mask.

The ``input`` place (prompt tuning, the P-adapter) rewrites what this module receives: the
sequence (token embeddings, or speech features after the feature projection), its attention
mask, positions and token types; ``places/input.py`` does that with hooks on it. One
declarative entry per family, by ``model_type``:

* **text** (``embeddings=True``): the backbone (``model.base_model``: ``BertModel``,
  ``GPT2Model``, ``LlamaModel``, ...), or the encoder stack of an encoder-decoder (``T5Stack``,
  ``BartEncoder``); token ids are embedded with the host's own embedding module
  (``get_input_embeddings()`` / ``embed_tokens``), so scaled embeddings (BART) stay scaled;
* **speech** (``embeddings=False``): the transformer encoder (``Wav2Vec2Encoder``,
  ``HubertEncoder``, ``WavLMEncoder`` and their stable-layer-norm variants), whose first argument
  is the projected CNN features: prompt rows there are the ELP P-adapter's pseudo features.

Encoder-decoders name the module that cross-attends to the host's output (``consumer``: the
decoder stack): its ``encoder_attention_mask`` is extended instead of the encoder's output being
cut, so the decoder attends to the prompt positions as in Lester et al. 2021 and PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..errors import AdapterError


@dataclass(frozen=True)
class InputHostSpec:
    """Where the input sequence enters one architecture family.

    Args:
        model_types: the ``config.model_type`` values this entry serves.
        host: module path suffix of the host (``""``: the model's ``base_model``).
        embeddings: the host takes token ids it embeds itself (text); ``False``: it takes
            features (speech), and its ``sequence_arg`` is the sequence.
        sequence_arg: the host's argument holding the sequence when it takes features.
        consumer: module path suffix of the decoder that cross-attends to the host's output
            (encoder-decoders), else ``None``.
        decoder: the host runs with a key/value cache in ``generate()`` (prompt rows then go in
            front of every row, with explicit positions; see ``places/input.py``).
    """

    model_types: tuple[str, ...]
    host: str = ""
    embeddings: bool = True
    sequence_arg: str = "inputs_embeds"
    consumer: Optional[str] = None
    decoder: bool = False


INPUT_HOSTS: tuple[InputHostSpec, ...] = (
    InputHostSpec(("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")),
    InputHostSpec(("gpt2", "llama", "mistral", "qwen2", "qwen3"), decoder=True),
    InputHostSpec(("t5", "mt5", "bart", "mbart"), host="encoder", consumer="decoder"),
    InputHostSpec(("wav2vec2", "hubert", "wavlm"), host="encoder", embeddings=False, sequence_arg="hidden_states"),
)


@dataclass(frozen=True)
class InputHost:
    """The input host of one concrete model (see ``InputHostSpec``)."""

    spec: InputHostSpec
    module: nn.Module
    path: str
    width: int
    embedding: Optional[nn.Module]
    consumer: Optional[nn.Module]
    max_positions: Optional[int]

    @property
    def place_id(self) -> str:
        """``"input"``, or ``"encoder.input"`` where the family has several stacks."""
        return "encoder.input" if self.spec.consumer is not None else "input"


def _suffix(model: nn.Module, suffix: str) -> tuple[str, Optional[nn.Module]]:
    for name, module in model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return name, module
    return "", None


def _embedding_of(host: nn.Module) -> Optional[nn.Module]:
    module = getattr(host, "embed_tokens", None)
    if isinstance(module, nn.Embedding):
        return module
    getter = getattr(host, "get_input_embeddings", None)
    try:
        module = getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Embedding) else None


def find_input_host(model: nn.Module) -> InputHost:
    """The input host of ``model``; an ``AdapterError`` naming the model type and the fix when
    the model takes no token embeddings or speech features adapterkit knows of."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = next((s for s in INPUT_HOSTS if model_type in s.model_types), None)
    known = ", ".join(t for s in INPUT_HOSTS for t in s.model_types)
    if spec is None:
        raise AdapterError(
            f"Prompt tuning prepends learned rows to the model's input embeddings, but model type "
            f"'{model_type or type(model).__name__}' has no input host in adapterkit's layouts (it takes no token "
            f"embeddings or speech features adapterkit knows of). Use it on one of: {known}; or choose a method "
            "that adapts layers (bottleneck, lora, ia3)."
        )
    if spec.host:
        path, host = _suffix(model, spec.host)
    else:
        host = getattr(model, "base_model", model)
        path = next((n for n, m in model.named_modules() if m is host), "")
    if host is None:
        raise AdapterError(f"This {model_type} model has no module '{spec.host}' (its input host); prompt tuning "
                           "needs the model's encoder. Wrap the full model, not a part of it.")
    consumer = _suffix(model, spec.consumer)[1] if spec.consumer else None
    embedding = _embedding_of(host) if spec.embeddings else None
    if spec.embeddings and embedding is None:
        raise AdapterError(f"This {model_type} model's input host ({type(host).__name__}) has no token embedding; "
                           "prompt tuning needs one to embed the input ids.")
    width = embedding.embedding_dim if embedding is not None else getattr(config, "hidden_size", None)
    if width is None:
        raise AdapterError(f"Cannot tell the input width of this {model_type} model (no config.hidden_size).")
    max_positions = None if model_type in ("t5", "mt5") else getattr(config, "max_position_embeddings", None)
    if spec.embeddings is False:
        max_positions = None  # speech encoders: convolutional positions, no table
    return InputHost(spec, host, path, int(width), embedding, consumer, max_positions)
