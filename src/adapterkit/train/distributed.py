"""Data-parallel training with ``torchrun``: process group, DDP wrapping, sharding, gathering.

``torchrun --nproc_per_node 2 -m adapterkit train ...`` starts two copies of the CLI; each reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` from the
environment and joins one process group (gloo on CPU, NCCL on GPUs). Then:

* The ``AdapterModel`` is wrapped in ``DistributedDataParallel``. DDP all-reduces the gradients of
  parameters with ``requires_grad`` only, i.e. the adapter and head: the frozen base is neither
  reduced nor broadcast (it is marked ignored, since every process loads it from the same file).
* Each global batch is split across the processes (``batches.shard``) and every loss is weighted
  by its share of the global batch, so N processes with batch b/N give the same gradient as one
  process with batch b, up to float32 rounding, *when the forward is deterministic*: with every
  dropout off (``--no-base-dropout``, ``--head-dropout 0``, adapters without dropout) the adapters
  agree to float32 rounding (5.2e-8 on the test's tiny BERT). With dropout (the default) each
  process draws its own masks for its own shard, so the run is statistically equivalent to one
  process, not equal to it (0.13 apart on the same tiny BERT with dropout 0.1, as two seeds would
  be); ``docs/training.md`` says why per-example masks are not drawn.
* Evaluation is sharded too and the per-example outputs are gathered (plain tensors; nothing is
  pickled), so every process computes the same metrics and takes the same early-stopping decision.
* Only rank 0 writes files or prints; the others wait at the barriers.

The same command scales to many machines through torchrun's rendezvous
(``--nnodes 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400``); see ``docs/training.md``.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..methods.base import AdapterModule


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, local rank (device index)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: Optional[str] = None) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (no-op alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(env: DistEnv) -> None:
    """Tear the process group down. A DDP wrapper that is no longer referenced but sits in a
    reference cycle still holds the group through its reducer; collected after the group is
    destroyed, its gloo backend can block forever joining its threads, so it is collected first."""
    if env.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP over the trainable parameters only (the frozen base is ignored: no broadcast, no reduce)."""
    if not env.enabled:
        return model
    ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [env.local_rank] if torch.cuda.is_available() and next(model.parameters()).is_cuda else None
    idle = any(isinstance(m, AdapterModule) and m.partly_idle for m in model.modules())
    # buffers are ignored above: nothing to broadcast
    return DDP(model, device_ids=device_ids, find_unused_parameters=idle)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_ok(env: DistEnv, ok: bool) -> bool:
    """True when every process is ok (used after input validation, before anything is written)."""
    if not env.enabled:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.long)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def sum_scalar(env: DistEnv, value: float) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def gather_rows(env: DistEnv, rows: Sequence[torch.Tensor], total: int) -> list[torch.Tensor]:
    """Undo a strided shard: rank r computed rows ``r, r + W, r + 2W, ...`` of ``total``
    (1-D float tensors of any length); every process gets all rows in the original order."""
    if not env.enabled:
        return list(rows)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.cat([r.reshape(-1).to(torch.float32) for r in rows]) if rows else torch.zeros(0)
    sizes = torch.tensor([len(rows), flat.numel()], dtype=torch.long)
    all_sizes = [torch.zeros(2, dtype=torch.long) for _ in range(env.world_size)]
    dist.all_gather(all_sizes, sizes)
    max_rows = max(int(s[0]) for s in all_sizes)
    max_flat = max(int(s[1]) for s in all_sizes)
    pad_len = torch.zeros(max_rows, dtype=torch.long)
    pad_len[: len(rows)] = lengths
    pad_flat = torch.zeros(max_flat)
    pad_flat[: flat.numel()] = flat
    all_len = [torch.zeros(max_rows, dtype=torch.long) for _ in range(env.world_size)]
    all_flat = [torch.zeros(max_flat) for _ in range(env.world_size)]
    dist.all_gather(all_len, pad_len)
    dist.all_gather(all_flat, pad_flat)
    per_rank: list[list[torch.Tensor]] = []
    for r in range(env.world_size):
        n = int(all_sizes[r][0])
        pieces = torch.split(all_flat[r][: int(all_sizes[r][1])], all_len[r][:n].tolist()) if n else []
        per_rank.append(list(pieces))
    return [per_rank[i % env.world_size][i // env.world_size] for i in range(total)]
