"""Composition: how several adapters combine, and the runtimes that carry it out.

* ``blocks``: the blocks users write (``Stack``, ``Fuse``, ``Parallel``, ``Average``,
  ``BatchSplit``), their nesting table and their compilation into a slot's plan;
* ``fuse``: ``Fuse``'s fusion layers (AdapterFusion) and the ``Fusions`` lifecycle;
* ``parallel``: ``Parallel``'s runtime (replicate the batch once, one output per child);
* ``adapterdrop``: AdapterDrop (``skip_layers``, no work below the lowest adapter);
* ``routing``: per-example routing (``adapter_names=``).
"""

from .blocks import ALLOWED_NESTINGS, BLOCKS, Average, BatchSplit, Block, Fuse, Parallel, Setup, Stack, as_fuse, as_setup, \
    compile_plan, setup_from_dict

__all__ = ["ALLOWED_NESTINGS", "BLOCKS", "Average", "BatchSplit", "Block", "Fuse", "Parallel", "Setup", "Stack",
           "as_fuse", "as_setup", "compile_plan", "setup_from_dict"]
