"""Resolve where adapters can go in a given model: a ``Layout``.

``Layout.of(model)`` finds the architecture entry for the model's config (see
``architectures.py``) and each named stack of transformer blocks, once. Methods then ask it for
sites, optionally restricted to some stacks (``stacks=("decoder",)``; ``layers=`` and
``leave_out=`` count within each stack):

* ``sublayer_sites(["ffn_out"], ...)``: residual sub-layer outputs (bottleneck adapters),
* ``linear_sites(["q", "v"], ...)``: projection weights by role (LoRA, IA3); the role
  ``"all-linear"`` stands for every projection the architecture map names,
* ``weight_sites(config)``: a weight-level method's sites (its ``target_modules``, its
  ``roles``, else the method's ``default_roles`` through the architecture's aliases),
* ``attention_sites(["self", "cross"], ...)``: one ``attention`` site per stack and attention role,
  spanning that role's attention module in every block (prefix tuning),
* ``generic_sites(patterns, ...)``: any module by name, for any ``nn.Module``;
* ``output_sites(...)``: a stack's output, tapping each block's output (L-adapters).

Place ids are relative to the layout so that checkpoints fit the model with or without a task
head: ``layers.3.ffn_out`` in single-stack models, ``decoder.layers.3.cross_attn_out`` where the
architecture has several stacks. ``check_hosts_run(sites)`` refuses hosts that the model's
forward never calls (``places/probe.py``). A pattern, role, place or stack that matches nothing raises
an error listing what there is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import nn

from ..errors import AdapterError
from ..places.probe import HostProbe
from ..places.slots import Site
from .architectures import ARCHITECTURES, ArchSpec, StackSpec, SubLayerSpec, is_decoder_config, spec_for
from .inputs import check_inputs, hidden_mask

__all__ = ["Layout", "StackLayout", "select_layers", "ArchSpec", "StackSpec", "SubLayerSpec", "ARCHITECTURES",
           "linear_features", "is_decoder_config", "spec_for", "HostTypes", "LINEAR_HOSTS"]


ALL_LINEAR = "all-linear"


def linear_features(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """``(in, out, transposed)`` for ``nn.Linear`` and ``transformers``' ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_f, out_f = module.weight.shape  # Conv1D stores the weight as (in, out)
        return in_f, out_f, True
    return None


@dataclass(frozen=True)
class HostTypes:
    """The modules a weight-level method can sit on: ``features(module)`` gives their ``(in, out)``
    widths (``None``: not a host), ``names`` says which they are, for errors. A method declares
    its own as ``weight_hosts`` on its config class (LoRA: ``methods.lora_layers.LORA_HOSTS``)."""

    features: Callable[[nn.Module], Optional[tuple[int, int]]]
    names: str


def _linear_widths(module: nn.Module) -> Optional[tuple[int, int]]:
    feats = linear_features(module)
    return None if feats is None else feats[:2]


LINEAR_HOSTS = HostTypes(_linear_widths, "nn.Linear (or transformers' Conv1D)")


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _find(model: nn.Module, suffix: str, kind: type = nn.Module) -> tuple[str, Optional[nn.Module]]:
    """The first module of type ``kind`` whose name is ``suffix`` or ends with ``"." + suffix``."""
    for name, module in model.named_modules():
        if isinstance(module, kind) and (name == suffix or name.endswith("." + suffix)):
            return name, module
    return "", None


@dataclass
class StackLayout:
    """One named stack of blocks in a concrete model.

    Args:
        name: ``"encoder"`` or ``"decoder"``.
        spec: the stack's entry in the architecture map.
        blocks: its transformer blocks, in order.
        path: module path of the ``nn.ModuleList`` holding them (``"model.decoder.layers"``).
        prefix: what place ids of its blocks start with (``"layers"``, ``"decoder.layers"``).
        root: module path of the stack as a whole (``"model.decoder"``; ``""`` = the whole model).
        num_attention_heads: this stack's attention heads (BART's decoder may differ).
    """

    name: str
    spec: StackSpec
    blocks: list[nn.Module]
    path: str
    prefix: str
    root: str
    num_attention_heads: Optional[int]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def places(self) -> list[str]:
        """The sub-layer places of its blocks (``attn_out``, ``cross_attn_out``, ``ffn_out``)."""
        return list(self.spec.sublayers)

    @property
    def roles(self) -> list[str]:
        """The linear roles of its blocks."""
        return list(self.spec.linears)


class Layout:
    """Where things are in one concrete model (resolved once, when the handle is made)."""

    def __init__(self, model: nn.Module, spec: Optional[ArchSpec], stacks: dict[str, StackLayout]):
        self.model = model
        self.spec = spec
        self.stacks = stacks
        self.config = getattr(model, "config", None)
        self.model_type: Optional[str] = getattr(self.config, "model_type", None)
        self.hidden_size: Optional[int] = getattr(self.config, "hidden_size", None)
        self.probe = HostProbe(model)

    @classmethod
    def of(cls, model: nn.Module) -> "Layout":
        config = getattr(model, "config", None)
        spec = spec_for(config) if config is not None else None
        stacks: dict[str, StackLayout] = {}
        if spec is not None:
            for name, stack_spec in spec.stacks.items():
                path, blocks = _find(model, stack_spec.layers, nn.ModuleList)
                if blocks is None:
                    continue  # e.g. T5EncoderModel: the encoder stack only
                prefix = f"{name}.layers" if spec.named_stacks else "layers"
                root = path.rpartition(".")[0] if spec.named_stacks else ""
                heads = getattr(config, stack_spec.heads_attr or "num_attention_heads", None)
                stacks[name] = StackLayout(name, stack_spec, list(blocks), path, prefix, root, heads)
            if not stacks:
                spec = None  # unknown variant of a known family: generic path only
        return cls(model, spec, stacks)

    # -- what the model is ---------------------------------------------------------------------
    @property
    def stack_names(self) -> list[str]:
        """The named stacks found, in forward order (``["encoder", "decoder"]`` for T5 / BART)."""
        return list(self.stacks)

    @property
    def is_decoder(self) -> bool:
        """A decoder-only (causal LM) model; see ``is_decoder_config``."""
        return is_decoder_config(self.config)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, stack after stack."""
        return [block for stack in self.stacks.values() for block in stack.blocks]

    @property
    def blocks_path(self) -> str:
        """Module path of the blocks of a single-stack model (``"encoder.layer"``); ``""`` without
        a layout. Models with several stacks have one per stack: ``stacks[name].path``."""
        if len(self.stacks) > 1:
            raise AdapterError(f"This {self.model_type} model has the stacks {self.stack_names}; "
                               "use layout.stacks[name].path for the blocks of one of them.")
        return next((s.path for s in self.stacks.values()), "")

    @property
    def num_layers(self) -> int:
        """Blocks in all stacks together."""
        return len(self.blocks)

    @property
    def num_attention_heads(self) -> Optional[int]:
        return getattr(self.config, "num_attention_heads", None)

    @property
    def num_key_value_heads(self) -> Optional[int]:
        """Key / value heads: fewer than the attention heads with grouped-query attention."""
        return getattr(self.config, "num_key_value_heads", None) or self.num_attention_heads

    @property
    def head_dim(self) -> Optional[int]:
        explicit = getattr(self.config, "head_dim", None) or getattr(self.config, "d_kv", None)  # d_kv: T5
        if explicit:
            return explicit
        heads = self.num_attention_heads
        return self.hidden_size // heads if self.hidden_size and heads else None

    @property
    def embeddings(self) -> Optional[nn.Module]:
        """The input token embeddings (``None`` when the model has no known ones)."""
        if self.spec is not None:
            module = _find(self.model, self.spec.embeddings, nn.Embedding)[1]
            if module is not None:
                return module
        getter = getattr(self.model, "get_input_embeddings", None)
        try:
            return getter() if getter is not None else None
        except NotImplementedError:
            return None

    def fingerprint(self) -> dict:
        """What a checkpoint records about the base model, to check it on load."""
        return {"model_type": self.model_type, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "stacks": {name: stack.num_layers for name, stack in self.stacks.items()}}

    # -- choosing stacks and layers -----------------------------------------------------------
    def select_stacks(self, names: Optional[Sequence[str]], what: str = "adapters") -> list[StackLayout]:
        """The stacks called ``names`` (``None`` = all), for placing ``what``."""
        if self.spec is None:
            if names is not None:
                raise AdapterError(
                    f"stacks={tuple(names)} needs a model with named stacks, but model type '{self.model_type}' has "
                    "no built-in layout. Drop stacks= and choose modules with target_modules=... instead."
                )
            raise AdapterError(
                f"No built-in layout for model type '{self.model_type}', so {what} cannot be placed "
                "automatically. Pass target_modules=... (a regex or a list of module-name suffixes) "
                "to place the adapter by name."
            )
        if names is None:
            return list(self.stacks.values())
        unknown = [n for n in names if n not in self.stacks]
        if unknown:
            raise AdapterError(
                f"This {self.model_type} model has no stack {unknown}; its stacks are {self.stack_names}. "
                f"Use one of them (stacks=('{self.stack_names[0]}',), or the prefix '{self.stack_names[0]}:' "
                "in the adapter name), or leave stacks unset for all."
            )
        return [self.stacks[n] for n in self.stack_names if n in names]

    def layer_indices(self, stack: StackLayout, layers: Optional[Sequence[int]] = None,
                      leave_out: Iterable[int] = ()) -> list[int]:
        """Indices of the blocks of ``stack`` chosen by ``layers`` minus ``leave_out``."""
        n = stack.num_layers
        chosen = list(range(n)) if layers is None else list(layers)
        where = f"the {stack.name} stack of this model has" if len(self.stacks) > 1 else "this model has"
        for option, values in (("layers", chosen), ("leave_out", list(leave_out))):
            bad = [i for i in values if not -n <= i < n]
            if bad:
                raise AdapterError(f"{option}={bad} is out of range: {where} {n} layers (0 to {n - 1}).")
        return select_layers(n, chosen, leave_out)

    # -- sites ---------------------------------------------------------------------------------
    def sublayer_sites(self, places: Sequence[str], layers: Optional[Sequence[int]] = None,
                       leave_out: Iterable[int] = (), stacks: Optional[Sequence[str]] = None) -> list[Site]:
        """``post`` sites at the outputs of residual sub-layers, in every chosen stack that has them."""
        chosen = self.select_stacks(stacks, "sub-layer adapters")
        missing = [p for p in places if not any(p in s.spec.sublayers for s in chosen)]
        if missing:
            have = list(dict.fromkeys(p for s in chosen for p in s.places))
            hint = (" Cross-attention exists in the decoder of encoder-decoder models (T5, BART)."
                    if "cross_attn_out" in missing else "")
            raise AdapterError(f"This {self.model_type} model has no place {missing} in the stack(s) "
                               f"{[s.name for s in chosen]}. Places: {', '.join(have)}.{hint}")
        sites = []
        for stack in chosen:
            for i in self.layer_indices(stack, layers, leave_out):
                block = stack.blocks[i]
                for place in places:
                    sub = stack.spec.sublayers.get(place)
                    if sub is None:
                        continue  # e.g. cross_attn_out in the encoder
                    sites.append(Site(
                        place_id=f"{stack.prefix}.{i}.{place}",
                        host=_get(block, sub.output),
                        in_features=self.hidden_size,
                        out_features=self.hidden_size,
                        layer=i,
                        residual_from=(_get(block, sub.residual), sub.residual_arg),
                        layer_norm=_get(block, sub.layer_norm) if sub.layer_norm else None,
                        place="post",
                        stack=stack.name,
                        input_from=(_get(block, sub.input), sub.input_arg),
                    ))
        return sites

    def output_sites(self, layers: Optional[Sequence[int]] = None, leave_out: Iterable[int] = (),
                     stacks: Optional[Sequence[str]] = None) -> list[Site]:
        """One ``post`` site per chosen stack at the module holding its blocks (the encoder,
        whose output the model's head reads), tapping the outputs of the chosen blocks
        (``Site.layers_from``): where an L-adapter sums every layer into what the head reads.
        Place id ``layers.output`` (``encoder.layers.output`` with several stacks)."""
        sites = []
        for stack in self.select_stacks(stacks, "layer-sum adapters"):
            owner = stack.path.rpartition(".")[0]
            if not owner:
                raise AdapterError(
                    f"The {stack.name} stack of this {self.model_type} model is the model itself, so no module's output "
                    "is the stack's output alone; wrap the backbone (e.g. load it with AutoModel) or use another method.")
            chosen = self.layer_indices(stack, layers, leave_out)
            if not chosen:
                raise AdapterError(f"layers={layers} with leave_out={tuple(leave_out)} leaves no layer of the "
                                   f"{stack.name} stack to read; keep at least one.")
            sites.append(Site(
                place_id=f"{stack.prefix}.output",
                host=self.model.get_submodule(owner),
                in_features=self.hidden_size,
                out_features=self.hidden_size,
                place="post",
                stack=stack.name,
                layers_from=tuple(stack.blocks[i] for i in chosen),
            ))
        return sites

    def linear_sites(self, roles: Sequence[str], layers: Optional[Sequence[int]] = None,
                     leave_out: Iterable[int] = (), stacks: Optional[Sequence[str]] = None, *,
                     defaults: bool = False, hosts: HostTypes = LINEAR_HOSTS) -> list[Site]:
        """``weight`` sites at the projections with these roles, in every chosen stack that has
        them. An explicit role no chosen stack has is an error; ``defaults=True`` (a method's
        default roles) resolves roles through the architecture's aliases and skips the rest."""
        chosen = self.select_stacks(stacks, "linear-layer adapters")
        per_stack = {s.name: self._roles_in(s, roles, defaults) for s in chosen}
        found = {r for rs in per_stack.values() for r in rs}
        wanted = [r for r in roles if r != ALL_LINEAR]
        unknown = [r for r in wanted if self._alias(r, defaults) not in found]
        if (unknown and not defaults) or not found:
            have = list(dict.fromkeys(r for s in chosen for r in s.roles))
            aliases = "".join(f" '{a}' is part of '{r}' here." for a, r in self.spec.aliases.items() if a in unknown)
            raise AdapterError(
                f"This {self.model_type} layout has no linear role {unknown or wanted} in the stack(s) "
                f"{[s.name for s in chosen]}. Roles: {', '.join(have)} ('{ALL_LINEAR}' = all of them).{aliases} "
                "Or pass target_modules=... to choose modules by name."
            )
        sites = []
        for stack in chosen:
            paths = list(dict.fromkeys(stack.spec.linears[r] for r in per_stack[stack.name]))  # roles may share one
            for i in self.layer_indices(stack, layers, leave_out):
                for path in paths:
                    sites.append(self._linear_site(f"{stack.prefix}.{i}.{path}", _get(stack.blocks[i], path), i,
                                                   stack.name, hosts))
        return sites

    def _alias(self, role: str, defaults: bool) -> str:
        return self.spec.aliases.get(role, role) if defaults else role

    def _roles_in(self, stack: StackLayout, roles: Sequence[str], defaults: bool) -> list[str]:
        """``roles`` as this stack has them (``"all-linear"`` expanded, aliases for defaults)."""
        expanded = [r for role in roles for r in (stack.roles if role == ALL_LINEAR else [self._alias(role, defaults)])]
        return [r for r in dict.fromkeys(expanded) if r in stack.spec.linears]

    def weight_sites(self, config: Any) -> list[Site]:
        """Sites of a weight-level method (LoRA, IA3): ``config.target_modules`` by name, else
        ``config.roles``, else the method's ``default_roles`` (a class attribute of its config)."""
        hosts = getattr(type(config), "weight_hosts", LINEAR_HOSTS)
        if config.target_modules is not None:
            return self.generic_sites(config.target_modules, config.layers, config.leave_out, "weight", config.stacks,
                                      hosts=hosts)
        if getattr(config, "roles", None):
            return self.linear_sites(config.roles, config.layers, config.leave_out, config.stacks, hosts=hosts)
        defaults = getattr(type(config), "default_roles", ())
        return self.linear_sites(defaults, config.layers, config.leave_out, config.stacks, defaults=True, hosts=hosts)

    def attention_shape(self, stack: StackLayout) -> tuple[int, int]:
        """``(key / value heads, head width)`` of the attention in ``stack`` (fewer key / value
        heads than query heads under grouped-query attention)."""
        heads = stack.num_attention_heads or self.num_attention_heads
        kv_heads = getattr(self.config, "num_key_value_heads", None) or heads
        head_dim = getattr(self.config, "head_dim", None) or getattr(self.config, "d_kv", None)
        return kv_heads, head_dim or self.hidden_size // heads

    def attention_sites(self, roles: Sequence[str], stacks: Optional[Sequence[str]] = None) -> list[Site]:
        """One ``attention`` site per chosen stack and attention role (``"self"``, ``"cross"``),
        whose ``members`` are that role's attention modules, block by block; a role a stack
        lacks is skipped there. Place ids: ``layers.self_attention``,
        ``decoder.layers.cross_attention``. Widths: ``in`` = hidden size, ``out`` = the width of
        one position's key and value together (``2 * kv_heads * head_dim``)."""
        chosen = self.select_stacks(stacks, "prefixes")
        sites = []
        for stack in chosen:
            paths = stack.spec.attention_modules
            kv_heads, head_dim = self.attention_shape(stack)
            for role in roles:
                if role not in paths:
                    continue
                members = tuple(_get(block, paths[role]) for block in stack.blocks)
                sites.append(Site(f"{stack.prefix}.{role}_attention", _get(self.model, stack.root), self.hidden_size,
                                  2 * kv_heads * head_dim, place="attention", stack=stack.name, members=members))
        if not sites:
            have = {s.name: list(s.spec.attention_modules) for s in chosen}
            raise AdapterError(
                f"This {self.model_type} layout names no attention module for {list(roles)} in the stack(s) "
                f"{[s.name for s in chosen]} (it has {have}); prefix tuning needs self- or cross-attention layers."
            )
        return sites

    def _linear_site(self, place_id: str, module: nn.Module, layer: Optional[int], stack: Optional[str],
                     hosts: HostTypes = LINEAR_HOSTS) -> Site:
        feats = hosts.features(module)
        if feats is None:
            raise AdapterError(
                f"Module '{place_id}' is a {type(module).__name__}, which this method cannot adapt; "
                f"it takes {hosts.names}. Choose such modules (target_modules=... or roles=...)."
            )
        return Site(place_id, module, feats[0], feats[1], layer=layer, place="weight", stack=stack)

    def embedding_site(self) -> Site:
        """A ``weight`` site on the input token embeddings, place id ``"embeddings"`` (the role
        ``"embeddings"``: the same place with or without a task head around the backbone)."""
        module = self.embeddings
        if not isinstance(module, nn.Embedding):
            raise AdapterError(f"This {self.model_type or type(self.model).__name__} model has no input token "
                               "embeddings (nn.Embedding) that adapterkit can find; choose the module with "
                               "target_modules=... instead of the role 'embeddings'.")
        return Site("embeddings", module, module.num_embeddings, module.embedding_dim, place="weight")

    def generic_sites(
        self,
        patterns: "str | Sequence[str]",
        layers: Optional[Sequence[int]] = None,
        leave_out: Iterable[int] = (),
        place: str = "weight",
        stacks: Optional[Sequence[str]] = None,
        *,
        hosts: HostTypes = LINEAR_HOSTS,
    ) -> list[Site]:
        """Sites for modules chosen by name: a regex (full match) or a list of name suffixes."""
        names = [name for name, _ in self.model.named_modules() if name]
        if isinstance(patterns, str):
            regex = re.compile(patterns)
            matched = [n for n in names if regex.fullmatch(n)]
        else:
            matched = [n for n in names if any(n == p or n.endswith("." + p) for p in patterns)]
        if not matched:
            shown = [n for n in names if linear_features(self.model.get_submodule(n))] or names
            raise AdapterError(
                f"target_modules={patterns!r} matches no module. Candidates (Linear layers): "
                f"{', '.join(shown[:40])}{' ...' if len(shown) > 40 else ''}."
            )
        selected = None if stacks is None else {s.name for s in self.select_stacks(stacks)}
        by_layer = layers is not None or bool(leave_out)
        wanted: dict[str, set[int]] = {}
        sites = []
        for name in matched:
            stack, layer, in_blocks = self._position(name)
            if selected is not None and (stack is None or stack.name not in selected):
                continue
            if by_layer:
                if layer is None:
                    continue
                if in_blocks:
                    if stack.name not in wanted:
                        wanted[stack.name] = set(self.layer_indices(stack, layers, leave_out))
                    if layer not in wanted[stack.name]:
                        continue
                elif (layers is not None and layer not in layers) or layer in leave_out:
                    continue
            module = self.model.get_submodule(name)
            place_id = self.place_id_for(name)
            stack_name = stack.name if stack is not None else None
            if place == "weight":
                sites.append(self._linear_site(place_id, module, layer, stack_name, hosts))
            else:
                in_f, out_f = _module_widths(module, name)
                sites.append(Site(place_id, module, in_f, out_f, layer=layer, place=place, stack=stack_name))
        if not sites:
            found = sorted({i for i in (self._position(n)[1] for n in matched) if i is not None})
            where = f" in the stack(s) {sorted(selected)}" if selected is not None else ""
            raise AdapterError(
                f"target_modules={patterns!r} matched {matched[:10]}, but none in layers={layers} "
                f"(leave_out={tuple(leave_out)}){where}; the matched modules are in layers {found}."
            )
        return sites

    def _position(self, name: str) -> tuple[Optional[StackLayout], Optional[int], bool]:
        """The stack a module belongs to, its layer index, and whether it lies inside a block."""
        for stack in self.stacks.values():
            if name.startswith(stack.path + "."):
                return stack, int(name[len(stack.path) + 1:].split(".")[0]), True
        # the first numeric name component: "encoder.3.fc", or "3.fc" in an nn.Sequential of blocks
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        layer = int(m.group(1)) if m else None
        owner = next((s for s in self.stacks.values() if not s.root or name.startswith(s.root + ".")), None)
        return owner, layer, False

    def place_id_for(self, name: str) -> str:
        """Layout-relative place id (``layers.3.attention.self.query``,
        ``decoder.layers.0.fc1``, ``encoder.layernorm_embedding``) so that checkpoints fit a
        model whether or not it has a task head around the backbone."""
        for stack in self.stacks.values():
            if name.startswith(stack.path + "."):
                return f"{stack.prefix}.{name[len(stack.path) + 1:]}"
            if stack.root and name.startswith(stack.root + "."):
                return f"{stack.name}.{name[len(stack.root) + 1:]}"
        return name

    # -- what the model reads (inputs.py) -----------------------------------------------------
    @property
    def modality(self) -> str:
        """``"text"``, ``"image"`` or ``"audio"`` (text without a layout)."""
        return self.spec.modality if self.spec is not None else "text"

    def check_inputs(self, inputs: dict) -> None:
        """Refuse image / audio tensors of a shape the model cannot take, naming the fix."""
        check_inputs(self, inputs)

    def hidden_mask(self, attention_mask, hidden):
        """The mask over the positions of ``hidden``: frame-level for speech models."""
        return hidden_mask(self, attention_mask, hidden)

    # -- hosts that never run ------------------------------------------------------------------
    def check_hosts_run(self, sites: Sequence[Site]) -> None:
        """Refuse sites whose host module the model's forward never calls (its weight is read
        directly, as WavLM's attention hands ``q_proj.weight`` to ``F.multi_head_attention_forward``):
        an adapter there would train nothing and change nothing. One probe forward per layout;
        skipped where the model cannot be probed (see ``probe.HostProbe``)."""
        self.probe.check(sites)


def select_layers(n: int, layers: Optional[Sequence[int]], leave_out: Iterable[int] = ()) -> list[int]:
    """Indices ``0..n-1`` chosen by ``layers`` (``None`` = all; negative ones count from the end)
    minus ``leave_out``; ranges are checked by ``Layout.layer_indices``."""
    skip = {i % n for i in leave_out}
    return [i % n for i in (range(n) if layers is None else layers) if i % n not in skip]


def _module_widths(module: nn.Module, name: str) -> tuple[int, int]:
    feats = linear_features(module)
    if feats:
        return feats[0], feats[1]
    linears = [linear_features(m) for m in module.modules() if linear_features(m)]
    if linears:
        return linears[0][0], linears[-1][1]
    norm = getattr(module, "normalized_shape", None)
    if norm:
        return norm[-1], norm[-1]
    raise AdapterError(
        f"Cannot tell the width of module '{name}' ({type(module).__name__}): target a Linear layer or a "
        "block that contains Linear layers."
    )

