"""Which examples go into which step, on which process, and how they become tensors.

The order of a run is a pure function of ``(seed, epoch)``: a seeded permutation per epoch, cut
into *global* batches of ``batch_size`` examples (optionally grouped by length: sorted inside
mega-chunks of 50 batches, then the batches shuffled, as ``transformers``' ``group_by_length``).
A global batch is then split across processes (``shard``) and, inside a process, into
micro-batches for gradient accumulation. Because every split is weighted by its share of the
global batch (``units``), one process with batch *b*, two processes with *b/2* each, and
accumulation over micro-batches all compute the same gradient; resuming at step *k* only needs
``(epoch, index in epoch)``.

``fixed_epoch_batches`` keeps the batches of epoch 1 (the same examples together, so the same
padded shapes) and only shuffles their order in later epochs: what ``--cache-activations``
needs, since a frozen layer's output for a batch is then the same bits in every epoch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..data import LM_TASKS, Encoded

MEGA_BATCHES = 50
FIXED_SALT = 7_919  # the batch order of fixed batches is drawn apart from the examples' order


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *, group_by_length: bool = True
) -> list[list[int]]:
    """Global batches (lists of example indices) of one epoch; deterministic in (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = batch_size * MEGA_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def fixed_epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *, group_by_length: bool = True
) -> tuple[list[list[int]], list[int]]:
    """Epoch 1's batches in this epoch's order, and each one's id (its position in epoch 1);
    deterministic in (seed, epoch). Epoch 1 is ``epoch_batches(..., 1)`` itself."""
    batches = epoch_batches(lengths, batch_size, seed, 1, group_by_length=group_by_length)
    if epoch == 1:
        order = list(range(len(batches)))
    else:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch + FIXED_SALT)
        order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order], order


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's part of a global batch (strided, so lengths stay balanced)."""
    return list(batch[rank::world_size])


def micro_batches(indices: Sequence[int], size: Optional[int]) -> list[list[int]]:
    if not size or size >= len(indices):
        return [list(indices)]
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def units(enc: Encoded, indices: Sequence[int], task: str) -> int:
    """What the task's loss averages over: examples, labelled tokens, or predicted tokens."""
    if task == "tagging":
        return sum(sum(1 for t in enc.labels[i] if t != -100) for i in indices)
    if task in LM_TASKS:  # the model shifts labels by one: token t predicts t + 1
        return sum(sum(1 for t in enc.labels[i][1:] if t != -100) for i in indices)
    return len(indices)


def collate(enc: Encoded, indices: Sequence[int], task: str, pad_id: int, *, with_labels: bool = True) -> dict:
    """Pad one batch to its longest example (right padding); labels padded with -100."""
    if hasattr(enc, "collate"):  # audio clips (data/audio.py) pad themselves
        return enc.collate(indices, with_labels=with_labels)
    width = max(len(enc.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long) if enc.token_type_ids else None
    for row, i in enumerate(indices):
        n = len(enc.input_ids[i])
        ids[row, :n] = torch.tensor(enc.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(enc.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if with_labels and enc.labels:
        batch["labels"] = _labels(enc, indices, task, width)
    return batch


def _labels(enc: Encoded, indices: Sequence[int], task: str, width: int) -> torch.Tensor:
    if task == "tagging" or task in LM_TASKS:
        out = torch.full((len(indices), width), -100, dtype=torch.long)
        for row, i in enumerate(indices):
            out[row, : len(enc.labels[i])] = torch.tensor(enc.labels[i])
        return out
    if task == "classification":
        return torch.tensor([enc.labels[i] for i in indices], dtype=torch.long)
    return torch.tensor([enc.labels[i] for i in indices], dtype=torch.float32)
