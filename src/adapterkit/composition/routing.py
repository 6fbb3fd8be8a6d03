"""Per-example routing: each example of a batch through its own adapter, in one forward.

``model(..., adapter_names=["a", None, "b", "a"])`` puts a ``Routing`` in the forward context
(``context.py``); every slot has a routed plan compiled once per change of the setup
(``routed_plan``), which reads it. Two ways to run a slot's rows:

* **stacked** (what GPU servers do: Punica's BGMV, S-LoRA): when every adapter at the slot is of
  one module class with equal ``stack_key()`` (same shapes and options), each example's weights
  are gathered into stacked tensors and the slot runs one batched matmul per projection
  (``AdapterModule.run_stacked``); other strategies than the plain one the class stacks
  (``add``, IA3's ``multiply``), regularisers and dropout at work send the slot to the loop;
* **grouped**: otherwise each adapter runs on its rows (``index_select``) and the results are
  written back (``index_copy``).

Rows routed to ``None``, or to an adapter that has no module at this slot, keep the slot's
value unchanged. When a batch at a slot is a multiple of the routed examples (``generate()``
with beams or several sequences per prompt repeats each example), example ``i`` covers rows
``i * k`` to ``i * k + k - 1``, as ``transformers`` expands them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .. import context
from ..errors import AdapterError
from ..strategies import Add, Multiply

_PLAIN = {"add": Add, "multiply": Multiply}

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.base import AdapterModule
    from ..places.slots import Slot


class Routing:
    """Which adapter each example goes to, fixed for one forward (index tensors made once per
    batch size and per slot's adapter list, then shared by every layer)."""

    def __init__(self, names: Sequence[Optional[str]], device: Optional[torch.device] = None):
        self.names = list(names)
        self.device = device
        self._groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._coded: dict[int, tuple[tuple[str, ...], list[int]]] = {}
        self._which: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, Optional[torch.Tensor], tuple[str, ...]]] = {}

    def _expanded(self, batch: int) -> list[Optional[str]]:
        n = len(self.names)
        if batch == n:
            return self.names
        if n == 0 or batch % n:
            raise AdapterError(
                f"adapter_names has {n} entries but a layer saw a batch of {batch} examples; pass one name "
                "per example of the batch."
            )
        k = batch // n
        return [name for name in self.names for _ in range(k)]

    def groups(self, batch: int) -> list[tuple[str, torch.Tensor]]:
        """``(adapter name, row indices)`` for each adapter named in the batch."""
        if batch not in self._groups:
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self._expanded(batch)):
                if name is not None:
                    rows.setdefault(name, []).append(i)
            self._groups[batch] = [(n, torch.tensor(r, device=self.device)) for n, r in rows.items()]
        return self._groups[batch]

    def _codes(self, batch: int) -> tuple[tuple[str, ...], list[int]]:
        """The distinct names of the batch (in order of first use) and each row's index into
        them (-1: no adapter); made once per batch size, shared by every slot."""
        if batch not in self._coded:
            distinct: dict[str, int] = {}
            codes = [-1 if n is None else distinct.setdefault(n, len(distinct)) for n in self._expanded(batch)]
            self._coded[batch] = (tuple(distinct), codes)
        return self._coded[batch]

    def which(self, batch: int, units: Mapping[str, object]) -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[str, ...]]:
        """For a slot holding ``units`` (name -> module): the names of the adapters this batch
        uses there (``used``), each routed row's index into ``used`` (``which``), and the rows
        that have an adapter here (``kept``; ``None`` when every row has one). The work grows
        with the batch and the names it uses, never with the number of adapters at the slot."""
        distinct, codes = self._codes(batch)
        used = tuple(n for n in distinct if n in units)
        key = (batch, used)
        if key not in self._which:
            compact = {distinct.index(n): j for j, n in enumerate(used)}
            rows = [i for i, c in enumerate(codes) if c in compact]
            which = torch.tensor([compact[codes[i]] for i in rows], device=self.device, dtype=torch.long)
            kept = None if len(rows) == batch else torch.tensor(rows, device=self.device, dtype=torch.long)
            self._which[key] = (which, kept, used)
        return self._which[key]


def stackable(units: Sequence["AdapterModule"]) -> bool:
    """Every unit of one class, with equal stack keys, combined by the plain strategy the class
    stacks (``AdapterModule.stacked_strategy``) with no regulariser at work."""
    if len(units) < 2:
        return False
    first = units[0]
    key, strategy = first.stack_key(), _PLAIN.get(first.stacked_strategy)
    return key is not None and all(
        type(u) is type(first) and u.stack_key() == key and type(u.strategy) is strategy
        and not u.strategy._regularising() for u in units)


def routed_plan(units: Mapping[str, "AdapterModule"]):
    """The function a slot runs under per-example routing, given the (unmerged) adapters placed
    there; ``None`` when there are none. A call's work grows with the adapters its batch uses,
    not with the number at the slot (``units`` is only looked up by name)."""
    if not units:
        return None

    def plan(io):
        routing = context.current().routing
        passthrough = io.passthrough
        batch = passthrough.shape[0]
        which, kept, used = routing.which(batch, units)
        if not used:
            return passthrough
        units_used = [units[n] for n in used]  # only they take part (and get gradients)
        if len(units_used) == 1:  # one adapter for every routed row: its own (fused) path
            if kept is None:
                return units_used[0].run(io)
            return passthrough.index_copy(0, kept, units_used[0].run(io.rows(kept)))
        # checked per call, over the adapters used: stack keys and regularisers follow train / eval mode
        if stackable(units_used):
            if kept is None:
                return type(units_used[0]).run_stacked(units_used, which, io)
            out = type(units_used[0]).run_stacked(units_used, which, io.rows(kept))
            return passthrough.index_copy(0, kept, out)
        out = passthrough
        for name, index in routing.groups(batch):
            unit = units.get(name)
            if unit is not None:
                out = out.index_copy(0, index, unit.run(io.rows(index)))
        return out

    return plan


class RoutedCalls:
    """Routed calls under way on one handle: while any is, every slot keeps its hooks (the first
    such call installs them, the last one removes those the active setup does not need)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"count": 0}

    def __setstate__(self, state: dict) -> None:
        self.count, self.lock = 0, threading.Lock()

    @contextlib.contextmanager
    def hooks(self, slots: Iterable["Slot"], routed: bool) -> Iterator[None]:
        """Within the block, ``slots`` keep their hooks for a routed call (``routed``)."""
        if not routed:
            yield
            return
        with self.lock:
            self.count += 1
            if self.count == 1:
                for slot in slots:
                    slot.arm_routing(True)
        try:
            yield
        finally:
            with self.lock:
                self.count -= 1
                if self.count == 0:
                    for slot in slots:
                        slot.arm_routing(False)


def make_routing(adapter_names: Sequence[Optional[str]], inputs: Sequence[object],
                 device: Optional[torch.device]) -> Routing:
    """The ``Routing`` of a call, checked against its batch (the first tensor of ``inputs``)."""
    if isinstance(adapter_names, str):
        raise AdapterError("adapter_names takes one adapter name (or None) per example, e.g. ['a', None, 'b'].")
    names = list(adapter_names)
    batch = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if batch is not None and len(names) != batch.shape[0]:
        raise AdapterError(f"adapter_names has {len(names)} entries but the batch has {batch.shape[0]} examples.")
    return Routing(names, batch.device if batch is not None else device)
