"""The ``input`` place: rows prepended to the model's input sequence (prompt tuning, P-adapter).

The place's *host* is the module that takes the whole sequence and its mask
(``places/input_hosts.py``: ``BertModel``, ``GPT2Model``, ``LlamaModel``, the T5 / BART encoder
stack, a speech encoder). Its value is the input sequence ``(B, T, d)``; a plan returns it with
prompt rows in front (``methods/prompt_tuning.py``). An ``InputSlot`` runs it with three hooks:

* a **forward pre-hook** on the host (``with_kwargs``): token ids become embeddings through the
  host's own embedding (or the user's ``inputs_embeds`` are taken as they are), the prompt rows go
  in, and the attention mask, ``position_ids`` and ``token_type_ids`` grow to match;
* a **forward hook** on the host that cuts the prompt positions off every sequence output
  (``last_hidden_state``, ``hidden_states``, ``attentions``; the pooler is run again on the real
  first token), so heads, LM heads, labels, losses and pooling see the user's own length;
* on encoder-decoders instead, a **pre-hook on the decoder** that extends its
  ``encoder_attention_mask``: the decoder cross-attends to the prompt positions (Lester et al.;
  PEFT), and the encoder's output keeps them.

**Rows with prompts of different lengths, or none** (per-example routing): the batch gets ``Pmax``
extra positions; row ``r`` with a prompt of ``p_r`` rows has ``Pmax - p_r`` *dead* positions, masked
out, so that each row computes what it computes alone. In decoders (which ``generate()`` runs with
a key/value cache) the dead positions go first, ``[dead, prompt, input]``, with explicit position
ids: prompt ``0 .. p_r - 1``, input ``bare + p_r``, where ``bare`` are the positions the model gives
the input without a prompt. Later ``generate()`` steps (a non-empty cache) only extend the mask
by the ``Pmax`` prompt columns and shift the positions by ``p_r``. Encoders (no cache) put them
last, ``[prompt, input, dead]``, as right padding, so the model's own position scheme (learned,
RoBERTa's offset, relative, convolutional) gives every row its positions alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import nn

from .. import context
from ..errors import AdapterError
from .input_hosts import InputHost, find_input_host
from .slots import Site, Slot, SlotIO, register_slot


@dataclass(frozen=True)
class InputSite(Site):
    """A ``Site`` at the ``input`` place, with its input host."""

    input_host: Optional[InputHost] = None


def input_site(layout, stacks=None) -> InputSite:
    """The one ``input`` site of a model (``stacks`` may only name the stack the input enters)."""
    host = find_input_host(layout.model)
    stack = "encoder" if host.spec.consumer is not None else next(iter(layout.stacks), None)
    if stacks is not None and stack not in stacks:
        raise AdapterError(f"Prompt tuning goes where the input enters this {layout.model_type} model, the "
                           f"'{stack}' stack; drop stacks={tuple(stacks)} (or name '{stack}').")
    return InputSite(place_id=host.place_id, host=host.module, in_features=host.width, out_features=host.width,
                     place="input", stack=stack, input_host=host)


class PromptRows(NamedTuple):
    """What a plan at the input place gives for one batch: ``rows`` (B, Pmax, d), each row's
    prompt right-aligned (dead rows in front are zeros), and ``lengths`` (B,) of the prompts."""

    rows: torch.Tensor
    lengths: torch.Tensor


class PromptLayout:
    """Where prompt, input and dead positions sit for one call (see the module docstring).

    Everything is built in the *front* order ``[dead, prompt, input]`` by concatenation, then,
    for encoders with rows of different prompt lengths, gathered into ``[prompt, input, dead]``."""

    def __init__(self, lengths: torch.Tensor, pmax: int, length: int, front: bool):
        self.lengths, self.pmax, self.length = lengths, pmax, length
        self.uniform = bool((lengths == pmax).all())
        j = torch.arange(pmax + length, device=lengths.device)
        self.src: Optional[torch.Tensor] = None  # (B, Pmax + T): front position of each position
        if not front and not self.uniform:
            src = (pmax - lengths)[:, None] + j[None]
            self.src = torch.where(j[None] < (lengths[:, None] + length), src, torch.zeros_like(src))

    @property
    def live(self) -> torch.Tensor:
        """(B, Pmax): which of the front prompt columns hold a row's prompt."""
        return torch.arange(self.pmax, device=self.lengths.device)[None] >= (self.pmax - self.lengths)[:, None]

    def arrange(self, front: torch.Tensor) -> torch.Tensor:
        """A (B, Pmax + T, ...) tensor in front order -> this call's order."""
        if self.src is None:
            return front
        index = self.src.view(*self.src.shape, *([1] * (front.dim() - 2))).expand(-1, -1, *front.shape[2:])
        return front.gather(1, index)

    def mask(self, mask: Optional[torch.Tensor], batch: int, seen: int) -> Optional[torch.Tensor]:
        """The attention mask over prompt + input; ``seen``: input positions before this call
        (cached), so ``mask`` covers ``seen + T``. ``None`` stays ``None`` where every row is live."""
        if mask is None and self.uniform:
            return None
        if mask is None:
            mask = torch.ones(batch, seen + self.length, dtype=torch.long, device=self.lengths.device)
        if mask.dim() != 2:
            raise AdapterError(f"Prompt tuning extends a 2D attention mask (batch, tokens), but got one of shape "
                               f"{tuple(mask.shape)}; pass the 2D padding mask and let the model build the rest.")
        front = torch.cat([self.live.to(mask.dtype).expand(mask.shape[0], -1), mask], dim=1)
        return self.arrange(front) if seen == 0 else front

    def positions(self, given: Optional[torch.Tensor], batch: int, seen: int) -> torch.Tensor:
        """Position ids: prompt ``0 .. p_r - 1``, input ``bare + p_r`` (dead: 0)."""
        device = self.lengths.device
        if given is None:
            given = torch.arange(seen, seen + self.length, device=device)[None]
        bare = given.expand(batch, -1)
        shifted = bare + self.lengths[:, None].to(bare.dtype)
        if seen:
            return shifted
        prompt = (torch.arange(self.pmax, device=device)[None] - (self.pmax - self.lengths)[:, None]).clamp(min=0)
        return self.arrange(torch.cat([prompt.to(bare.dtype), shifted], dim=1))

    def extend(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values (token types) with zeros at the prompt and dead positions."""
        return self.arrange(torch.cat([values.new_zeros(values.shape[0], self.pmax), values], dim=1))

    def take(self, seq: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The input positions of a (B, Pmax + T, ...) sequence along ``dim``."""
        if self.src is None:
            return seq.narrow(dim, self.pmax, self.length)
        index = self.lengths[:, None] + torch.arange(self.length, device=self.lengths.device)[None]  # (B, T)
        index = index.view(index.shape[0], *([1] * (dim - 1)), self.length, *([1] * (seq.dim() - dim - 1)))
        sizes = list(seq.shape)
        sizes[dim] = self.length
        return seq.gather(dim, index.expand(*sizes))


def routed_rows(units: Mapping[str, nn.Module]) -> Optional[Callable[[SlotIO], PromptRows]]:
    """The input place's plan under per-example routing: each row's own prompt (or none)."""
    if not units:
        return None

    def plan(io: SlotIO) -> PromptRows:
        routing = context.current().routing
        x = io.x
        pieces = []
        for name, index in routing.groups(x.shape[0]):
            unit = units.get(name)
            if unit is not None:
                seq = unit.run(io.rows(index))
                pieces.append((index, seq[:, : seq.shape[1] - x.shape[1]]))
        pmax = max((rows.shape[1] for _, rows in pieces), default=0)
        out = x.new_zeros(x.shape[0], pmax, x.shape[2])
        lengths = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for index, rows in pieces:
            padded = torch.cat([rows.new_zeros(rows.shape[0], pmax - rows.shape[1], rows.shape[2]), rows], dim=1)
            out = out.index_copy(0, index, padded)
            lengths[index] = rows.shape[1]
        return PromptRows(out, lengths)

    return plan


def _strip(value: Any, layout: PromptLayout) -> Any:
    """Cut the prompt positions off sequence outputs: (B, L, d) states, (B, H, L, L) attentions."""
    full = layout.pmax + layout.length
    if isinstance(value, torch.Tensor):
        if value.dim() == 3 and value.shape[1] == full:
            return layout.take(value)
        if value.dim() == 4 and value.shape[-1] == full and value.shape[-2] == full:
            return layout.take(layout.take(value, 2), 3)
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_strip(v, layout) for v in value)
    return value


class InputSlot(Slot):
    """The runtime of the ``input`` place (see the module docstring)."""

    site: InputSite

    def __init__(self, site: InputSite):
        super().__init__(site)
        self._signatures: dict[type, inspect.Signature] = {}  # by host class

    def compile_routed(self, units: Mapping[str, nn.Module], routed_plan: Callable):
        return routed_rows(units)  # rows prepended per example, not a per-example plan

    def _install(self) -> None:
        host = self.site.input_host
        self._handles.append(host.module.register_forward_pre_hook(self._enter, with_kwargs=True))
        if host.consumer is not None:
            self._handles.append(host.consumer.register_forward_pre_hook(self._enter_consumer, with_kwargs=True))
        else:
            self._handles.append(host.module.register_forward_hook(self._leave))

    # -- the prompt rows for one call -------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> Optional[PromptRows]:
        ctx = context.current()
        io = SlotIO(x=x, y=None, place="input")
        try:
            if ctx is not None and ctx.routing is not None:
                return self.routed(io) if self.routed is not None else None
            if self.plan is None:
                return None
            seq = self.plan(io)
        except RuntimeError as err:
            raise AdapterError(
                "Prompt-tuning adapters compose only one after the other (a Stack) or as an Average of prompts of "
                f"one length; this setup combines them otherwise ({err}). Use adapter_names=[...] to give examples "
                "different prompts."
            ) from None
        p = seq.shape[1] - x.shape[1]
        return PromptRows(seq[:, :p], torch.full((x.shape[0],), p, dtype=torch.long, device=x.device))

    def _layout(self, x: torch.Tensor, length: int) -> tuple[Optional[PromptRows], Optional[PromptLayout]]:
        rows = self._rows(x)
        if rows is None or rows.rows.shape[1] == 0:
            return None, None
        front = self.site.input_host.spec.decoder
        return rows, PromptLayout(rows.lengths, rows.rows.shape[1], length, front)

    def _arguments(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """Every argument of the host's forward by name (``**kwargs`` flattened)."""
        sig = self._signatures.get(type(module))
        if sig is None:
            sig = self._signatures[type(module)] = inspect.signature(module.forward)
        bound = dict(sig.bind_partial(*args, **kwargs).arguments)
        for name, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        return bound

    # -- hooks ------------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple, kwargs: dict):
        self._local.layout = None
        if self._current_plan() is None:
            return None
        host = self.site.input_host
        kw = self._arguments(module, args, kwargs)
        seq_key = host.spec.sequence_arg
        x, ids = kw.get(seq_key), kw.get("input_ids") if host.spec.embeddings else None
        if x is None and ids is None:
            return None  # the model raises its own error
        cache = kw.get("cache", kw.get("past_key_values"))
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if seen:  # a later generate() step: the prompt is in the cache already
            return self._continue(kw, x, ids, seen)
        if x is None:
            x = host.embedding(ids)
        rows, layout = self._layout(x, x.shape[1])
        if layout is None:
            return None
        self._check_positions(layout, 0)
        kw[seq_key] = layout.arrange(torch.cat([rows.rows.to(x.dtype), x], dim=1))
        if host.spec.embeddings:
            kw["input_ids"] = None
        self._extend(kw, layout, x.shape[0], 0)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = layout.extend(kw["token_type_ids"])
        ctx = context.current()
        if ctx is not None:
            ctx.prompt_length = layout.pmax
        self._local.layout = layout
        return (), kw

    def _continue(self, kw: dict, x: Optional[torch.Tensor], ids: Optional[torch.Tensor], seen: int):
        """A step with a filled cache: extend the mask by the prompt columns, shift positions."""
        host = self.site.input_host
        if not host.spec.decoder:
            raise AdapterError("A key/value cache reached an encoder with a prompt; prompt tuning caches only "
                               "decoder-only models (GPT-2, Llama family).")
        batch, length = (x.shape[0], x.shape[1]) if x is not None else ids.shape[:2]
        weight = host.embedding.weight  # a quantized table's tensor has no new_zeros: build a plain one
        probe = torch.zeros(batch, 0, host.width, dtype=weight.dtype, device=weight.device)
        _, layout = self._layout(probe, length)
        if layout is None:
            return None
        seen -= layout.pmax  # input positions already in the cache
        self._check_positions(layout, seen)
        self._extend(kw, layout, batch, seen)
        return (), kw

    def _extend(self, kw: dict, layout: PromptLayout, batch: int, seen: int) -> None:
        kw["attention_mask"] = layout.mask(kw.get("attention_mask"), batch, seen)
        given = kw.get("position_ids")
        if given is not None or (self.site.input_host.spec.decoder and not layout.uniform):
            if given is not None and given.dim() != 2:
                raise AdapterError(f"Prompt tuning shifts 2D position_ids (batch, tokens); got shape {tuple(given.shape)}.")
            kw["position_ids"] = layout.positions(given, batch, seen)

    def _check_positions(self, layout: PromptLayout, seen: int) -> None:
        limit = self.site.input_host.max_positions
        need = seen + layout.pmax + layout.length
        if limit is not None and need > limit:
            raise AdapterError(
                f"The prompt ({layout.pmax} positions) and the input ({seen + layout.length} tokens) need {need} "
                f"positions, but this model has {limit} (max_position_embeddings). Shorten the input to "
                f"{limit - layout.pmax} tokens or less, or use a shorter prompt."
            )

    def _leave(self, module: nn.Module, args: tuple, output: Any):
        layout = getattr(self._local, "layout", None)
        self._local.layout = None
        if layout is None:
            return None
        if isinstance(output, Mapping):
            for key in list(output.keys()):
                output[key] = _strip(output[key], layout)
            pooler = getattr(module, "pooler", None)
            if output.get("pooler_output") is not None and callable(pooler):
                output["pooler_output"] = pooler(output["last_hidden_state"])  # on the real first token
            return output
        if isinstance(output, tuple):
            return tuple(_strip(v, layout) for v in output)
        return _strip(output, layout)

    def _enter_consumer(self, module: nn.Module, args: tuple, kwargs: dict):
        """The decoder of an encoder-decoder: extend its ``encoder_attention_mask`` to the prompt."""
        if self._current_plan() is None:
            return None
        kw = self._arguments(module, args, kwargs)
        states = kw.get("encoder_hidden_states")
        if states is None:
            return None
        probe = states.new_zeros(states.shape[0], 0, states.shape[2])
        rows = self._rows(probe)
        if rows is None or rows.rows.shape[1] == 0:
            return None
        pmax = rows.rows.shape[1]
        mask = kw.get("encoder_attention_mask")
        length = states.shape[1] - pmax
        if length < 0 or (mask is not None and mask.shape[-1] != length):
            return None  # not the prompted encoder's output, or extended already
        layout = PromptLayout(rows.lengths, pmax, length, front=False)
        kw["encoder_attention_mask"] = layout.mask(mask, states.shape[0], 0)
        return (), kw


register_slot("input", InputSlot)
