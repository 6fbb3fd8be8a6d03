"""Resolve where adapters can go in a given model: a ``Layout``.

``Layout.of(model)`` finds the architecture entry for ``model.config.model_type`` (see
``architectures.py``) and the list of transformer blocks, once. Methods then ask it for sites:

* ``sublayer_sites(["ffn_out"], layers)``: residual sub-layer outputs (bottleneck adapters),
* ``linear_sites(["q", "v"], layers)``: projection weights by role (LoRA, IA3); the role
  ``"all-linear"`` stands for every projection the architecture map names,
* ``generic_sites(patterns, layers)``: any module by name, for any ``nn.Module``.

A pattern that matches nothing raises an error listing the candidate module names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from torch import nn

from ..errors import AdapterError
from ..slots import Site
from .architectures import ARCHITECTURES, ArchSpec, SubLayerSpec, is_decoder_config, spec_for

__all__ = ["Layout", "ArchSpec", "SubLayerSpec", "ARCHITECTURES", "linear_features", "is_decoder_config"]


ALL_LINEAR = "all-linear"


def linear_features(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """``(in, out, transposed)`` for ``nn.Linear`` and ``transformers``' ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_f, out_f = module.weight.shape  # Conv1D stores the weight as (in, out)
        return in_f, out_f, True
    return None


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


@dataclass
class Layout:
    """Where things are in one concrete model (resolved once, when the handle is made)."""

    model: nn.Module
    spec: Optional[ArchSpec]
    blocks: list[nn.Module]
    blocks_path: str
    model_type: Optional[str]
    hidden_size: Optional[int]

    @classmethod
    def of(cls, model: nn.Module) -> "Layout":
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        hidden = getattr(config, "hidden_size", None)
        spec = spec_for(model_type)
        blocks: list[nn.Module] = []
        blocks_path = ""
        if spec is not None:
            for name, module in model.named_modules():
                if isinstance(module, nn.ModuleList) and (name == spec.layers or name.endswith("." + spec.layers)):
                    blocks, blocks_path = list(module), name
                    break
            if not blocks:
                spec = None  # unknown variant of a known family: generic path only
        return cls(model, spec, blocks, blocks_path, model_type, hidden)

    # -- helpers -------------------------------------------------------------------------------
    @property
    def is_decoder(self) -> bool:
        """A decoder-only (causal LM) model; see ``is_decoder_config``."""
        return is_decoder_config(getattr(self.model, "config", None))

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def _layer_indices(self, layers: Optional[Sequence[int]], leave_out: Iterable[int] = ()) -> list[int]:
        n = self.num_layers
        chosen = list(range(n)) if layers is None else list(layers)
        for option, values in (("layers", chosen), ("leave_out", list(leave_out))):
            bad = [i for i in values if not -n <= i < n]
            if bad:
                raise AdapterError(f"{option}={bad} is out of range: this model has {n} layers (0 to {n - 1}).")
        skip = {i % n for i in leave_out}
        return [i % n for i in chosen if i % n not in skip]

    def _need_spec(self, what: str) -> ArchSpec:
        if self.spec is None:
            raise AdapterError(
                f"No built-in layout for model type '{self.model_type}', so '{what}' cannot be placed "
                "automatically. Pass target_modules=... (a regex or a list of module-name suffixes) "
                "to place the adapter by name."
            )
        return self.spec

    def fingerprint(self) -> dict:
        """What a checkpoint records about the base model, to check it on load."""
        return {"model_type": self.model_type, "hidden_size": self.hidden_size, "num_layers": self.num_layers}

    # -- sites ---------------------------------------------------------------------------------
    def sublayer_sites(
        self, places: Sequence[str], layers: Optional[Sequence[int]] = None, leave_out: Iterable[int] = ()
    ) -> list[Site]:
        spec = self._need_spec("sub-layer adapters")
        for place in places:
            if place not in spec.sublayers:
                raise AdapterError(f"Unknown place '{place}'. Choose from: {', '.join(spec.sublayers)}.")
        sites = []
        for i in self._layer_indices(layers, leave_out):
            block = self.blocks[i]
            for place in places:
                sub: SubLayerSpec = spec.sublayers[place]
                width = self.hidden_size
                sites.append(
                    Site(
                        place_id=f"layers.{i}.{place}",
                        host=_get(block, sub.output),
                        in_features=width,
                        out_features=width,
                        layer=i,
                        residual_from=(_get(block, sub.residual), sub.residual_arg),
                        layer_norm=_get(block, sub.layer_norm) if sub.layer_norm else None,
                        place="post",
                    )
                )
        return sites

    def linear_sites(
        self, roles: Sequence[str], layers: Optional[Sequence[int]] = None, leave_out: Iterable[int] = ()
    ) -> list[Site]:
        spec = self._need_spec("linear-layer adapters")
        if ALL_LINEAR in roles:  # PEFT's name for every projection of the blocks
            roles = list(dict.fromkeys([r for r in roles if r != ALL_LINEAR] + list(spec.linears)))
        unknown = [r for r in roles if r not in spec.linears]
        if unknown:
            raise AdapterError(
                f"This {self.model_type} layout has no linear role {unknown}. Roles: {', '.join(spec.linears)} "
                f"('{ALL_LINEAR}' = all of them); or pass target_modules=... to choose modules by name."
            )
        paths = list(dict.fromkeys(spec.linears[role] for role in roles))  # two roles may name one module
        sites = []
        for i in self._layer_indices(layers, leave_out):
            for path in paths:
                sites.append(self._linear_site(f"layers.{i}.{path}", _get(self.blocks[i], path), i))
        return sites

    def weight_sites(self, config, default_roles: str) -> list[Site]:
        """Sites of a weight-level method (LoRA, IA3): ``config.target_modules`` by name, else
        ``config.roles``, else the architecture's default roles (the ``ArchSpec`` field named
        ``default_roles``, e.g. ``"lora_default"``)."""
        if config.target_modules is not None:
            return self.generic_sites(config.target_modules, config.layers, config.leave_out, place="weight")
        roles = config.roles or getattr(self._need_spec(config.method), default_roles)
        return self.linear_sites(roles, config.layers, config.leave_out)

    def _linear_site(self, place_id: str, module: nn.Module, layer: Optional[int]) -> Site:
        feats = linear_features(module)
        if feats is None:
            raise AdapterError(
                f"Module '{place_id}' is a {type(module).__name__}, not a Linear layer; "
                "this method needs nn.Linear (or transformers' Conv1D) targets."
            )
        return Site(place_id, module, feats[0], feats[1], layer=layer, place="weight")

    def generic_sites(
        self,
        patterns: "str | Sequence[str]",
        layers: Optional[Sequence[int]] = None,
        leave_out: Iterable[int] = (),
        place: str = "weight",
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
        wanted = None
        if layers is not None or leave_out:
            wanted = set(self._layer_indices(layers, leave_out)) if self.blocks else None
        sites = []
        for name in matched:
            module = self.model.get_submodule(name)
            layer = self._layer_of(name)
            if layers is not None or leave_out:
                if layer is None:
                    continue
                if wanted is not None and layer not in wanted:
                    continue
                if wanted is None and ((layers is not None and layer not in layers) or layer in leave_out):
                    continue
            place_id = self._relative(name)
            if place == "weight":
                sites.append(self._linear_site(place_id, module, layer))
            else:
                in_f, out_f = _module_widths(module, name)
                sites.append(Site(place_id, module, in_f, out_f, layer=layer, place=place))
        if not sites:
            found = sorted({i for i in map(self._layer_of, matched) if i is not None})
            raise AdapterError(
                f"target_modules={patterns!r} matched {matched[:10]}, but none in layers={layers} "
                f"(leave_out={tuple(leave_out)}); the matched modules are in layers {found}."
            )
        return sites

    def _layer_of(self, name: str) -> Optional[int]:
        if self.blocks_path and name.startswith(self.blocks_path + "."):
            return int(name[len(self.blocks_path) + 1 :].split(".")[0])
        # the first numeric name component: "encoder.3.fc", or "3.fc" in an nn.Sequential of blocks
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        return int(m.group(1)) if m else None

    def _relative(self, name: str) -> str:
        """Layout-relative place id (``layers.3.attention.self.query``) so that checkpoints
        fit a model whether or not it has a task head around the backbone."""
        if self.blocks_path and name.startswith(self.blocks_path + "."):
            return "layers." + name[len(self.blocks_path) + 1 :]
        return name


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
