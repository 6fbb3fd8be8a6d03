"""Prompt tuning: learned soft-prompt rows prepended to the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", sec. 2: ``P``
learned embeddings (default 10) go in front of the embedded input of a frozen model; only they
train. The vocabulary is AdapterHub's ``PromptTuningConfig`` (``prompt_length``, ``prompt_init``,
``prompt_init_text``, ``combine="prefix"``); initialisation as in sec. 2.2 / PEFT:

* ``"random_uniform"``: U(-0.5, 0.5), AdapterHub's default;
* ``"from_vocab"``: the embeddings of ``prompt_length`` tokens drawn uniformly from the vocabulary
  (PEFT's ``SAMPLE_VOCAB``);
* ``"from_string"``: the embeddings of ``prompt_init_text``'s tokens (no special tokens), repeated
  or cut to ``prompt_length`` as PEFT does; tokenised with ``tokenizer_name_or_path`` (PEFT's
  option), by default the base model's own ``name_or_path``.

The module sits at the ``input`` place (``places/input.py``), whose value is the whole input
sequence: its contribution is the prompt rows ``(B, P, d)`` and its strategy, ``Prepend``, puts
them in front (``Stack("a", "b")`` gives ``[b's prompt, a's prompt, input]``). The place adjusts the
attention mask, positions and token types and cuts the prompt positions off the output again.

**P-adapter** (ELP adapters, Otake et al. 2024): the same rows prepended to a speech encoder's
input (the projected CNN features of wav2vec2 / HuBERT / WavLM): the preset ``"p_adapter"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..loader import load_tokenizer
from ..places.input import InputSite, input_site
from ..strategies import Strategy
from .base import AdapterModule

PROMPT_INITS = ("random_uniform", "from_vocab", "from_string")


@register_method("prompt_tuning")
@dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning (AdapterHub ``PromptTuningConfig``).

    Args:
        prompt_length: the number of prompt rows (PEFT's ``num_virtual_tokens``).
        prompt_init: ``"random_uniform"``, ``"from_vocab"`` or ``"from_string"`` (see module).
        prompt_init_text: the text whose token embeddings start the prompt (``"from_string"``).
        combine: ``"prefix"``: the prompt goes in front of the whole input.
        tokenizer_name_or_path: the tokenizer of ``"from_string"`` (a folder or an alias such as
            ``smollm2``); ``None`` = the base model's own ``name_or_path``.
    """

    places: ClassVar[tuple[str, ...]] = ("input",)
    #: ``adapterkit train``'s default: on SST-2 dev (MiniLM, 3 epochs) 1e-2 beat 2e-3 (86.30 against
    #: 84.60 %); Lester et al. train prompts at 0.3 with Adafactor
    training_lr = 1e-2

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: Optional[str] = None
    combine: str = "prefix"
    tokenizer_name_or_path: Optional[str] = None

    def validate(self) -> None:
        if self.prompt_length < 1:
            raise AdapterError(f"prompt_length must be >= 1, got {self.prompt_length}.")
        if self.prompt_init not in PROMPT_INITS:
            raise AdapterError(f"prompt_init='{self.prompt_init}' is unknown; choose one of: {', '.join(PROMPT_INITS)}.")
        if self.prompt_init == "from_string" and not self.prompt_init_text:
            raise AdapterError("prompt_init='from_string' needs prompt_init_text, the text whose token embeddings "
                               "start the prompt (e.g. prompt_init_text='Classify the sentiment:').")
        if self.combine != "prefix":
            raise AdapterError(f"combine='{self.combine}' is not supported; prompt tuning here prepends its prompt to "
                               "the whole input (combine='prefix').")
        unused = {"target_modules": self.target_modules, "layers": self.layers, "leave_out": self.leave_out or None,
                  "strategy": self.strategy, "stochastic_depth": self.stochastic_depth or None,
                  "l2_lambda": self.l2_lambda or None}
        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise AdapterError(f"Prompt tuning takes no {', '.join(given)}: it prepends one prompt to the model's input "
                               "(not per layer or module, and not combined by a strategy); drop those options.")

    def sites(self, layout) -> list[InputSite]:
        site = input_site(layout, self.stacks)
        limit = site.input_host.max_positions
        if limit is not None and self.prompt_length >= limit:
            raise AdapterError(
                f"prompt_length={self.prompt_length} leaves no room for the input: this {layout.model_type} model has "
                f"{limit} positions (max_position_embeddings). Use prompt_length={max(1, limit // 8)} or so."
            )
        return [site]

    def for_loading(self) -> "PromptTuningConfig":
        """Loading needs no tokenizer: the saved prompt replaces the initialisation."""
        return self.replace(prompt_init="random_uniform", prompt_init_text=None, tokenizer_name_or_path=None)

    def build(self, site: InputSite) -> nn.Module:
        host = site.input_host
        module = PromptTuning(self.prompt_length, host.width)
        init = {"random_uniform": self._init_uniform, "from_vocab": self._init_vocab,
                "from_string": self._init_string}[self.prompt_init]
        init(module, site)
        return module

    def build_unit(self, site: InputSite) -> nn.Module:
        module = self.build(site)
        module.strategy = Prepend()
        return module

    # -- initialisation (Lester et al. sec. 2.2) -------------------------------------------------
    @staticmethod
    def _init_uniform(module: "PromptTuning", site: InputSite) -> None:
        nn.init.uniform_(module.prompt_embedding.weight, -0.5, 0.5)

    def _embedding(self, site: InputSite) -> nn.Module:
        embedding = site.input_host.embedding
        if embedding is None:
            raise AdapterError(f"prompt_init='{self.prompt_init}' needs token embeddings, but this model's input is "
                               "speech features; use prompt_init='random_uniform'.")
        return embedding

    @torch.no_grad()
    def _copy_tokens(self, module: "PromptTuning", embedding: nn.Module, ids: torch.Tensor) -> None:
        rows = embedding(ids.to(embedding.weight.device))  # the host's own embedding (BART's is scaled)
        module.prompt_embedding.weight.copy_(rows.to(module.prompt_embedding.weight.dtype))

    def _init_vocab(self, module: "PromptTuning", site: InputSite) -> None:
        embedding = self._embedding(site)
        ids = torch.randint(0, embedding.num_embeddings, (self.prompt_length,))
        self._copy_tokens(module, embedding, ids)

    def _init_string(self, module: "PromptTuning", site: InputSite) -> None:
        embedding = self._embedding(site)
        name = self.tokenizer_name_or_path or getattr(getattr(site.host, "config", None), "_name_or_path", "")
        if not name:
            raise AdapterError("prompt_init='from_string' needs a tokenizer: pass tokenizer_name_or_path (a model folder "
                               "or alias); this base model records no name_or_path to load one from.")
        ids = load_tokenizer(name)(self.prompt_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AdapterError(f"prompt_init_text={self.prompt_init_text!r} gives no tokens; use a non-empty text.")
        ids = (ids * math.ceil(self.prompt_length / len(ids)))[: self.prompt_length]  # PEFT: repeat, then cut
        if max(ids) >= embedding.num_embeddings:
            raise AdapterError(f"The tokenizer '{name}' gives token ids up to {max(ids)}, beyond this model's "
                               f"{embedding.num_embeddings} embeddings; pass the base model's own tokenizer.")
        self._copy_tokens(module, embedding, torch.tensor(ids))


class PromptTuning(AdapterModule):
    """The prompt: ``prompt_length`` learned rows (AdapterHub's ``prompt_embedding``)."""

    def __init__(self, prompt_length: int, width: int):
        super().__init__()
        self.prompt_embedding = nn.Embedding(prompt_length, width)

    @property
    def prompt_length(self) -> int:
        return self.prompt_embedding.num_embeddings

    def read(self, io) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        return io.x, io.x  # the input sequence (B, T, d)

    def forward(self, h: Optional[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """The prompt rows for a batch like ``base`` (B, T, d): (B, P, d)."""
        rows = self.prompt_embedding.weight.to(base.dtype)
        return rows.unsqueeze(0).expand(base.shape[0], -1, -1)


class Prepend(Strategy):
    """Prompt tuning's combination (AdapterHub ``combine="prefix"``): ``cat(prompt, input)``
    along the sequence. No regulariser applies (the config refuses them)."""

    def forward(self, unit: AdapterModule, io) -> torch.Tensor:
        h, base = unit.read(io)
        return torch.cat([unit(h, base), base], dim=1)


register_preset("prompt_tuning", PromptTuningConfig())
#: ELP's P-adapter (Otake et al. 2024): pseudo features in front of a speech encoder's input
register_preset("p_adapter", PromptTuningConfig(prompt_length=20))
