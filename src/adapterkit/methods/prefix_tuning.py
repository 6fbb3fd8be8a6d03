"""Prefix tuning: learned key / value prefixes in every attention layer.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation": each attention
layer attends over ``prefix_length`` learned key / value positions before the real ones (sec. 4.1).
Optimising the prefixes directly is unstable, so they are reparametrised through an MLP
(sec. 4.3): ``P = MLP(P')`` with a small matrix ``P'`` (``wte``, one row per position) and one MLP
for all layers of a stack (``control_trans``: Linear(hidden, bottleneck), tanh, Linear(bottleneck,
layers * 2 * kv_heads * head_dim)), as in AdapterHub's ``PrefixTuning``; "once training is
complete, these reparametrization parameters can be dropped, and only the prefix needs to be
saved". Here:

* at inference (``eval()``, no gradient needed) the MLP runs once and its result is kept until a
  weight changes (``PrefixTuning.folded``); nothing is thrown away, so ``train()`` resumes with the
  MLP;
* ``save_adapter`` writes the folded per-layer prefixes only, with the config ``flat=True``
  (``PrefixTuningConfig.as_saved``): a loaded adapter trains its prefixes directly.

One site per stack and attention role (``places/attention.py``): self-attention in every stack
(``encoder_prefix=False`` leaves an encoder-decoder's encoder out) and, with ``cross_prefix``, the
decoder's cross-attention. Prefixes have the attention's key / value heads (``num_key_value_heads``
under grouped-query attention) and are prepended after the rotary embedding and the KV cache.

**Initialisation** (``prefix_init``; the issue: random prefixes soak up the attention and never
learn on SmolLM2). ``"random"``: the MLP's default init (or N(0, 1) prefixes when ``flat``), as
AdapterHub; ``"zero"``: zero keys and values (with the MLP: its last projection zero, so its
output is zero and its gradient is not); ``"from_string"``: Li & Liang's recipe (sec. 5.2, "initialise
the prefix with activations of real words"): the keys and values the frozen model itself computes
for ``prefix_init_text`` (its tokens repeated or cut to ``prefix_length``, PEFT's rule), layer by
layer, captured inside the attention (``places/attention.capturing``), so each layer's prefix starts
as a real context. It sets the prefixes themselves, so it needs ``flat=True`` (or the warm-up below, where the text's
keys and values are the flat part the MLP's output is added to). A saved adapter is flat and
initialised from its file (``as_saved`` resets the option: loading needs no tokenizer).

**The MLP with a warm-up** (``mlp_warmup``; Li & Liang train through the MLP for the whole run and
drop it afterwards, sec. 4.3). The prefix is ``MLP(P') + F`` with a flat part ``F`` (zero, or the init
text's keys and values). For the first ``mlp_warmup`` optimizer steps (a fraction of the run's steps
when below 1) only the MLP trains (``F`` is held: no gradient); from then on the MLP's output is a
constant, computed once, and only ``F`` trains: the prefix is folded and training continues flat.
Adam moves ``F`` exactly as it would move a flat prefix that starts at the MLP's output, and the
function is the same before and after the fold, bit for bit (nothing is recomputed differently).
The trainer tells each module the step (``AdapterModule.at_step``); a loop of one's own calls
``methods.base.tell_step(model, step, total_steps)``, else the MLP trains for the whole run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..layouts import select_layers
from ..loader import load_tokenizer
from ..places import attention as attention_place
from ..places.slots import Site, SlotIO
from .base import AdapterModule
from .bottleneck import ACTIVATIONS
from .gating import check_prefix_site, gate_for


PREFIX_INITS = ("random", "zero", "from_string")


@dataclass(frozen=True)
class TextSite(Site):
    """An attention site with the keys and values the model computes for the init text there:
    one ``(2, P, H_kv * d)`` per member layer (``prefix_init="from_string"``)."""

    init_kv: tuple = field(default=(), compare=False, hash=False, repr=False)


@register_method("prefix_tuning")
@dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (AdapterHub's ``PrefixTuningConfig``).

    Args:
        prefix_length: prefix positions per attention layer.
        bottleneck_size: width of the reparametrisation MLP.
        non_linearity: its activation.
        dropout: dropout on the prefixes while training.
        flat: no MLP: train the per-layer prefixes directly (what a saved adapter loads as).
        encoder_prefix: prefixes in the encoder of an encoder-decoder (T5, BART).
        cross_prefix: prefixes in the decoder's cross-attention of an encoder-decoder.
        prefix_init: ``"random"``, ``"zero"`` or ``"from_string"`` (module docstring).
        mlp_warmup: train through the MLP for this many optimizer steps (below 1: this fraction of
            the run's steps), then fold it and train the prefixes flat; 0: the MLP all run long.
        prefix_init_text: the text whose keys and values start the prefixes (``"from_string"``).
        tokenizer_name_or_path: its tokenizer (a folder or alias); ``None``: the base model's.
        use_gating: scale each layer's prefix keys and values by a learned gate read from the
            attention's input, AdapterHub's ``use_gating`` (UniPELT; ``gating.py``): encoder
            stacks only. ``shared_gating``: one gate for keys and values (else one each).
    """

    places = ("attention",)
    supports_fusion = False
    #: ``adapterkit train``'s defaults (docs/methods-new.md): flat prefixes of 20 positions from zero
    #: at 1e-2; on SmolLM2 random prefixes (through the MLP at every rate tried, and PEFT's flat ones)
    #: collapsed to chance on SST-2 while zero ones kept the zero-shot level (a real text's keys and
    #: values learnt the task, but a default has no text); on MiniLM zero and random were level
    training_lr = 1e-2

    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    flat: bool = False
    encoder_prefix: bool = True
    cross_prefix: bool = True
    prefix_init: str = "random"
    mlp_warmup: float = 0.0
    prefix_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    use_gating: bool = False
    shared_gating: bool = True

    @classmethod
    def training_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Flat (unless an MLP option is given), 20 positions, starting at zero."""
        mlp = {"flat", "bottleneck_size", "non_linearity", "mlp_warmup"} & set(options)
        return {"prefix_length": 20, "prefix_init": "zero", **({} if mlp else {"flat": True})}

    def validate(self) -> None:
        if self.prefix_init not in PREFIX_INITS:
            raise AdapterError(f"prefix_init='{self.prefix_init}' is unknown; choose one of: {', '.join(PREFIX_INITS)}.")
        if self.prefix_init == "from_string" and not (self.prefix_init_text and (self.flat or self.mlp_warmup)):
            raise AdapterError("prefix_init='from_string' sets the prefixes themselves from the keys and values of "
                               "prefix_init_text: pass prefix_init_text='...' and flat=True (or mlp_warmup=...).")
        if not (0 <= self.mlp_warmup < math.inf) or (self.mlp_warmup > 1 and self.mlp_warmup != int(self.mlp_warmup)):
            raise AdapterError(f"mlp_warmup must be a fraction of the steps below 1 or a whole number of steps, got "
                               f"{self.mlp_warmup}.")
        if self.mlp_warmup and self.flat:
            raise AdapterError("mlp_warmup trains through the MLP first, and flat=True has no MLP; drop one of them.")
        if self.prefix_length < 1:
            raise AdapterError(f"prefix_length must be a positive number of positions, got {self.prefix_length}.")
        if self.bottleneck_size < 1:
            raise AdapterError(f"bottleneck_size must be positive, got {self.bottleneck_size}.")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise AdapterError(
                f"non_linearity='{self.non_linearity}' is not supported; use one of {', '.join(ACTIVATIONS)}."
            )
        if self.strategy not in (None, "add", "scaled_add"):
            raise AdapterError(
                f"Prefix tuning takes strategy 'add' or 'scaled_add' (a prefix's weight in the attention), not "
                f"'{self.strategy}'."
            )
        if self.stochastic_depth or self.l2_lambda:
            raise AdapterError("Prefix tuning has no sub-layer output to drop or penalise; leave stochastic_depth and "
                               "l2_lambda at 0 (use dropout= for the prefixes).")
        if self.target_modules is not None:
            raise AdapterError("Prefix tuning goes into the attention modules the model's layout names; drop "
                               "target_modules (choose with layers=, leave_out=, stacks=, cross_prefix=).")

    def sites(self, layout: Any) -> list[Site]:
        if layout.spec is None:
            raise AdapterError(
                f"Prefix tuning adds keys and values to the attention layers a model layout names, and model type "
                f"'{layout.model_type}' has no layout (a plain nn.Module or an architecture adapterkit does not know). "
                "Use a transformers model of a known family (BERT, GPT-2, Llama, T5, BART, ...), or a method that "
                "targets modules by name (LoRA, IA3, a bottleneck adapter with target_modules=...)."
            )
        stacks = self.stacks
        if not self.encoder_prefix and layout.is_encoder_decoder:
            stacks = tuple(s for s in (stacks or layout.stack_names) if s != "encoder")
        sites = layout.attention_sites(("self", "cross") if self.cross_prefix else ("self",), stacks)
        for site in sites:
            layout.layer_indices(layout.stacks[site.stack], self.layers, self.leave_out)  # range checks
        attention_place.check_attention(layout, sites)
        if self.prefix_init == "from_string":
            kv = self._text_key_values(layout, sites)
            sites = [TextSite(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                              init_kv=tuple(kv[m] for m in s.members)) for s in sites]
        return sites

    @torch.no_grad()
    def _text_key_values(self, layout: Any, sites: Sequence[Site]) -> dict:
        """``{attention module: (2, P, H_kv * d)}``: the keys and values the model computes for the
        init text (its tokens repeated or cut to ``prefix_length``)."""
        name = self.tokenizer_name_or_path or getattr(getattr(layout.model, "config", None), "_name_or_path", "")
        if not name:
            raise AdapterError("prefix_init='from_string' needs a tokenizer: pass tokenizer_name_or_path (a model folder "
                               "or alias); this base model records no name_or_path to load one from.")
        ids = load_tokenizer(name)(self.prefix_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AdapterError(f"prefix_init_text={self.prefix_init_text!r} gives no tokens; use a non-empty text.")
        ids = (ids * math.ceil(self.prefix_length / len(ids)))[: self.prefix_length]
        model = layout.model
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embedding is not None and max(ids) >= embedding.num_embeddings:
            raise AdapterError(f"The tokenizer '{name}' gives token ids up to {max(ids)}, beyond this model's "
                               f"{embedding.num_embeddings} embeddings; pass the base model's own tokenizer.")
        device = next(model.parameters()).device
        inputs = {"input_ids": torch.tensor([ids], device=device)}
        if layout.is_encoder_decoder:
            inputs["decoder_input_ids"] = inputs["input_ids"]
        members = [m for s in sites for m in s.members]
        was_training = model.training
        model.eval()
        try:
            with attention_place.capturing(members) as found:
                model(**inputs)
        finally:
            model.train(was_training)
        missing = [m for m in members if m not in found]
        if missing:
            raise AdapterError(f"prefix_init='from_string': {len(missing)} attention module(s) did not run on the init "
                               "text; use prefix_init='zero' for this model.")
        flat = lambda t: t[0].transpose(0, 1).reshape(t.shape[2], -1)  # noqa: E731  (1, H_kv, P, d) -> (P, H_kv*d)
        return {m: torch.stack([flat(found[m][0]), flat(found[m][1])]) for m in members}

    def build(self, site: Site) -> nn.Module:
        layers = select_layers(len(site.members), self.layers, self.leave_out)
        module = PrefixTuning(self, layers, site.in_features, site.out_features)
        if self.use_gating:
            check_prefix_site(site)
            module.gates = nn.ModuleList(gate_for(site, site.in_features, 1 if self.shared_gating else 2)
                                         for _ in layers)
        with torch.no_grad():
            if self.prefix_init != "random" and not self.flat:  # the MLP's output starts at zero
                for p in module.control_trans[-1].parameters():
                    p.zero_()
            if self.prefix_init == "zero" and self.flat:
                module.prefix.zero_()
            elif self.prefix_init == "from_string" and isinstance(site, TextSite):
                module.prefix.copy_(torch.stack([site.init_kv[i] for i in layers]).to(module.prefix.dtype))
        return module

    def for_loading(self) -> "PrefixTuningConfig":
        """Loading needs no init text: the saved prefixes replace the initialisation."""
        return self.replace(prefix_init="random", prefix_init_text=None, tokenizer_name_or_path=None)

    def as_saved(self) -> "PrefixTuningConfig":
        return self.replace(flat=True, prefix_init="random", prefix_init_text=None, tokenizer_name_or_path=None,
                            mlp_warmup=0.0)


class PrefixTuning(AdapterModule):
    """The prefixes of one stack's attention role: ``(2, P, kv_heads * head_dim)`` per layer.

    Its contribution at the slot is one more copy of its prefix for every example it runs on
    (``places/attention``'s composition); the keys and values come from ``prefix_at``."""

    def __init__(self, config: PrefixTuningConfig, layers: Sequence[int], hidden: int, width: int):
        super().__init__()
        self.layers = tuple(layers)
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self.column = 0  # this adapter's column in its slot's value (``AttentionSlot.bind``)
        self.shape = (len(self.layers), 2, config.prefix_length, width // 2)  # (layers, k / v, P, H_kv * d)
        self.mlp_warmup = config.mlp_warmup
        self.mlp_frozen = False  # after the warm-up: the MLP's output is a constant, the flat part trains
        self.partly_idle = bool(config.mlp_warmup)
        if config.flat or config.mlp_warmup:
            self.prefix = nn.Parameter(torch.randn(self.shape) if config.flat else torch.zeros(self.shape))
        if not config.flat:
            self.wte = nn.Embedding(config.prefix_length, hidden)
            self.control_trans = nn.Sequential(
                nn.Linear(hidden, config.bottleneck_size),
                ACTIVATIONS[config.non_linearity.lower()](),
                nn.Linear(config.bottleneck_size, len(self.layers) * width),
            )
        self.dropout = nn.Dropout(config.dropout)
        self.gates: Optional[nn.ModuleList] = None  # use_gating: one ``gating.TokenGate`` per layer
        self._folded: Optional[tuple[Any, torch.Tensor]] = None
        self._mlp_cache: Optional[tuple[Any, torch.Tensor]] = None  # the MLP's output after the fold

    def covers(self, layer: int) -> bool:
        return layer in self._index

    def read(self, io: SlotIO) -> tuple[torch.Tensor, torch.Tensor]:
        return io.y, io.y

    def forward(self, h: Optional[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(base)
        delta[:, self.column] = 1.0
        return delta

    def at_step(self, step: int, total_steps: int) -> None:
        """Fold the MLP once ``step`` (0-based, the next optimizer step) reaches the warm-up."""
        if self.mlp_warmup:
            end = self.mlp_warmup if self.mlp_warmup >= 1 else round(self.mlp_warmup * total_steps)
            self.mlp_frozen = step >= end

    def _layer(self, i: int) -> torch.Tensor:
        """The ``i``-th chosen layer's prefix ``(2, P, H_kv * d)``, without dropout: the MLP's
        output plus the flat part, whichever of the two there is (and trains now)."""
        if not hasattr(self, "control_trans"):
            return self.prefix[i]
        if not hasattr(self, "prefix"):
            return self._mlp(i)
        if self.mlp_frozen:
            return self._mlp_output()[i] + self.prefix[i]
        return self._mlp(i) + self.prefix[i].detach()

    @torch.no_grad()
    def _mlp_output(self) -> torch.Tensor:
        """Every layer's MLP output, computed once after the fold (until an MLP weight changes)."""
        mlp = [self.wte.weight, *self.control_trans.parameters()]
        version = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in mlp)
        if self._mlp_cache is None or self._mlp_cache[0] != version:
            self._mlp_cache = (version, torch.stack([self._mlp(i) for i in range(self.shape[0])]))
        return self._mlp_cache[1]

    def _mlp(self, i: int) -> torch.Tensor:
        """Layer ``i``'s MLP output: the rows of its last projection that belong to that layer
        (AdapterHub's layout)."""
        first, act, last = self.control_trans
        _, _, positions, half = self.shape
        rows = slice(i * 2 * half, (i + 1) * 2 * half)
        h = act(first(self.wte.weight))  # (P, bottleneck)
        return F.linear(h, last.weight[rows], last.bias[rows]).view(positions, 2, half).transpose(0, 1)

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """Every layer's prefix ``(layers, 2, P, H_kv * d)``, the MLP folded away (what is saved)."""
        version = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters())
        if self._folded is None or self._folded[0] != version:
            self._folded = (version, torch.stack([self._layer(i) for i in range(self.shape[0])]).contiguous())
        return self._folded[1]

    def prefix_at(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys and values ``(2, P, H_kv * d)``: folded at inference, through the
        MLP (and dropout) while training or while gradients are wanted."""
        i = self._index[layer]
        if not self.training and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return self.folded()[i]
        return self.dropout(self._layer(i))

    def gate_at(self, layer: int, hidden: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``(B, 2)``: each example's factors on layer ``layer``'s prefix keys and values, from the
        attention's input ``hidden`` (B, T, d) (AdapterHub: ``mean(sigmoid(gate(x)), dim=1)``,
        keys by its first output, values by its last); ``None`` when ungated."""
        if self.gates is None:
            return None
        if hidden is None:
            raise AdapterError("A gated prefix did not receive its attention's input; this model's attention module "
                               "takes no hidden_states argument. Use use_gating=False on it.")
        gate = self.gates[self._index[layer]]
        g = gate(hidden.to(gate.weight.dtype)).squeeze(1)  # (B, 1 or 2)
        return g[:, [0, -1]]

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(("wte.", "control_trans."))}
        return {**state, "prefix": self.folded().clone()}


register_preset("prefix_tuning", PrefixTuningConfig())
register_preset("prefix_tuning_flat", PrefixTuningConfig(flat=True))
