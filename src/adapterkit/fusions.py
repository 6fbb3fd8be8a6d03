"""The Fuse lifecycle of a handle: its fusion layers, from adding to saving and loading.

``Fusions`` is what ``AdapterModel.fusions`` holds: an ``nn.ModuleDict`` from ``Fuse.key``
(``"a,b"``) to that fuse's fusion layers (``{site key: FusionUnit}``, ``composition/fuse.py``),
so their parameters are part of the handle's ``state_dict`` (``fusions.*``). Its methods are the
steps of AdapterFusion's life that do not change the active setup: build the layers for a
``Fuse`` over adapters already in the model, drop those of a deleted adapter, read the attention
scores of the last forward, and write or read the layers (adapterkit's checkpoint format, or
AdapterHub's fusion folder through ``interop.fusion``). ``FusionMethods`` is the part of ``AdapterModel`` users call
(AdapterHub's names: ``add_adapter_fusion``, ``train_adapter_fusion``, ...); it activates and
trains a ``Fuse`` through the handle and leaves the layers to ``Fusions``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._version import __version__
from .checkpoint_format import check_base_shape, load_exact, read_checkpoint, write_checkpoint
from .composition.blocks import Block, Fuse, as_fuse
from .composition.fuse import FusionConfig, build_fusion
from .errors import AdapterError, CheckpointError
from .fingerprint import base_identity
from .interop import fusion as ah_fusion
from .setup_lock import setup_change

if TYPE_CHECKING:  # pragma: no cover
    from .model import AdapterModel

FORMATS = ("adapterkit", "adapterhub")


class Fusions(nn.ModuleDict):
    """The fusion layers of one handle, by ``Fuse.key``, and their lifecycle (module docstring)."""

    def build(self, fuse: Fuse, records: Mapping[str, Any], config: "FusionConfig | dict | None",
              like: Optional[torch.Tensor], training: bool) -> nn.ModuleDict:
        """Fresh fusion layers for ``fuse`` (not yet added), on ``like``'s device and dtype."""
        if len(fuse.names()) < 2:
            raise AdapterError(f"{fuse!r} fuses one adapter; list two or more.")
        cfg = config if isinstance(config, FusionConfig) else FusionConfig.from_dict(config or {})
        return _placed(build_fusion(fuse.names(), records, cfg), like, training)

    def at(self, site_key: str) -> dict[str, nn.Module]:
        """The fusion layers at one site, by ``Fuse.key`` (what ``Fuse`` plans look up)."""
        return {fuse: layers[site_key] for fuse, layers in self.items() if site_key in layers}

    def drop_adapter(self, name: str) -> None:
        """Delete the layers of every fuse holding adapter ``name`` (they mean nothing without it)."""
        for key in [k for k in self if name in k.split(",")]:
            del self[key]

    def missing(self, setup: Block) -> list[Fuse]:
        """The ``Fuse`` blocks of a setup that have no fusion layers yet."""
        return [f for f in _fuse_blocks(setup) if f.key not in self]

    def require(self, fuse: Union[Fuse, Sequence[str]]) -> Fuse:
        """``fuse`` as a ``Fuse`` whose layers exist, or a clear error."""
        fuse = as_fuse(fuse)
        if fuse.key not in self:
            raise AdapterError(f"{fuse!r} has no fusion layers; call add_adapter_fusion() first.")
        return fuse

    def scores(self, fuse: Union[Fuse, Sequence[str]]) -> dict[str, torch.Tensor]:
        """The attention scores of the last forward at each fusion layer, by place id:
        (batch, tokens, adapters), detached."""
        fuse = self.require(fuse)
        return {key.replace("-", "."): unit.scores for key, unit in self[fuse.key].items() if unit.scores is not None}

    def save(self, directory: "str | os.PathLike", fuse: Union[Fuse, Sequence[str]], model: "AdapterModel", *,
             format: str = "adapterkit") -> None:
        """Write the layers of ``fuse`` (safetensors + JSON, atomically), or AdapterHub's fusion folder."""
        fuse = self.require(fuse)
        if format not in FORMATS:
            raise AdapterError(f"Unknown fusion format {format!r}; choose 'adapterkit' or 'adapterhub'.")
        units = self[fuse.key]
        first = next(iter(units.values()))
        if format == "adapterhub":
            ah_fusion.write(directory, fuse.names(), first.config, units.state_dict(), model)
            return
        meta = {"fusion": {"adapters": fuse.names()}, "adapterkit_version": __version__,
                "config": first.config.to_dict(), "places": list(units.keys()),
                "base_model": {**model.layout.fingerprint(), **base_identity(model)}}
        write_checkpoint(directory, meta, {f"fusion.{k}": v for k, v in units.state_dict().items()})

    def read(self, directory: "str | os.PathLike", model: "AdapterModel") -> tuple[Fuse, nn.ModuleDict]:
        """The ``Fuse`` and its layers saved in ``directory`` (by ``save`` or by AdapterHub), checked
        against ``model`` and loaded, not yet added: nothing changes on an error."""
        if ah_fusion.is_adapterhub_fusion(directory):
            names, config, state = ah_fusion.read(directory, model)
            tensors = {f"fusion.{k}": v for k, v in state.items()}
            meta: dict = {}
        else:
            meta, tensors = read_checkpoint(directory)
            info = meta.get("fusion")
            if not isinstance(info, dict) or not isinstance(info.get("adapters"), list):
                raise CheckpointError(f"{directory}: not a fusion checkpoint (no 'fusion' entry); use load_adapter() "
                                      "for adapters.")
            names, config = info["adapters"], FusionConfig.from_dict(meta["config"])
        fuse = Fuse(*names)
        model._require(fuse.names())
        if fuse.key in self:
            raise AdapterError(f"{fuse!r} already has fusion layers; delete them (del model.fusions[key]) first.")
        check_base_shape(meta.get("base_model", {}), model.layout.fingerprint(), directory)
        units = self.build(fuse, model.records, config, model._ref_param(), model.training)
        load_exact(units, tensors, "fusion.", directory)
        return fuse, units


class FusionMethods:
    """``AdapterModel``'s AdapterFusion methods; they use the handle's ``fusions``, ``records``,
    ``heads``, ``set_active_adapters``, ``_refresh`` and ``_train_only``."""

    @setup_change
    def add_adapter_fusion(self, fuse: Union[Fuse, Sequence[str]], config: "FusionConfig | dict | None" = None, *,
                           overwrite: bool = False, set_active: bool = False) -> None:
        """Add fusion layers attending over the adapters of ``fuse`` (AdapterHub's
        ``add_adapter_fusion``); ``config``: a ``FusionConfig`` or its fields as a dict."""
        fuse = as_fuse(fuse)
        self._require(fuse.names())
        if fuse.key in self.fusions and not overwrite:
            raise AdapterError(f"{fuse!r} already has fusion layers; pass overwrite=True to start them afresh.")
        self._add_fusion(fuse, self.fusions.build(fuse, self.records, config, self._ref_param(), self.training),
                         set_active)

    def _add_fusion(self, fuse: Fuse, units: nn.ModuleDict, set_active: bool) -> None:
        self.fusions[fuse.key] = units
        if set_active:
            self.set_active_adapters(fuse)
        else:
            self._refresh()

    @setup_change
    def train_adapter_fusion(self, fuse: Union[Fuse, Sequence[str]], *, unfreeze_adapters: bool = False,
                             head: Optional[str] = None) -> None:
        """Train the fusion layers of ``fuse`` (and the adapters too with ``unfreeze_adapters``),
        with ``head`` (default: the active head) trained and made active; everything else frozen."""
        fuse = as_fuse(fuse)
        head = head if head is not None else self._active_head
        self._require_head(head)
        self.set_active_adapters(fuse)  # checks names and fusion layers before anything changes
        self._active_head = head
        self._train_only(set(fuse.names()) if unfreeze_adapters else set(), {head}, fuse.key)

    def fusion_scores(self, fuse: Union[Fuse, Sequence[str]]) -> dict[str, torch.Tensor]:
        """The attention scores of the last forward at each fusion layer, by place id:
        (batch, tokens, adapters), detached."""
        return self.fusions.scores(fuse)

    @setup_change
    def save_adapter_fusion(self, directory: "str | os.PathLike", fuse: Union[Fuse, Sequence[str]], *,
                            format: str = "adapterkit") -> None:
        """Write the fusion layers of ``fuse`` (safetensors + JSON, atomically); the adapters are
        saved on their own with ``save_adapter``. ``format="adapterhub"`` writes AdapterHub's
        fusion folder instead (``interop.fusion``)."""
        self.fusions.save(directory, fuse, self, format=format)

    @setup_change
    def load_adapter_fusion(self, directory: "str | os.PathLike", *, set_active: bool = False) -> Fuse:
        """Load fusion layers saved by ``save_adapter_fusion``, or by AdapterHub's (recognised by
        ``adapter_fusion_config.json``), over adapters already in the model (same names); returns
        the ``Fuse`` block. On any error the model is left as it was."""
        fuse, units = self.fusions.read(directory, self)
        self._add_fusion(fuse, units, set_active)
        return fuse


def _placed(units: nn.ModuleDict, like: Optional[torch.Tensor], training: bool) -> nn.ModuleDict:
    if like is not None:
        units.to(device=like.device, dtype=like.dtype)
    return units.train(training)


def _fuse_blocks(block: Block) -> list[Fuse]:
    """Every ``Fuse`` in a setup."""
    out = [block] if isinstance(block, Fuse) else []
    for child in block.children:
        if isinstance(child, Block):
            out += _fuse_blocks(child)
    return out
