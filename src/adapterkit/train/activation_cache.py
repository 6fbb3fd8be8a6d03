"""Cached activations: the frozen layers below the lowest adapter run once per batch, not once per epoch.

When an adapter sits only in the upper blocks of a model (``--layers 3,4,5``) and the frozen
base runs as at inference (``--no-base-dropout``: no dropout, no LayerDrop), the blocks below
the lowest adapter compute the same tensor for the same batch in every epoch: nothing in them
trains and nothing in them is random. ``ActivationCache`` keeps that tensor, the input of the
lowest adapted block (the *cut*), per batch: the first time a batch comes, the model runs whole
and a forward pre-hook on the cut block copies its input; every later time, the stack runs
only its blocks from the cut on (the ``nn.ModuleList`` holding the blocks is swapped, for the
call, for one holding those blocks only) and the pre-hook hands the cut block the stored tensor.
The embeddings still run; their output is not used.

Exactness: a block's output for an example depends on the whole batch's shapes (the padded
width changes GEMM blocking and the masked softmax sums), so the cache is keyed by *batch*,
and the training loop keeps each batch's examples the same in every epoch (``fixed_batches``:
the batches of epoch 1, in a new order each epoch). The upper blocks then receive the same bits
as without the cache and compute the same outputs, so the trained adapter is the same bit for
bit (``tests/test_activation_cache.py`` compares every tensor with ``torch.equal``). As a
guard for architectures whose forward depends on a block's position in the list, the first
batch served from the cache is also run without it (under ``torch.random.fork_rng``, so that
the random draws of the head's dropout stay the same) and the two outputs are compared; if they
differ the cache turns itself off for the run and says so.

Memory: stored tensors stay in memory up to ``budget_bytes``; the rest go to one file in a
folder this cache creates inside the run folder, read back with ``numpy.fromfile``; ``close()``
deletes that folder (and nothing else).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint_format import temp_dir
from ..composition.adapterdrop import block_owners
from ..errors import AdapterError
from ..model import AdapterModel

__all__ = ["ActivationCache", "cache_cut", "CACHE_PREFIX"]

CACHE_PREFIX = ".activation-cache-"  # the folders this module creates (and deletes) in a run folder
FLAG = "--cache-activations"


def cache_cut(model: AdapterModel, name: str) -> tuple[Any, int]:
    """``(stack, k)``: the stack holding adapter ``name`` and the index of its lowest adapted
    block. ``AdapterError`` when nothing below the adapter can be cached exactly."""
    layout = model.layout
    record = model.records[name]
    owners = block_owners(layout)
    placed = [owners.get(id(site.host)) for site in record.sites]
    if len(layout.stacks) != 1 or any(p is None for p in placed):
        where = ("its input side (prompt tuning, prefix tuning, embeddings) or outside the transformer blocks"
                 if len(layout.stacks) == 1 else f"a model with {len(layout.stacks) or 'no'} block stacks")
        raise AdapterError(f"{FLAG} caches the output of the frozen blocks below the adapter, but method "
                           f"'{record.config.method}' places it at {where}; drop {FLAG}, or use a method that sits "
                           "inside the blocks (pfeiffer, houlsby, lora, ...) on a single-stack model.")
    stack = layout.stacks[placed[0][0]]
    cut = min(i for _, i in placed)
    if cut == 0:
        upper = ",".join(map(str, range(stack.num_layers // 2, stack.num_layers)))
        raise AdapterError(f"{FLAG} needs frozen layers below the adapter, but adapter '{name}' starts at layer 0; "
                           f"put it in the upper layers only (e.g. --layers {upper}) or drop {FLAG}.")
    return stack, cut


class ActivationCache:
    """The cut block's input per batch key (module docstring). ``run(call, inputs, key)``
    replaces ``call(**inputs)`` in the training step."""

    def __init__(self, model: AdapterModel, name: str, folder: "str | Path", budget_bytes: int,
                 echo: Optional[Callable[[str], None]] = None):
        self.stack, self.cut = cache_cut(model, name)
        self.model = model
        self.block = self.stack.blocks[self.cut]
        parent_path, _, self._attr = self.stack.path.rpartition(".")
        self._parent = model.layout.model.get_submodule(parent_path)
        self._tail = nn.ModuleList(self.stack.blocks[self.cut:])
        self.budget = budget_bytes
        self.parent_folder = Path(folder)
        self.echo = echo or (lambda _msg: None)
        self.memory: dict[Hashable, torch.Tensor] = {}
        self.disk: dict[Hashable, tuple[int, tuple[int, ...], torch.dtype, torch.device]] = {}
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.hits = self.misses = 0
        self.enabled = True
        self.verified = False
        self._folder: Optional[Path] = None
        self._file = None

    # -- storing and reading -------------------------------------------------------------------------
    def _store(self, key: Hashable, hidden: torch.Tensor) -> None:
        nbytes = hidden.numel() * hidden.element_size()
        if self.memory_bytes + nbytes <= self.budget:
            self.memory[key] = hidden.detach().clone(memory_format=torch.contiguous_format)
            self.memory_bytes += nbytes
            return
        if self._file is None:
            self._folder = temp_dir(CACHE_PREFIX, self.parent_folder)
            self._file = open(self._folder / "activations.bin", "w+b")
        raw = hidden.detach().contiguous().cpu().view(torch.uint8).numpy()  # any dtype, bit for bit
        self._file.seek(self.disk_bytes)
        self._file.write(raw.tobytes())
        self.disk[key] = (self.disk_bytes, tuple(hidden.shape), hidden.dtype, hidden.device)
        self.disk_bytes += nbytes

    def _load(self, key: Hashable) -> Optional[torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        if key not in self.disk:
            return None
        offset, shape, dtype, device = self.disk[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        self._file.flush()
        raw = np.fromfile(self._file.name, dtype=np.uint8, count=nbytes, offset=offset)
        return torch.from_numpy(raw).view(dtype).reshape(shape).to(device)

    # -- the forward ---------------------------------------------------------------------------------
    def run(self, call: Callable[..., Any], inputs: dict, key: Hashable) -> Any:
        """``call(**inputs)``, with the blocks below the cut served from the cache for ``key``
        (or their output stored for it, the first time)."""
        if not self.enabled:
            return call(**inputs)
        stored = self._load(key)
        if stored is None:
            self.misses += 1
            handle = self.block.register_forward_pre_hook(self._capture(key), with_kwargs=True)
            try:
                return call(**inputs)
            finally:
                handle.remove()
        self.hits += 1
        if not self.verified:
            return self._verified(call, inputs, stored)
        return self._served(call, inputs, stored)

    def _served(self, call: Callable[..., Any], inputs: dict, stored: torch.Tensor) -> Any:
        handle = self.block.register_forward_pre_hook(self._serve(stored), with_kwargs=True)
        blocks = getattr(self._parent, self._attr)
        setattr(self._parent, self._attr, self._tail)
        try:
            return call(**inputs)
        finally:
            setattr(self._parent, self._attr, blocks)
            handle.remove()

    def _verified(self, call: Callable[..., Any], inputs: dict, stored: torch.Tensor) -> Any:
        """The first hit: the whole model once more (no graph, the same random draws), compared
        with the served output; on any difference the cache turns off for the run."""
        self.verified = True
        inner = getattr(call, "module", call)  # not through DDP: one forward per backward there
        with torch.random.fork_rng(devices=_cuda_devices()):  # with autograd on: the same kernels as training
            reference = inner(**inputs)
        out = self._served(call, inputs, stored)
        if _same(out, reference):
            return out
        self.enabled = False
        self.echo(f"note: {FLAG}: this model's upper layers did not reproduce their output from the cached "
                  "activations; training on without the cache (the result is the same, only slower).")
        self.close()
        return call(**inputs)

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _capture(self, key: Hashable):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._store(key, self._hidden(args, kwargs))

        return hook

    @staticmethod
    def _serve(stored: torch.Tensor):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": stored}
            return (stored, *args[1:]), kwargs

        return hook

    def summary(self) -> dict[str, Any]:
        """What the cache did, for ``results.json``."""
        return {"cut_layer": self.cut, "hits": self.hits, "misses": self.misses, "used": self.enabled,
                "memory_mib": round(self.memory_bytes / 2**20, 1), "disk_mib": round(self.disk_bytes / 2**20, 1)}

    # -- the end -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop what is stored and delete the cache's own folder (only that one)."""
        self.memory.clear()
        self.disk.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _cuda_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _same(a: Any, b: Any) -> bool:
    """Bit-equal outputs: every tensor of a model output (``ModelOutput`` / tuple / tensor)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a.detach(), b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True
