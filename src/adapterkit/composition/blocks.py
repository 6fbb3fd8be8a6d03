"""Composition blocks and their compilation into per-slot plans.

Blocks are small serialisable values in AdapterHub's vocabulary: ``Stack("a", "b")`` runs ``a``
then ``b`` at every slot, ``Average("a", "b", weights=[...])`` mixes their outputs,
``BatchSplit("a", "b", batch_sizes=[2, 3])`` gives each adapter its share of the batch and
``Parallel("a", "b")`` runs the batch through each adapter in one pass (``composition/parallel.py``) and
``Fuse("a", "b")`` attends over their outputs at every slot (``composition/fuse.py``).
Which block may hold which is one table, ``ALLOWED_NESTINGS``; each block compiles itself. A plain
name or a list stands for a ``Stack``. Per-example routing (``model(..., adapter_names=[...])``)
lives in ``composition/routing.py``.

``compile_plan(setup, modules)`` turns a setup into one function per slot, once per change of
the setup; at forward time a slot only calls it. Each adapter module runs through its own
strategy (``AdapterModule.run``), so the blocks combine the sites' *values*; the modules' own
contributions are there for blocks that need them (``AdapterModule.__call__``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import AdapterError
from ..places.slots import Plan, SlotIO
from .routing import stackable

Setup = Union[str, "Block"]


class Block:
    """A composition of adapters (or of other blocks)."""

    children: tuple[Setup, ...]

    def __init__(self, *children: Union[Setup, Sequence[Setup]]):
        flat: list[Setup] = []
        for child in children:
            flat.extend(child if isinstance(child, (list, tuple)) else [child])
        if not flat:
            raise AdapterError(f"{type(self).__name__} needs at least one adapter name.")
        allowed = ALLOWED_NESTINGS.get(type(self), (str, Block))
        for child in flat:
            if not isinstance(child, (str, Block)):
                raise AdapterError(f"{type(self).__name__} takes adapter names or blocks, not {child!r}.")
            if type(child) not in allowed:
                names = ", ".join("a name" if t is str else t.__name__ for t in allowed)
                raise AdapterError(
                    f"{type(child).__name__} cannot be nested in {type(self).__name__}: it holds {names}. "
                    f"Move {child!r} to the top level of the setup (or into its top-level Stack)."
                )
        self.children = tuple(flat)

    def names(self) -> list[str]:
        """Every adapter name in the block, depth first, without repeats."""
        out: list[str] = []
        for child in self.children:
            for name in [child] if isinstance(child, str) else child.names():
                if name not in out:
                    out.append(name)
        return out

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "children": [c if isinstance(c, str) else c.to_dict() for c in self.children]}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"

    def compile(self, plans: list[Optional[Plan]], modules: Mapping[str, nn.Module]) -> Optional[Plan]:
        """This block's plan at one slot, from its children's plans there (``None``: absent)."""
        raise NotImplementedError  # pragma: no cover


class Stack(Block):
    """Run adapters one after the other at every slot (AdapterHub ``Stack``; MAD-X)."""

    def compile(self, plans: list[Optional[Plan]], modules: Mapping[str, nn.Module]) -> Optional[Plan]:
        steps = [p for p in plans if p is not None]
        if not steps:
            return None
        if len(steps) == 1:
            return steps[0]

        def stack(io: SlotIO) -> torch.Tensor:
            value = io.passthrough
            for step in steps:
                value = step(io.with_value(value))
            return value

        return stack


class Average(Block):
    """Weighted mean of the children's outputs (weights normalised to sum to 1)."""

    def __init__(self, *children: Union[Setup, Sequence[Setup]], weights: Optional[Sequence[float]] = None):
        super().__init__(*children)
        weights = list(weights) if weights is not None else [1.0] * len(self.children)
        if len(weights) != len(self.children) or sum(weights) <= 0:
            raise AdapterError(f"Average needs one positive-sum weight per child; got {weights} for {len(self.children)}.")
        self.weights = [w / sum(weights) for w in weights]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "weights": self.weights}

    def compile(self, plans: list[Optional[Plan]], modules: Mapping[str, nn.Module]) -> Optional[Plan]:
        if all(p is None for p in plans):
            return None
        pairs = [(w, p) for w, p in zip(self.weights, plans)]

        def average(io: SlotIO) -> torch.Tensor:
            return sum(w * (p(io) if p is not None else io.passthrough) for w, p in pairs)

        return average


class BatchSplit(Block):
    """The first ``batch_sizes[0]`` examples go to the first child, and so on."""

    def __init__(self, *children: Union[Setup, Sequence[Setup]], batch_sizes: Sequence[int]):
        super().__init__(*children)
        if len(batch_sizes) != len(self.children) or any(b < 0 for b in batch_sizes):
            raise AdapterError(f"BatchSplit needs one non-negative size per child; got {list(batch_sizes)}.")
        self.batch_sizes = list(batch_sizes)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "batch_sizes": self.batch_sizes}

    def compile(self, plans: list[Optional[Plan]], modules: Mapping[str, nn.Module]) -> Optional[Plan]:
        bounds, start = [], 0
        for size in self.batch_sizes:
            bounds.append((start, start + size))
            start += size
        sizes = self.batch_sizes
        groups = _RowGroups(lambda rows: bounds)

        def batch_split(io: SlotIO) -> torch.Tensor:
            value = io.passthrough
            if value.shape[0] != start:
                raise AdapterError(f"BatchSplit sizes {sizes} add up to {start}, but the batch has {value.shape[0]} examples.")
            return route(io, list(zip(groups(value), plans)))

        return batch_split


class Parallel(Block):
    """One forward pass through several adapters, each with its own head (AdapterHub
    ``Parallel``): ``model(...)`` returns one output per child. The batch is replicated once per
    child at the input of the lowest block holding one of its adapters (``composition/parallel.py``), so the
    layers below run once; at each slot child ``i`` acts on the ``i``-th copy. Where the children
    are adapters of one shape (``routing.stackable``), a slot runs the copies as one batch through
    their stacked weights, one batched matmul per projection (``AdapterModule.run_stacked`` with
    ``which=None``); otherwise each child runs on its copy's rows."""

    def compile(self, plans: list[Optional[Plan]], modules: Mapping[str, nn.Module]) -> Optional[Plan]:
        if all(p is None for p in plans):
            return None
        n = len(plans)

        def copies(rows: int) -> list[tuple[int, int]]:  # (n * B, ...): copy i is rows i*B .. (i+1)*B
            if rows % n:
                raise AdapterError(f"{self!r} got {rows} rows, not {n} copies of a batch; call the AdapterModel "
                                   "(it replicates the batch), not the wrapped model.")
            return [(i * rows // n, (i + 1) * rows // n) for i in range(n)]

        groups = _RowGroups(copies)
        # every child one adapter placed here: the copies may run as one batch through their
        # stacked weights (checked per call: stack keys and regularisers follow train / eval mode)
        units = [modules[c] for c in self.children] if all(isinstance(c, str) and c in modules
                                                             for c in self.children) else None

        def parallel(io: SlotIO) -> torch.Tensor:
            if io.residual is not None and io.residual.shape[0] == n * io.passthrough.shape[0]:
                io = _replicated(io, n)  # the first block replicates late: its residual only (parallel.py)
            if units is not None and stackable(units):
                copies(io.passthrough.shape[0])  # the same check as the loop's
                return type(units[0]).run_stacked(units, None, io)
            return route(io, list(zip(groups(io.passthrough), plans)))

        return parallel


class Fuse(Block):
    """AdapterFusion (Pfeiffer et al. 2021): at each slot a fusion layer attends over the
    outputs of the listed adapters (``composition/fuse.py``). Add its layers with
    ``add_adapter_fusion(Fuse(...))`` first."""

    @property
    def key(self) -> str:
        """The key its fusion layers are kept under (AdapterHub's ``"a,b"``)."""
        return ",".join(self.names())

    def compile(self, plans: list[Optional[Plan]], modules: Mapping[str, nn.Module]) -> Optional[Plan]:
        unit = modules.get(self.key)
        if unit is None or all(p is None for p in plans):
            return None
        # the query: what the last adapter here reads (AdapterHub's ``pre_forward``), see fusion.py
        last = next((modules[c] for c in reversed(self.children) if isinstance(c, str) and c in modules), None)
        reads = last is not None and not unit.config.query_before_ln

        def fuse(io: SlotIO) -> torch.Tensor:
            base = io.passthrough
            query = last.read(io)[0] if reads and io.place == "post" else base
            return unit(query, base, [p(io) if p is not None else base for p in plans])

        return fuse


#: which blocks (and plain names) each block may hold, as AdapterHub's ``ALLOWED_NESTINGS``;
#: ``Parallel`` replicates the batch for the whole model, so it sits at the top of a setup or in
#: its top-level ``Stack`` (checked by ``parallel.find_parallel``)
ALLOWED_NESTINGS: dict[type, tuple[type, ...]] = {
    Stack: (str, Stack, Average, BatchSplit, Parallel, Fuse),
    Fuse: (str,),
    Average: (str, Stack, Average, BatchSplit),
    BatchSplit: (str, Stack, Average, BatchSplit),
    Parallel: (str, Stack, Average, BatchSplit),
}
BLOCKS = {cls.__name__: cls for cls in ALLOWED_NESTINGS}


def as_setup(setup: Union[None, Setup, Sequence[Setup]]) -> Optional[Block]:
    """Normalise what users pass to ``set_active_adapters``: a name, a list or a block."""
    if setup is None:
        return None
    if isinstance(setup, Block):
        return setup
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, (list, tuple)):
        return Stack(*setup) if setup else None
    raise AdapterError(f"An adapter setup is a name, a list of names or a block such as Stack(...), not {setup!r}.")


def as_fuse(fuse: Union["Fuse", Sequence[str]]) -> "Fuse":
    """What the fusion methods take: a ``Fuse`` block, or the names of the adapters it fuses."""
    return fuse if isinstance(fuse, Fuse) else Fuse(*fuse)


def setup_from_dict(data: Union[str, Mapping]) -> Setup:
    if isinstance(data, str):
        return data
    cls = BLOCKS.get(data.get("type", ""))
    if cls is None:
        raise AdapterError(f"Unknown composition block {data.get('type')!r}; known: {', '.join(BLOCKS)}.")
    children = [setup_from_dict(c) for c in data["children"]]
    extra = {k: data[k] for k in ("weights", "batch_sizes") if k in data}
    return cls(*children, **extra)


# -- compilation into plans ---------------------------------------------------------------------
def compile_plan(setup: Setup, modules: Mapping[str, nn.Module]) -> Optional[Plan]:
    """The function a slot runs for ``setup``, given the adapter modules placed at that slot
    (name -> module). ``None`` when no adapter of the setup is placed there."""
    if isinstance(setup, str):
        unit = modules.get(setup)
        return None if unit is None else unit.run
    return setup.compile([compile_plan(child, modules) for child in setup.children], modules)


class _RowGroups:
    """The row indices of a block's groups (``BatchSplit``, ``Parallel``) for a batch: made once
    per batch size and device and then reused by every layer and call (``bounds(rows)`` gives
    each group's ``(start, stop)``)."""

    def __init__(self, bounds: Callable[[int], Sequence[tuple[int, int]]]):
        self._bounds = bounds
        self._index: dict[tuple[int, torch.device], list[torch.Tensor]] = {}

    def __call__(self, value: torch.Tensor) -> list[torch.Tensor]:
        key = (value.shape[0], value.device)
        index = self._index.get(key)
        if index is None:
            if len(self._index) >= 8:  # a few batch sizes are in use at a time
                self._index = {}
            index = self._index[key] = [torch.arange(a, b, device=value.device) for a, b in self._bounds(key[0])]
        return index


def _replicated(io: SlotIO, n: int) -> SlotIO:
    """``io`` with its batch-sized tensors repeated ``n`` times along the batch (copy ``i``: rows
    ``i*B .. (i+1)*B``), as the ``Parallel`` block's replication does them."""
    rows = io.passthrough.shape[0]

    def grow(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or t.dim() < 2 or t.shape[0] != rows:
            return t
        return t.repeat(n, *([1] * (t.dim() - 1)))

    return replace(io, x=grow(io.x), y=grow(io.y), layers=tuple(grow(t) for t in io.layers),
                   attention_mask=grow(io.attention_mask))


def route(io: SlotIO, groups: Sequence[tuple[torch.Tensor, Optional[Plan]]]) -> torch.Tensor:
    """Run each plan on its rows of the batch; rows with no plan keep the site's value."""
    out = io.passthrough
    for index, plan in groups:
        if plan is None or index.numel() == 0:
            continue
        out = out.index_copy(0, index, plan(io.rows(index)))
    return out
