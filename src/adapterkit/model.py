"""``AdapterModel``: the handle users hold around a frozen model.

It keeps one ``AdapterRecord`` per adapter (its config, its sites and its modules, which are also
registered under ``self.adapters[name][site_key]``), the heads (``self.heads[name]``), one
``Slot`` per occupied place, and the merges (``merging.Merges``). Changing the setup (add,
delete, activate, merge, disable) recompiles the plans of every slot once; a forward pass only
runs them, with its per-call state (per-example routing, auxiliary losses) in a forward context
(``context.py``), so one model can serve several threads at once.

>>> import torch, transformers
>>> from adapterkit import AdapterModel
>>> cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
...                               intermediate_size=64, vocab_size=100)
>>> model = AdapterModel(transformers.BertModel(cfg))
>>> model.add_adapter("sst2", "pfeiffer")
>>> model.add_classification_head("sst2", num_labels=2)
>>> model.train_adapter("sst2")
>>> out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1]))
>>> out.logits.shape
torch.Size([1, 2])

The handle's ``state_dict()`` holds the adapters and heads only (the base weights belong to the
base checkpoint), so ``transformers.Trainer`` checkpoints of an ``AdapterModel`` are adapter-only.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from . import __version__, context
from .adapterdrop import GradFreeBelow, block_owners, check_skip_layers
from .composition import Block, Fuse, as_setup, compile_plan
from .config import AdapterConfig, config_from_dict, resolve_config
from .errors import AdapterError, CheckpointError
from .fingerprint import base_identity, check_same_base
from .heads import Head, HeadConfig, RoutedHeadsOutput, build_head, run_routed_heads
from .interop import foreign_format, read_foreign, write_foreign
from .io import check_base_shape, load_exact, read_checkpoint, write_checkpoint
from .layouts import Layout
from .fusion import FusionConfig, build_fusion
from .merging import Merges
from .parallel import Replicator, find_parallel, first_block, generate_parallel, replicated_modules, run_parallel
from .routing import Routing
from .slots import Site, Slot, make_slot

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
#: inputs a batch can arrive as; the first one present gives the batch size and device for routing
_INPUT_KINDS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


@dataclass
class AdapterRecord:
    """Everything about one adapter: its config, the sites it occupies and its modules (keyed by
    ``Site.key``)."""

    name: str
    config: AdapterConfig
    sites: list[Site]
    modules: nn.ModuleDict

    def site(self, key: str) -> Site:
        return next(s for s in self.sites if s.key == key)


@dataclass
class AdapterModelOutput(SequenceClassifierOutput):
    """A head's output, with the adapters' auxiliary loss (``l2_lambda``) when there is one;
    ``loss`` already includes it."""

    aux_loss: Optional[torch.Tensor] = None


class AdapterModel(nn.Module):
    """Adds, trains, composes, saves and loads adapters on a frozen ``model``."""

    # Read by ``transformers.Trainer``. Without it, the ``**kwargs`` of ``forward`` make Trainer
    # pass ``num_items_in_batch`` (which the wrapped model may reject, as BERT does under 4.57)
    # and skip dividing the loss by the gradient-accumulation steps. The losses returned here
    # (heads, or the wrapped model's own) are batch means, so Trainer must do that division.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, AdapterModel):
            raise AdapterError("This model is already an AdapterModel; use it directly.")
        self.model = model
        self.layout = Layout.of(model)
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.fusions = nn.ModuleDict()  # Fuse.key -> {site key: FusionUnit} (fusion.py)
        self._records: dict[str, AdapterRecord] = {}
        self._slots: dict[tuple[str, str], Slot] = {}  # (place id, place) -> slot
        self._setup: Optional[Block] = None
        self._active_head: Optional[str] = None
        self._merges = Merges()
        self._routed_calls = _CallCounter()
        self._disabled = 0
        self._base_frozen = False
        self._base_dropout = True
        self._skip_layers: frozenset[int] = frozenset()  # AdapterDrop (adapterdrop.py)
        self._grad_free = GradFreeBelow()
        self._replicator = Replicator()  # the Parallel block's batch copies (parallel.py)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, causal_lm: Optional[bool] = None, **kwargs: Any) -> "AdapterModel":
        """Load a ``transformers`` model (a folder, or the alias ``minilm`` / ``smollm2``) and wrap it."""
        from .packaged import load_base_model

        return cls(load_base_model(name_or_path, causal_lm=causal_lm, **kwargs))

    @property
    def config(self):
        """The wrapped model's ``transformers`` config (``None`` for a plain ``nn.Module``)."""
        return getattr(self.model, "config", None)

    @property
    def adapter_module_names(self) -> list[str]:
        """The named stacks adapters can be scoped to with ``"stack:name"`` (NeMo's
        ``adapter_module_names``): ``["encoder", "decoder"]`` on T5 / BART, one name otherwise."""
        return list(self.layout.stack_names)

    @property
    def main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "input_ids")

    def _ref_param(self) -> Optional[torch.Tensor]:
        return next((p for p in self.model.parameters() if p.is_floating_point()), None)

    def _check_name(self, name: str, kind: str = "adapter") -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterError(f"Invalid {kind} name {name!r}: use letters, digits, '_' and '-' only.")

    def _require(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            have = ", ".join(self.adapters) or "none yet"
            raise AdapterError(f"No adapter named {missing}; adapters in this model: {have}. Add it with add_adapter().")

    # -- adding and removing ------------------------------------------------------------------
    @property
    def records(self) -> Mapping[str, AdapterRecord]:
        """Every adapter's record (config, sites, modules), by name; read-only."""
        return MappingProxyType(self._records)

    def _build(self, name: str, config: AdapterConfig) -> AdapterRecord:
        """The record of a fresh adapter for ``config``; nothing is attached to the model yet."""
        sites = config.placed_sites(self.layout)
        self.layout.check_hosts_run(sites)  # a host the forward never calls would leave the adapter inert
        modules = config.build_units(sites)
        ref = self._ref_param()
        if ref is not None:
            modules.to(device=ref.device, dtype=ref.dtype)
        modules.train(self.training)  # new modules follow the handle's mode
        return AdapterRecord(name, config, sites, modules)

    def _attach(self, record: AdapterRecord) -> None:
        self.adapters[record.name] = record.modules
        self._records[record.name] = record
        for site in record.sites:
            self._slots.setdefault((site.place_id, site.place), make_slot(site))

    def _units_at(self, slot: Slot) -> dict[str, nn.Module]:
        """The unmerged adapters' modules at a slot, in the order the adapters were added."""
        key, place = slot.site.key, slot.site.place
        return {
            name: record.modules[key]
            for name, record in self._records.items()
            if key in record.modules and record.site(key).place == place and name not in self._merges
        }

    def _fusions_at(self, slot: Slot) -> dict[str, nn.Module]:
        """The fusion layers at a slot, keyed by ``Fuse.key`` (what ``Fuse`` plans look up)."""
        return {fuse: layers[slot.site.key] for fuse, layers in self.fusions.items() if slot.site.key in layers}

    def add_adapter(
        self,
        name: str,
        config: "str | AdapterConfig | dict" = "pfeiffer",
        *,
        overwrite: bool = False,
        set_active: bool = False,
        **options: Any,
    ) -> None:
        """Add a fresh adapter. ``config`` is a preset (``"pfeiffer"``, ``"houlsby"``,
        ``"parallel"``, ``"lora"``, ``"ia3"``), a method name, a dict or a config object;
        ``options`` override its fields, e.g. ``add_adapter("a", "lora", r=16)``.
        A name ``"decoder:name"`` (NeMo's module-scoped names) places the adapter ``name`` in
        that stack only (``stacks=("decoder",)``); see ``adapter_module_names``.
        On any error the model is left exactly as it was."""
        if isinstance(name, str) and ":" in name:
            stack, name = name.split(":", 1)
            if stack not in self.adapter_module_names:
                raise AdapterError(
                    f"'{stack}:{name}': this model has no stack '{stack}'; its stacks: "
                    f"{', '.join(self.adapter_module_names)}. Use 'stack:name' with one of them, or a plain name."
                )
            options = {**options, "stacks": (stack,)}
        self._check_name(name)
        if name in self.adapters and not overwrite:
            raise AdapterError(
                f"An adapter named '{name}' already exists; choose another name, pass overwrite=True, "
                f"or call delete_adapter('{name}') first."
            )
        cfg = resolve_config(config, **options)
        self._replace(self._build(name, cfg), set_active)  # _build may raise: nothing changed yet

    def _replace(self, record: AdapterRecord, set_active: bool) -> None:
        """Attach a built record in place of any adapter of its name (keeping that one's head)."""
        if record.name in self.adapters:
            self.delete_adapter(record.name, delete_head=False)
        self._attach(record)
        if set_active:
            self.set_active_adapters(record.name)
        else:
            self._refresh()

    def delete_adapter(self, name: str, *, delete_head: bool = True) -> None:
        """Remove an adapter (unmerging it first) and, by default, its head."""
        self._require([name])
        if name in self._merges:
            self.unmerge_adapter(name)
        if self._setup is not None and name in self._setup.names():
            self._setup = None
        record = self._records.pop(name)
        del self.adapters[name]
        for fuse in [k for k in self.fusions if name in k.split(",")]:
            del self.fusions[fuse]  # a fusion layer without one of its adapters means nothing
        for site in record.sites:
            slot_key = (site.place_id, site.place)
            still_used = any(site.key in r.modules and r.site(site.key).place == site.place
                             for r in self._records.values())
            if not still_used:
                self._slots.pop(slot_key).set_plans(None)
        if delete_head and name in self.heads:
            self.delete_head(name)
        self._refresh()

    # -- heads -----------------------------------------------------------------------------------
    def _add_head(self, name: str, config: HeadConfig, overwrite: bool, set_active: bool) -> None:
        self._check_name(name, "head")
        if name in self.heads and not overwrite:
            raise AdapterError(f"A head named '{name}' already exists; pass overwrite=True or delete_head('{name}').")
        self.heads[name] = self._make_head(config)
        if set_active:
            self._active_head = name

    def _make_head(self, config: HeadConfig) -> Head:
        """A fresh head for this model, following the handle's mode (``heads.build_head``)."""
        return build_head(config, self.layout, self._ref_param()).train(self.training)

    def add_classification_head(
        self,
        name: str,
        num_labels: int = 2,
        *,
        layers: int = 2,
        pooling: str = "auto",
        multilabel: bool = False,
        id2label: Optional[dict[int, str]] = None,
        overwrite: bool = False,
        set_active: bool = True,
    ) -> None:
        """A sequence classification head (``multilabel=True`` for independent labels)."""
        cfg = HeadConfig("classification", num_labels, layers, pooling, multilabel, id2label=id2label or {})
        self._add_head(name, cfg, overwrite, set_active)

    def add_regression_head(self, name: str, num_outputs: int = 1, *, layers: int = 2, pooling: str = "auto",
                            overwrite: bool = False, set_active: bool = True) -> None:
        """A sequence regression head trained with mean squared error."""
        self._add_head(name, HeadConfig("regression", num_outputs, layers, pooling), overwrite, set_active)

    def add_tagging_head(self, name: str, num_labels: int, *, layers: int = 1,
                         id2label: Optional[dict[int, str]] = None, overwrite: bool = False,
                         set_active: bool = True) -> None:
        """A token classification head (labels -100 are ignored)."""
        cfg = HeadConfig("tagging", num_labels, layers, id2label=id2label or {})
        self._add_head(name, cfg, overwrite, set_active)

    def add_ctc_head(self, name: str, vocab_size: Optional[int] = None, *, blank: Optional[int] = None,
                     layers: int = 1, dropout: float = 0.1, id2label: Optional[dict[int, str]] = None,
                     overwrite: bool = False, set_active: bool = True) -> None:
        """A CTC head for speech models: per-frame vocabulary logits, CTC loss with labels padded
        by -100. ``vocab_size`` and ``blank`` default to the config's ``vocab_size`` and
        ``pad_token_id`` (as ``Wav2Vec2ForCTC``)."""
        size = vocab_size if vocab_size is not None else getattr(self.config, "vocab_size", None)
        if size is None:
            raise AdapterError("add_ctc_head needs vocab_size= (the model's config has none).")
        pad = blank if blank is not None else getattr(self.config, "pad_token_id", None)
        cfg = HeadConfig("ctc", size, layers, dropout=dropout, id2label=id2label or {}, blank=pad or 0)
        self._add_head(name, cfg, overwrite, set_active)

    def delete_head(self, name: str) -> None:
        if name not in self.heads:
            raise AdapterError(f"No head named '{name}'; heads: {', '.join(self.heads) or 'none'}.")
        del self.heads[name]
        if self._active_head == name:
            self._active_head = None

    @property
    def active_head(self) -> Optional[str]:
        return self._active_head

    @active_head.setter
    def active_head(self, name: Optional[str]) -> None:
        if name is not None and name not in self.heads:
            raise AdapterError(f"No head named '{name}'; heads: {', '.join(self.heads) or 'none'}.")
        self._active_head = name

    # -- activation and training ---------------------------------------------------------------
    @property
    def active_adapters(self) -> Optional[Block]:
        """The active setup (a ``Stack`` for a single name), or ``None``."""
        return self._setup

    def set_active_adapters(self, setup: Union[None, str, Block, Sequence[Any]], *,
                            skip_layers: Optional[Sequence[int]] = None) -> None:
        """Activate a name, a list (stacked) or a composition block; ``None`` deactivates all.
        The head named like the last adapter of the setup that has one becomes active.
        ``skip_layers`` (AdapterDrop) turns the setup's adapters off in those layers, counted
        within each stack as ``layers=`` counts them (``adapterdrop.py``)."""
        block = as_setup(setup)
        skip = check_skip_layers(self.layout, skip_layers)
        if block is not None:
            self._require(block.names())
            missing = [repr(f) for f in _fuse_blocks(block) if f.key not in self.fusions]
            if missing:
                raise AdapterError(f"{', '.join(missing)} has no fusion layers yet; call add_adapter_fusion() first.")
            parallel = find_parallel(block)
            if parallel is not None:
                first_block(parallel, self._records, self.layout, block_owners(self.layout))
            with_head = [n for n in block.names() if n in self.heads]
            if with_head:
                self._active_head = with_head[-1]
        self._setup = block
        self._skip_layers = skip
        self._refresh()

    @property
    def skip_layers(self) -> list[int]:
        """The layers whose adapters the active setup skips (AdapterDrop); settable."""
        return sorted(self._skip_layers)

    @skip_layers.setter
    def skip_layers(self, layers: Optional[Sequence[int]]) -> None:
        self._skip_layers = check_skip_layers(self.layout, layers)
        self._refresh()

    def train_adapter(self, setup: Union[str, Block, Sequence[Any]], *, train_head: bool = True,
                      base_dropout: bool = True) -> None:
        """Freeze the base model and every other adapter; train ``setup`` (and its heads).
        Also activates the setup and puts the model in training mode.

        Args:
            setup: an adapter name, a list (stacked) or a composition block.
            train_head: train the heads named like the adapters of ``setup`` too.
            base_dropout: keep the frozen base model's own train-time behaviour (dropout,
                LayerDrop) while training, as AdapterHub and PEFT do (the default). ``False``
                runs the frozen base exactly as at inference (``eval`` mode) while the adapters
                and heads train: a CPU step is about 25 % shorter and needs half the peak memory
                (no dropout masks drawn or kept), but on SST-2 with MiniLM the bottleneck adapters'
                test accuracy was lower (by 0.6-0.8 points over five seeds) at the same dev accuracy
                (``docs/training.md``). Applies while every base weight stays frozen.

        Example:
            >>> model.add_adapter("sst2", "pfeiffer")                     # doctest: +SKIP
            >>> model.train_adapter("sst2", base_dropout=False)           # doctest: +SKIP
            >>> model.model.training, model.adapters["sst2"].training     # doctest: +SKIP
            (False, True)
        """
        block = as_setup(setup)
        if block is None:
            raise AdapterError("train_adapter needs an adapter name or setup.")
        self._require(block.names())
        merged = [n for n in block.names() if n in self._merges]
        if merged:
            raise AdapterError(f"Adapter(s) {merged} are merged into the weights; call unmerge_adapter() before training.")
        names = set(block.names())
        self.model.requires_grad_(False)
        for name, module in self.adapters.items():
            module.requires_grad_(name in names)
        for name, head in self.heads.items():
            head.requires_grad_(train_head and name in names)
        self._base_frozen = True
        self._base_dropout = base_dropout
        self.set_active_adapters(block)
        self.train()

    def train(self, mode: bool = True) -> "AdapterModel":
        """As ``nn.Module.train``, but a base frozen by ``train_adapter`` keeps its BatchNorm layers
        in eval mode, whose statistics must stay fixed so that adapters off still reproduce the
        base model; with ``base_dropout=False`` the whole frozen base stays in eval mode."""
        super().train(mode)
        if mode and self._base_frozen and not any(p.requires_grad for p in self.model.parameters()):
            if not self._base_dropout:
                self.model.eval()
            else:
                for module in self.model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the bare base model inside the block (merged weights are restored meanwhile)."""
        self._disabled += 1
        self._merges.apply(self._records, disabled=True)
        self._refresh()
        try:
            yield
        finally:
            self._disabled -= 1
            self._merges.apply(self._records, disabled=bool(self._disabled))
            self._refresh()

    def _refresh(self) -> None:
        """Recompile every slot's plans for the current setup (the one place that does): the
        active setup's plan and the per-example routing plan."""
        setup = None if self._disabled else self._setup
        owners = block_owners(self.layout)
        for slot in self._slots.values():
            units = self._units_at(slot)
            slot.bind(units, self._skip_layers)
            skipped = owners.get(id(slot.site.host), (None, None))[1] in self._skip_layers
            plan = compile_plan(setup, {**units, **self._fusions_at(slot)}) if setup is not None and not skipped else None
            slot.set_plans(plan, None if self._disabled else slot.compile_routed(units))
        self._grad_free.update(self.layout, owners, [s.site for s in self._slots.values() if s.plan is not None])
        parallel = find_parallel(setup)
        if parallel is None:
            self._replicator.update([], 0)
        else:
            first = first_block(parallel, self._records, self.layout, owners)
            self._replicator.update(replicated_modules(self.layout, first), len(parallel.children))

    # -- merging -----------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weights, in merge order."""
        return list(self._merges.order)

    def merge_adapter(self, name: str) -> None:
        """Fold an adapter into the base weights (LoRA, IA3). From then on its contribution
        lives in the weights whether or not it is active; ``unmerge_adapter`` restores the exact
        original weights (they are kept aside, not recomputed)."""
        self._require([name])
        self._merges.merge(self._records[name], self.model)
        self._merges.apply(self._records, disabled=bool(self._disabled))
        self._refresh()

    def unmerge_adapter(self, name: str) -> None:
        """Undo ``merge_adapter``: the weights become bit-for-bit the originals again."""
        self._merges.unmerge(name)
        self._merges.apply(self._records, disabled=bool(self._disabled))
        self._refresh()

    def average_adapter(
        self,
        name: str,
        adapter_list: Sequence[str],
        weights: Optional[Sequence[float]] = None,
        *,
        combine_strategy: str = "linear",
        normalize_weights: bool = True,
        svd_rank: Optional[int] = None,
        density: float = 0.2,
        overwrite: bool = False,
        set_active: bool = False,
    ) -> None:
        """Add adapter ``name`` made by merging the weights of ``adapter_list`` (AdapterHub's
        ``average_adapter``): ``combine_strategy`` ``"linear"``, ``"lora_svd"`` (rank
        ``svd_rank``) or ``"ties"`` (keeping the top ``density`` fraction); weights default to
        ``1 / N`` and are divided by their sum once (``normalize_weights``). Formulas:
        ``merge_adapters.py``. On any error the model is left as it was."""
        from .merge_adapters import combine

        self._check_name(name)
        if name in self.adapters and (not overwrite or name in adapter_list):
            raise AdapterError(
                f"An adapter named '{name}' already exists; choose another name"
                + ("." if name in adapter_list else " or pass overwrite=True.")
            )
        if isinstance(adapter_list, str):
            raise AdapterError("average_adapter takes a list of adapter names, e.g. ['a', 'b'].")
        self._require(list(adapter_list))
        config, state = combine([self._records[n] for n in adapter_list], weights, combine_strategy,
                                normalize_weights=normalize_weights, svd_rank=svd_rank, density=density)
        record = self._build(name, config)  # may raise: nothing changed yet
        load_exact(record.modules, state, "", f"average_adapter('{name}')")
        self._replace(record, set_active)

    # -- AdapterFusion (fusion.py) ----------------------------------------------------------------
    def add_adapter_fusion(self, fuse: Union[Fuse, Sequence[str]], config: "FusionConfig | dict | None" = None, *,
                           overwrite: bool = False, set_active: bool = False) -> None:
        """Add fusion layers attending over the adapters of ``fuse`` (AdapterHub's
        ``add_adapter_fusion``); ``config``: a ``FusionConfig`` or its fields as a dict."""
        fuse = fuse if isinstance(fuse, Fuse) else Fuse(*fuse)
        self._require(fuse.names())
        if len(fuse.names()) < 2:
            raise AdapterError(f"{fuse!r} fuses one adapter; list two or more.")
        if fuse.key in self.fusions and not overwrite:
            raise AdapterError(f"{fuse!r} already has fusion layers; pass overwrite=True to start them afresh.")
        cfg = config if isinstance(config, FusionConfig) else FusionConfig.from_dict(config or {})
        units = build_fusion(fuse.names(), self._records, cfg)
        ref = self._ref_param()
        if ref is not None:
            units.to(device=ref.device, dtype=ref.dtype)
        self.fusions[fuse.key] = units.train(self.training)
        if set_active:
            self.set_active_adapters(fuse)
        else:
            self._refresh()

    def train_adapter_fusion(self, fuse: Union[Fuse, Sequence[str]], *, unfreeze_adapters: bool = False,
                             head: Optional[str] = None) -> None:
        """Train the fusion layers of ``fuse`` (and the adapters too with ``unfreeze_adapters``),
        with ``head`` (default: the active head) trained and made active; everything else frozen."""
        fuse = fuse if isinstance(fuse, Fuse) else Fuse(*fuse)
        head = head if head is not None else self._active_head
        if head is not None and head not in self.heads:
            raise AdapterError(f"No head named '{head}'; heads: {', '.join(self.heads) or 'none'}.")
        self.set_active_adapters(fuse)  # checks names and fusion layers before anything changes
        self.model.requires_grad_(False)
        for name, module in self.adapters.items():
            module.requires_grad_(unfreeze_adapters and name in fuse.names())
        for key, units in self.fusions.items():
            units.requires_grad_(key == fuse.key)
        for name, module in self.heads.items():
            module.requires_grad_(name == head)
        self._active_head = head
        self._base_frozen = True
        self.train()

    def fusion_scores(self, fuse: Union[Fuse, Sequence[str]]) -> dict[str, torch.Tensor]:
        """The attention scores of the last forward at each fusion layer, by place id:
        (batch, tokens, adapters), detached."""
        fuse = fuse if isinstance(fuse, Fuse) else Fuse(*fuse)
        if fuse.key not in self.fusions:
            raise AdapterError(f"{fuse!r} has no fusion layers; call add_adapter_fusion() first.")
        return {key.replace("-", "."): unit.scores for key, unit in self.fusions[fuse.key].items()
                if unit.scores is not None}

    def save_adapter_fusion(self, directory: "str | os.PathLike", fuse: Union[Fuse, Sequence[str]], *,
                            format: str = "adapterkit") -> None:
        """Write the fusion layers of ``fuse`` (safetensors + JSON, atomically); the adapters are
        saved on their own with ``save_adapter``. ``format="adapterhub"`` writes AdapterHub's
        fusion folder instead (``interop.fusion``)."""
        from .interop import fusion as ah_fusion

        fuse = fuse if isinstance(fuse, Fuse) else Fuse(*fuse)
        if fuse.key not in self.fusions:
            raise AdapterError(f"{fuse!r} has no fusion layers; call add_adapter_fusion() first.")
        if format not in ("adapterkit", "adapterhub"):
            raise AdapterError(f"Unknown fusion format {format!r}; choose 'adapterkit' or 'adapterhub'.")
        units = self.fusions[fuse.key]
        first = next(iter(units.values()))
        if format == "adapterhub":
            ah_fusion.write(directory, fuse.names(), first.config, units.state_dict(), self)
            return
        meta = {"fusion": {"adapters": fuse.names()}, "adapterkit_version": __version__,
                "config": first.config.to_dict(), "places": list(units.keys()),
                "base_model": {**self.layout.fingerprint(), **base_identity(self)}}
        write_checkpoint(directory, meta, {f"fusion.{k}": v for k, v in units.state_dict().items()})

    def load_adapter_fusion(self, directory: "str | os.PathLike", *, set_active: bool = False) -> Fuse:
        """Load fusion layers saved by ``save_adapter_fusion``, or by AdapterHub's (recognised by
        ``adapter_fusion_config.json``), over adapters already in the model (same names); returns
        the ``Fuse`` block. On any error the model is left as it was."""
        from .interop import fusion as ah_fusion

        if ah_fusion.is_adapterhub_fusion(directory):
            names, config, state = ah_fusion.read(directory, self)
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
        self._require(fuse.names())
        if fuse.key in self.fusions:
            raise AdapterError(f"{fuse!r} already has fusion layers; delete them (del model.fusions[key]) first.")
        check_base_shape(meta.get("base_model", {}), self.layout.fingerprint(), directory)
        units = build_fusion(fuse.names(), self._records, config)
        ref = self._ref_param()
        if ref is not None:
            units.to(device=ref.device, dtype=ref.dtype)
        load_exact(units, tensors, "fusion.", directory)
        self.fusions[fuse.key] = units.train(self.training)
        if set_active:
            self.set_active_adapters(fuse)
        else:
            self._refresh()
        return fuse

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        adapter_names: Optional[Sequence[Optional[str]]] = None,
        head: Optional[str] = None,
        routed_heads: bool = False,
        **kwargs: Any,
    ):
        """Run the model with the active setup and head.

        ``adapter_names`` routes each example of the batch to its own adapter (or ``None`` for
        the base model): the result equals running each example alone with that adapter. It
        holds for this call only and for this thread only: several threads may call one model
        at once with different ``adapter_names``. Without an active head the wrapped model's own
        output is returned (e.g. a causal LM's logits and loss). A plain ``nn.Module`` (no
        ``transformers`` config) gets its input as its first positional argument: ``model(x)``
        runs ``model.model(x)`` with the adapters.

        Auxiliary losses of the adapters (``l2_lambda``, while training) are returned as
        ``output.aux_loss`` and added to ``output.loss`` when there is one.

        ``routed_heads=True`` (with ``adapter_names``) runs the body once and then, per example,
        the head named like that example's adapter, so that adapters with different heads and
        label sets share one pass; it returns a ``RoutedHeadsOutput`` (per-example logits and
        head names; ``None`` for rows whose adapter is ``None`` or has no head). It computes
        no loss: ``labels`` are refused."""
        if routed_heads:
            return self._forward_routed_heads(input_ids, attention_mask, labels, adapter_names, head, kwargs)
        head_name = head if head is not None else self._active_head
        if head_name is not None and head_name not in self.heads:
            raise AdapterError(f"No head named '{head_name}'; heads: {', '.join(self.heads) or 'none'}.")
        args: tuple = ()
        if input_ids is not None:
            if self.config is None:
                args = (input_ids,)
            else:
                kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        self.layout.check_inputs(kwargs)  # an image or audio shape the model cannot take (layouts/inputs.py)
        if self._replicator.copies:  # a Parallel setup: one output per child (parallel.py)
            if adapter_names is not None or head is not None:
                raise AdapterError("A Parallel setup gives each adapter its own head; drop adapter_names= / head=, "
                                   "or activate one adapter or a Stack.")
            return run_parallel(self, find_parallel(self._setup), args, kwargs, labels)
        routing = self._routing(adapter_names, args[0] if args else None, kwargs) if adapter_names is not None else None
        with self._routing_hooks(routing is not None), context.forward(routing, attention_mask) as ctx:
            if head_name is None:
                if labels is not None:
                    kwargs["labels"] = labels
                return _with_aux_loss(self.model(*args, **kwargs), ctx.aux_loss())
            backbone = getattr(self.model, "base_model", self.model)
            out = backbone(*args, **kwargs)
            hidden = out if isinstance(out, torch.Tensor) else out[0]  # (B, T, d)
            loss, logits = self.heads[head_name](hidden, self.layout.hidden_mask(attention_mask, hidden), labels)
            return _with_aux_loss(AdapterModelOutput(loss=loss, logits=logits), ctx.aux_loss())

    def _forward_routed_heads(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                              labels: Optional[torch.Tensor], adapter_names: Optional[Sequence[Optional[str]]],
                              head: Optional[str], kwargs: dict) -> RoutedHeadsOutput:
        if adapter_names is None or labels is not None or head is not None:
            raise AdapterError("routed_heads=True takes adapter_names (one per example) and neither labels nor head; "
                               "for a loss or a single head call the model without routed_heads.")
        if self.config is None:
            raise AdapterError("routed_heads=True needs a transformers model (heads read its hidden states).")
        names = list(adapter_names) if not isinstance(adapter_names, str) else adapter_names
        self.layout.check_inputs(kwargs)
        backbone = getattr(self.model, "base_model", self.model)
        out = self._body(input_ids, attention_mask, names, backbone, kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out[0]  # (B, T, d)
        return run_routed_heads(self.heads, hidden, self.layout.hidden_mask(attention_mask, hidden), names)

    def _body(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], names: list,
              backbone: nn.Module, kwargs: dict) -> Any:
        """The backbone's output (no LM head) with per-example routing."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        routing = self._routing(names, None, kwargs)
        with self._routing_hooks(True), context.forward(routing, attention_mask):
            return backbone(**kwargs)

    def _routing(self, adapter_names: Sequence[Optional[str]], positional: Optional[torch.Tensor],
                 kwargs: dict) -> Routing:
        """Check ``adapter_names`` against the batch and make the call's ``Routing``."""
        if self._merges:
            raise AdapterError(f"Per-example routing needs unmerged adapters; unmerge {self._merges.order} first.")
        if isinstance(adapter_names, str):
            raise AdapterError("adapter_names takes one adapter name (or None) per example, e.g. ['a', None, 'b'].")
        names = list(adapter_names)
        self._require(sorted({n for n in names if n is not None}))
        inputs = [positional] + [kwargs.get(k) for k in _INPUT_KINDS]
        batch = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        if batch is not None and len(names) != batch.shape[0]:
            raise AdapterError(f"adapter_names has {len(names)} entries but the batch has {batch.shape[0]} examples.")
        ref = self._ref_param()
        device = batch.device if batch is not None else (ref.device if ref is not None else None)
        return Routing(names, device)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs: Any):
        """``generate`` of the wrapped model, with the active adapters, or with one adapter per
        prompt (``adapter_names``; beams and several sequences per prompt follow their prompt).
        Under a ``Parallel`` setup: a list with one result per child (``parallel.generate_parallel``)."""
        if self._replicator.copies:  # one result per child of the Parallel block (parallel.py)
            if adapter_names is not None:
                raise AdapterError("A Parallel setup runs every prompt through each of its adapters; drop "
                                   "adapter_names=, or activate one adapter or a Stack.")
            return generate_parallel(self, find_parallel(self._setup), args, kwargs)
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        routing = self._routing(adapter_names, args[0] if args else None, kwargs)
        with self._routing_hooks(True), context.forward(routing):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _routing_hooks(self, routed: bool) -> Iterator[None]:
        """While any routed call is under way, every slot keeps its hooks (the first such call
        installs them, the last one removes those the active setup does not need)."""
        if not routed:
            yield
            return
        with self._routed_calls.lock:
            self._routed_calls.count += 1
            if self._routed_calls.count == 1:
                for slot in self._slots.values():
                    slot.arm_routing(True)
        try:
            yield
        finally:
            with self._routed_calls.lock:
                self._routed_calls.count -= 1
                if self._routed_calls.count == 0:
                    for slot in self._slots.values():
                        slot.arm_routing(False)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        """Adapters and heads only; the base weights live in the base model's own checkpoint."""
        out = OrderedDict() if destination is None else destination
        self.adapters.state_dict(destination=out, prefix=prefix + "adapters.", keep_vars=keep_vars)
        self.heads.state_dict(destination=out, prefix=prefix + "heads.", keep_vars=keep_vars)
        self.fusions.state_dict(destination=out, prefix=prefix + "fusions.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Inverse of ``state_dict``: loads adapter and head weights (keys ``adapters.*``, ``heads.*``)."""
        holder = nn.ModuleDict({"adapters": self.adapters, "heads": self.heads, "fusions": self.fusions})
        return holder.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- summary -------------------------------------------------------------------------------
    def adapter_summary(self, as_dict: bool = False):
        """A table of adapters: name, method, parameters, % of the base, active, trainable."""
        base = sum(p.numel() for p in self.model.parameters())
        active = set(self._setup.names()) if self._setup is not None else set()
        rows = []
        for name, record in self._records.items():
            module = record.modules
            params = sum(p.numel() for p in module.parameters())
            head_params = sum(p.numel() for p in self.heads[name].parameters()) if name in self.heads else 0
            rows.append({
                "name": name,
                "method": record.config.method,
                "parameters": params,
                "head_parameters": head_params,
                "percent_of_base": 100.0 * params / max(base, 1),
                "active": name in active,
                "trainable": any(p.requires_grad for p in module.parameters()),
                "merged": name in self._merges,
            })
        if as_dict:
            return rows
        header = f"{'name':<20}{'method':<12}{'parameters':>12}{'% of base':>11}{'head':>10}  active  trainable  merged"
        lines = [header, "-" * len(header)]
        for r in rows:
            lines.append(
                f"{r['name']:<20}{r['method']:<12}{r['parameters']:>12,}{r['percent_of_base']:>10.3f}%"
                f"{r['head_parameters']:>10,}  {'yes' if r['active'] else 'no':<6}  "
                f"{'yes' if r['trainable'] else 'no':<9}  {'yes' if r['merged'] else 'no'}"
            )
        lines.append(f"base model parameters: {base:,}")
        return "\n".join(lines)

    # -- saving and loading ----------------------------------------------------------------------
    def save_adapter(self, directory: "str | os.PathLike", name: str, *, with_head: bool = True,
                     format: str = "adapterkit") -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically); ``format="peft"``
        or ``"adapterhub"`` writes that library's folder instead (``adapterkit.interop``)."""
        self._require([name])
        record = self._records[name]
        sites = record.sites
        head = self.heads[name] if with_head and name in self.heads else None
        meta = {
            "name": name,
            "adapterkit_version": __version__,
            "config": record.config.as_saved().to_dict(),
            "places": [s.place_id for s in sites],
            "base_model": {**self.layout.fingerprint(), **base_identity(self),
                           "host_shapes": {s.place_id: s.weight_shape() for s in sites}},
            "head": head.config.to_dict() if head is not None else None,
        }
        tensors = {f"adapter.{key}.{k}": v for key, unit in record.modules.items() for k, v in unit.saved_state().items()}
        if head is not None:
            tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
        if format != "adapterkit":
            write_foreign(directory, format, meta, tensors, self)
            return
        write_checkpoint(directory, meta, tensors)

    def save_all_adapters(self, directory: "str | os.PathLike", *, with_head: bool = True) -> None:
        """Each adapter into ``directory/<name>``."""
        for name in self.adapters:
            self.save_adapter(os.path.join(directory, name), name, with_head=with_head)

    def load_adapter(
        self, directory: "str | os.PathLike", *, load_as: Optional[str] = None, set_active: bool = False,
        with_head: bool = True, allow_pickle: bool = False, strict_base: bool = True,
    ) -> str:
        """Load an adapter (and its head) saved by ``save_adapter``, or by PEFT or AdapterHub
        (recognised by their files); returns its name. Checks that the checkpoint fits this base
        model, and (``strict_base``) that it was trained on this very base (``fingerprint.py``);
        on any error the model is left as it was. ``allow_pickle=True`` reads a foreign folder's
        pickled ``*.bin`` weights (``torch.load(weights_only=True)``); they are refused otherwise."""
        if foreign_format(directory):
            meta, tensors = read_foreign(directory, self, allow_pickle=allow_pickle)
        else:
            meta, tensors = read_checkpoint(directory)
        name = load_as or meta.get("name")
        self._check_name(name)
        if name in self.adapters:
            raise AdapterError(f"An adapter named '{name}' already exists; pass load_as='other_name' or delete it first.")
        try:
            cfg = config_from_dict(meta["config"])
        except AdapterError as err:
            raise CheckpointError(f"{directory}: {err}") from None
        check_base_shape(meta.get("base_model", {}), self.layout.fingerprint(), directory)
        record = self._build(name, cfg.for_loading())  # the saved weights replace the initialisation
        record.config = cfg
        sites, modules = record.sites, record.modules
        if [s.place_id for s in sites] != meta.get("places"):
            raise CheckpointError(
                f"{directory}: the adapter occupies places {meta.get('places')[:4]}..., but this model resolves its "
                f"config to {[s.place_id for s in sites][:4]}...; load it into the base model it was trained on."
            )
        saved_shapes = meta.get("base_model", {}).get("host_shapes", {})
        for site in sites:
            if site.place_id in saved_shapes and list(saved_shapes[site.place_id]) != site.weight_shape():
                raise CheckpointError(
                    f"{directory}: '{site.place_id}' had weight shape {saved_shapes[site.place_id]} in the base the "
                    f"adapter was saved from, but {site.weight_shape()} here; load it into the base it was trained on."
                )
        check_same_base(meta.get("base_model", {}), self, directory, strict=strict_base)
        head = None
        if with_head and meta.get("head"):
            if name in self.heads:
                raise AdapterError(f"A head named '{name}' already exists; pass load_as='other_name' or delete it first.")
            head = self._make_head(HeadConfig.from_dict(meta["head"]))
        load_exact(modules, tensors, "adapter.", directory)
        if head is not None:
            load_exact(head, tensors, "head.", directory)
        self._attach(record)
        if head is not None:
            self.heads[name] = head
        if set_active:
            self.set_active_adapters(name)
        else:
            self._refresh()
        return name


def _fuse_blocks(block: Block) -> list[Fuse]:
    """Every ``Fuse`` in a setup."""
    out = [block] if isinstance(block, Fuse) else []
    for child in block.children:
        if isinstance(child, Block):
            out += _fuse_blocks(child)
    return out


class _CallCounter:
    """Routed calls under way, with the lock that guards arming the slots' hooks for them."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"count": 0}

    def __setstate__(self, state: dict) -> None:
        self.count, self.lock = 0, threading.Lock()


def _with_aux_loss(output: Any, aux: Optional[torch.Tensor]) -> Any:
    """Put the auxiliary loss on a ``ModelOutput`` (and into its ``loss``); other outputs (a
    plain module's tensor) are returned as they are."""
    if aux is None or not isinstance(output, dict):
        return output
    if output.get("loss") is not None:
        output["loss"] = output["loss"] + aux
    output["aux_loss"] = aux
    return output
