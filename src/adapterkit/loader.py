"""Loading a base model, its config and its tokenizer: the one place that does it.

A model is named by a local ``transformers`` folder, a ``.gguf`` file or an alias (``minilm``,
``smollm2``; see ``packaged``). Everything is offline (``local_files_only``). Whether a model is
a decoder is decided by ``layouts.is_decoder_config`` alone: the loader picks
``AutoModelForCausalLM`` by it, the training data picks the causal-LM task by it, heads pool the
last token by it. Every failure is an ``AdapterError`` naming the model and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import transformers
from torch import nn

from .errors import AdapterError
from .layouts import is_decoder_config
from .packaged import resolve_model

#: config fields that bound the sequence length of models with learned position embeddings
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
#: RoBERTa-style position ids start after the padding index, so that many positions are unusable
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def _source(name_or_path: str, **kwargs: Any) -> tuple[Path, Optional[str], dict[str, Any]]:
    """Where a model's files are (``packaged.resolve_model``: a folder, or an alias) and the
    ``from_pretrained`` options that read them offline (the GGUF file, when there is one)."""
    folder, gguf = resolve_model(name_or_path)
    options: dict[str, Any] = {"local_files_only": True, **kwargs}
    if gguf:
        options["gguf_file"] = gguf
    return folder, gguf, options


def load_config(name_or_path: str) -> Any:
    """The ``transformers`` config of a model (fast: reads no weights; checks the path is a model)."""
    folder, gguf, options = _source(name_or_path)
    try:
        return transformers.AutoConfig.from_pretrained(folder, **options)
    except Exception as err:  # OSError, ValueError, KeyError, ... for a bad folder or file
        where = folder / (gguf or "config.json")
        raise AdapterError(f"'{name_or_path}' is not a usable model: {where} cannot be read "
                           f"({type(err).__name__}: {err}).") from None


def model_is_decoder(name_or_path: str) -> bool:
    """Whether the model is a decoder-only (causal LM) model, from its config only."""
    if resolve_model(name_or_path)[1]:
        return True  # GGUF files hold decoder LMs
    return is_decoder_config(load_config(name_or_path))


def max_positions(config: Any) -> Optional[int]:
    """The longest input (in tokens) the model's position embeddings allow, or ``None`` if unbounded."""
    for key in _POSITION_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def check_max_length(name_or_path: str, max_length: int, config: Any = None) -> None:
    """Refuse a ``--max-length`` the model cannot take before anything runs (it would crash
    with an index error at the first long row, possibly an hour into training)."""
    limit = max_positions(config if config is not None else load_config(name_or_path))
    if limit is not None and max_length > limit:
        raise AdapterError(f"--max-length {max_length} is more than '{name_or_path}' can take: its position "
                           f"embeddings hold {limit} tokens; pass --max-length {limit} or less.")


def load_base_model(name_or_path: str, *, causal_lm: Optional[bool] = None, **kwargs: Any) -> nn.Module:
    """Load a base model offline. ``causal_lm=None`` picks ``AutoModelForCausalLM`` for decoders
    (``is_decoder_config``; GGUF files) and ``AutoModel`` (the bare encoder) otherwise."""
    folder, gguf, options = _source(name_or_path, **kwargs)
    if causal_lm is None:
        causal_lm = model_is_decoder(name_or_path)
    cls = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    try:
        return cls.from_pretrained(folder, **options)
    except (OSError, ValueError) as err:
        raise AdapterError(f"Could not load a model from '{name_or_path}': {err}") from None


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """The model's tokenizer, offline; decoder tokenizers get a pad token (their EOS)."""
    folder, gguf, options = _source(name_or_path, **kwargs)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **options)
    except Exception as err:  # OSError, ValueError, TypeError, ... for bad folders
        raise AdapterError(f"'{name_or_path}': cannot load its tokenizer ({type(err).__name__}: {err}); the model "
                           "folder needs tokenizer files (tokenizer.json or vocab files) beside config.json.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


__all__ = ["load_config", "model_is_decoder", "max_positions", "check_max_length", "load_base_model", "load_tokenizer"]
