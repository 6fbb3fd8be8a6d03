"""``AdapterModel``: the handle users hold around a frozen model.

It is a façade over parts, one file each: the adapters' records and modules (``records.py``,
``self.adapters``), the heads (``head_methods.py``, ``self.heads``), the fusion layers
(``fusions.py``, ``self.fusions``), averaging (``averaging.py``), saving, loading and publishing
(``saving.py``), the forward modes (``running.py``) and the merges (``folding.Merges``). What it
keeps itself is what must change together: the active setup, one ``Slot`` per occupied place,
and their plans. Changing the setup (add, delete, activate, merge, disable) recompiles the plans
of every slot once (``_refresh``); a forward pass only runs them, with its per-call state
(per-example routing, auxiliary losses) in a forward context (``context.py``), so one model can
serve several threads at once.

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
import re
from collections import ChainMap, OrderedDict
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import running
from .averaging import AveragingMethods
from .composition.adapterdrop import GradFreeBelow, block_owners, check_skip_layers
from .composition.blocks import Block, as_setup, compile_plan
from .composition.parallel import (
    Replicator,
    find_parallel,
    first_block,
    replication,
)
from .composition.routing import RoutedCalls, routed_plan
from .config import AdapterConfig, resolve_config
from .errors import AdapterError
from .folding import Merges
from .fusions import FusionMethods, Fusions
from .head_methods import HeadMethods
from .layouts import Layout
from .loader import load_base_model
from .packaged import base_reference
from .places.slots import Slot, make_slot
from .records import AdapterRecord, Adapters, summary
from .saving import SavingMethods
from .setup_lock import forward_call, lock_of, setup_change

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class AdapterModel(HeadMethods, FusionMethods, AveragingMethods, SavingMethods, nn.Module):
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
        self.adapters = Adapters()  # the adapters' modules by name, and their records (records.py)
        self.heads = nn.ModuleDict()
        self.fusions = Fusions()  # Fuse.key -> {site key: FusionUnit}, and their lifecycle (fusions.py)
        self._slots: dict[tuple[str, str], Slot] = {}  # (place id, place) -> slot
        self._setup: Optional[Block] = None
        self._active_head: Optional[str] = None
        self.base_source: Optional[str] = None  # the alias or folder from_pretrained loaded, saved with adapters
        self._merges = Merges()
        self._routed_calls = RoutedCalls()
        self._disabled = 0
        self._base_frozen = False
        self._base_dropout = True
        self._skip_layers: frozenset[int] = frozenset()  # AdapterDrop (composition/adapterdrop.py)
        self._grad_free = GradFreeBelow()
        self._replicator = Replicator()  # the Parallel block's batch copies (composition/parallel.py)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, causal_lm: Optional[bool] = None, quantize: Optional[str] = None,
                        **kwargs: Any) -> "AdapterModel":
        """Load a ``transformers`` model (a folder, or the alias ``minilm`` / ``smollm2``) and wrap it;
        any failure is one ``AdapterError``. The alias or folder is kept as ``base_source`` and saved
        with its adapters (``base_model.source``), so the CLI finds the base without ``--model``.
        ``quantize="int8"`` / ``"int4"`` quantizes the frozen base first (``quantization.py``)."""
        try:
            handle = cls(load_base_model(name_or_path, causal_lm=causal_lm, quantize=quantize, **kwargs))
        except AdapterError:
            raise
        except Exception as err:  # transformers raises many types for damaged folders
            raise AdapterError(f"'{name_or_path}': cannot load the model ({type(err).__name__}: {err}); pass a "
                               "transformers model folder (config.json + weights) or an alias (minilm, smollm2).") \
                from None
        handle.base_source = base_reference(name_or_path)
        return handle

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

    def _placed(self, modules: nn.Module) -> nn.Module:
        """New modules on the base's device and dtype, following the handle's train / eval mode."""
        ref = self._ref_param()
        if ref is not None:
            modules.to(device=ref.device, dtype=ref.dtype)
        return modules.train(self.training)

    def _require(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            have = ", ".join(self.adapters) or "none yet"
            raise AdapterError(f"No adapter named {missing}; adapters in this model: {have}. Add it with add_adapter().")

    # -- adding and removing ------------------------------------------------------------------
    @property
    def records(self) -> Mapping[str, AdapterRecord]:
        """Every adapter's record (config, sites, modules), by name; read-only (``records.py``)."""
        return self.adapters.records

    def _build(self, name: str, config: AdapterConfig) -> AdapterRecord:
        """The record of a fresh adapter for ``config``; nothing is attached to the model yet."""
        sites = config.placed_sites(self.layout)
        self.layout.check_hosts_run(sites)  # a host the forward never calls would leave the adapter inert
        return AdapterRecord(name, config, sites, self._placed(config.build_units(sites)))

    def _attach(self, record: AdapterRecord) -> None:
        self.adapters.attach(record)
        for site in record.sites:
            self._slots.setdefault((site.place_id, site.place), make_slot(site))

    def _units_at(self, slot: Slot) -> Mapping[str, nn.Module]:
        """The unmerged adapters' modules at a slot, in the order the adapters were added."""
        units = self.adapters.units_at(slot.site.key, slot.site.place)  # the store's index: O(1)
        if not self._merges:
            return units
        return {name: unit for name, unit in units.items() if name not in self._merges}

    @setup_change
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
            self._refresh(compile_only=(record.name,))

    @setup_change
    def delete_adapter(self, name: str, *, delete_head: bool = True) -> None:
        """Remove an adapter (unmerging it first) and, by default, its head."""
        self._require([name])
        if name in self._merges:
            self.unmerge_adapter(name)
        if self._setup is not None and name in self._setup.names():
            self._setup = None
        record = self.adapters.detach(name)
        self.fusions.drop_adapter(name)
        for site in record.sites:
            slot_key = (site.place_id, site.place)
            if not self.adapters.units_at(site.key, site.place) and slot_key in self._slots:
                self._slots.pop(slot_key).set_plans(None)
        if delete_head and name in self.heads:
            self.delete_head(name)
        self._refresh(compile_only=())

    # -- activation and training ---------------------------------------------------------------
    @property
    def active_adapters(self) -> Optional[Block]:
        """The active setup (a ``Stack`` for a single name), or ``None``."""
        return self._setup

    @setup_change
    def set_active_adapters(self, setup: Union[None, str, Block, Sequence[Any]], *,
                            skip_layers: Optional[Sequence[int]] = None) -> None:
        """Activate a name, a list (stacked) or a composition block; ``None`` deactivates all.
        The head named like the last adapter of the setup that has one becomes active.
        ``skip_layers`` (AdapterDrop) turns the setup's adapters off in those layers, counted
        within each stack as ``layers=`` counts them (``composition/adapterdrop.py``)."""
        block = as_setup(setup)
        skip = check_skip_layers(self.layout, skip_layers)
        if block is not None:
            self._require(block.names())
            missing = [repr(f) for f in self.fusions.missing(block)]
            if missing:
                raise AdapterError(f"{', '.join(missing)} has no fusion layers yet; call add_adapter_fusion() first.")
            parallel = find_parallel(block)
            if parallel is not None:
                first_block(parallel, self.records, self.layout, block_owners(self.layout))
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
    @setup_change
    def skip_layers(self, layers: Optional[Sequence[int]]) -> None:
        self._skip_layers = check_skip_layers(self.layout, layers)
        self._refresh()

    @setup_change
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
        self._base_dropout = base_dropout
        self.set_active_adapters(block)
        self._train_only(names, names if train_head else set())

    def _train_only(self, adapters: set, heads: set, fusion: Optional[str] = None) -> None:
        """Freeze the base and everything but these adapters, heads and fusion layers; train mode."""
        self.model.requires_grad_(False)
        for group, keep in ((self.adapters, adapters), (self.heads, heads), (self.fusions, {fusion})):
            for name, module in group.items():
                module.requires_grad_(name in keep)
        self._base_frozen = True
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
        with lock_of(self).writing("disable adapters"):
            self._disabled += 1
            self._merges.apply(self.records, disabled=True)
            self._refresh()
        try:
            yield
        finally:
            with lock_of(self).writing("re-enable adapters"):
                self._disabled -= 1
                self._merges.apply(self.records, disabled=bool(self._disabled))
                self._refresh()

    def _refresh(self, compile_only: Optional[Sequence[str]] = None) -> None:
        """Recompile every slot's plans for the current setup (the one place that does): the
        active setup's plan and the per-example routing plan. Every unit chooses its fast paths
        again (``compile_at``), or, after adding or deleting, only the new adapters' units
        (``compile_only``): the work then does not grow with the number of adapters loaded."""
        setup = None if self._disabled else self._setup
        owners = block_owners(self.layout)
        for slot in self._slots.values():
            units = self._units_at(slot)
            chosen = units.values() if compile_only is None else [units[n] for n in compile_only if n in units]
            for unit in chosen:
                unit.compile_at(slot.site)
            slot.bind(units, self._skip_layers)
            skipped = owners.get(id(slot.site.host), (None, None))[1] in self._skip_layers
            plan = compile_plan(setup, ChainMap(self.fusions.at(slot.site.key), units)) \
                if setup is not None and not skipped else None
            slot.set_plans(plan, None if self._disabled else slot.compile_routed(units, routed_plan))
        self._grad_free.update(self.layout, owners, [s.site for s in self._slots.values() if s.plan is not None])
        parallel = find_parallel(setup)
        if parallel is None:
            self._replicator.update([], 0)
        else:
            self._replicator.update(*replication(setup, parallel, self.records, self.layout, owners,
                                                 self._skip_layers))

    # -- merging -----------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weights, in merge order."""
        return list(self._merges.order)

    @setup_change
    def merge_adapter(self, name: str) -> None:
        """Fold an adapter into the base weights (LoRA, IA3). From then on its contribution
        lives in the weights whether or not it is active; ``unmerge_adapter`` restores the exact
        original weights (they are kept aside, not recomputed)."""
        self._require([name])
        self._merges.merge(self.records[name], self.model)
        self._merges.apply(self.records, disabled=bool(self._disabled))
        self._refresh()

    @setup_change
    def unmerge_adapter(self, name: str) -> None:
        """Undo ``merge_adapter``: the weights become bit-for-bit the originals again."""
        self._merges.unmerge(name)
        self._merges.apply(self.records, disabled=bool(self._disabled))
        self._refresh()

    # -- forward -------------------------------------------------------------------------------
    @forward_call
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
            return running.forward_routed_heads(self, input_ids, attention_mask, labels, adapter_names, head, kwargs)
        return running.forward(self, input_ids, attention_mask, labels, adapter_names, head, kwargs)

    @forward_call
    def generate(self, *args: Any, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs: Any):
        """``generate`` of the wrapped model, with the active adapters, or with one adapter per
        prompt (``adapter_names``; beams and several sequences per prompt follow their prompt).
        Under a ``Parallel`` setup: a list with one result per child (``parallel.generate_parallel``)."""
        return running.generate(self, args, adapter_names, kwargs)

    def _routing_hooks(self, routed: bool):
        """While any routed call is under way, every slot keeps its hooks (``RoutedCalls``)."""
        return self._routed_calls.hooks(self._slots.values(), routed)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        """Adapters and heads only; the base weights live in the base model's own checkpoint."""
        out = OrderedDict() if destination is None else destination
        self.adapters.state_dict(destination=out, prefix=prefix + "adapters.", keep_vars=keep_vars)
        self.heads.state_dict(destination=out, prefix=prefix + "heads.", keep_vars=keep_vars)
        self.fusions.state_dict(destination=out, prefix=prefix + "fusions.", keep_vars=keep_vars)
        return out

    @setup_change
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Inverse of ``state_dict``: loads adapter and head weights (keys ``adapters.*``, ``heads.*``)."""
        holder = nn.ModuleDict({"adapters": self.adapters, "heads": self.heads, "fusions": self.fusions})
        return holder.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- summary -------------------------------------------------------------------------------
    def adapter_summary(self, as_dict: bool = False):
        """A table of adapters: name, method, parameters, % of the base, active, trainable."""
        active = set(self._setup.names()) if self._setup is not None else set()
        return summary(self.records, self.heads, self.model, active, set(self._merges.order), as_dict)

