"""What a run folder holds, and how its parts are written so that a crash never corrupts them.

``DIR/``
  ``run.json``            the run's settings, task and data fingerprints; status running/finished
  ``adapter/``            the best adapter so far (adapterkit checkpoint + ``adapterkit_task.json``)
  ``model/``              instead of ``adapter/`` for ``--full-finetune``: a plain ``transformers``
                          folder + tokenizer (+ ``adapterkit_head.*`` for a task head)
  ``checkpoint/``         the resumable state, every ``save_every`` steps and after every epoch;
                          removed when the run finishes
  ``metrics.jsonl``, ``training.png``, ``results.json``

The resumable state is safetensors + JSON only (no pickle): ``trainable.safetensors`` (every
parameter with ``requires_grad``), ``optimizer.safetensors`` (AdamW moments and steps),
``rng.safetensors`` (torch RNG states), ``best.safetensors`` (the best weights so far) and
``state.json`` (position in the data, step, best metric, optimizer hyper-parameters, the
length of ``metrics.jsonl`` at that moment).

Every folder is written into a temporary folder beside its target and swapped in by renames; if
a process dies between the two renames, readers fall back to the previous folder (``.NAME.old-*``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..heads import Head, HeadConfig, build_head
from ..checkpoint_format import check_tensors, write_dir_atomic
from .optim import load_optimizer_state, optimizer_state

RUN_FILE = "run.json"
STATE_FILE = "state.json"
HEAD_CONFIG = "adapterkit_head.json"
HEAD_WEIGHTS = "adapterkit_head.safetensors"


# -- atomic folders and files ----------------------------------------------------------------------
def existing_dir(target: "str | Path") -> Optional[Path]:
    """``target`` if it exists, else the previous version left by an interrupted swap."""
    target = Path(target)
    if target.is_dir():
        return target
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return olds[-1] if olds else None


def clean_leftovers(target: "str | Path") -> None:
    """Remove what interrupted writes of ``target`` left behind (temporary and trash folders or files)."""
    target = Path(target)
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.trash-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_json_atomic(path: "str | Path", data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_size(path: "str | Path") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# -- resumable state -------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def save_state(
    directory: "str | Path",
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    best: Optional[dict[str, torch.Tensor]],
) -> Path:
    names = list(trainable_state(model))

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, str(tmp / "trainable.safetensors"))
        tensors, meta = optimizer_state(optimizer, names)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        if best is not None:
            save_file({k: v.contiguous().cpu() for k, v in best.items()}, str(tmp / "best.safetensors"))
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump({**state, "optimizer": meta}, f, indent=2, sort_keys=True)

    return write_dir_atomic(directory, fill)


def _load(path: Path, *, weights: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of one file; ``weights=True`` also refuses non-float or non-finite ones (``io.check_tensors``)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err}); the checkpoint is corrupt. Start the run again.") from None
    if weights:
        check_tensors(tensors, path)
    return tensors


def load_state(
    directory: "str | Path", model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], Optional[dict[str, torch.Tensor]]]:
    """Restore parameters, optimizer and RNG; returns (state, best weights or None)."""
    found = existing_dir(directory)
    if found is None:
        raise CheckpointError(f"{directory}: no checkpoint to resume from.")
    try:
        state = json.loads((found / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{found / STATE_FILE}: cannot be read ({err}); the checkpoint is corrupt.") from None
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    weights = _load(found / "trainable.safetensors", weights=True)
    if sorted(weights) != sorted(names):
        raise CheckpointError(
            f"{found}: the checkpoint holds other trainable parameters than this run has; "
            "resume with the same method and options."
        )
    with torch.no_grad():
        for n, value in weights.items():
            params[n].copy_(value)
    load_optimizer_state(optimizer, names, _load(found / "optimizer.safetensors"), state.pop("optimizer"), str(found))
    rng = _load(found / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    best = _load(found / "best.safetensors", weights=True) if (found / "best.safetensors").exists() else None
    return state, best


# -- full models with a head (full fine-tuning, merged adapters) -------------------------------------
def save_head(directory: "str | Path", head: Head) -> None:
    directory = Path(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps(head.config.to_dict(), indent=2, sort_keys=True), encoding="utf-8")


def load_head(directory: "str | Path", layout: Any, like: Optional[torch.Tensor] = None) -> Optional[Head]:
    """The head saved beside a full model (``save_head``), built for ``layout`` (``heads.build_head``)."""
    directory = Path(directory)
    if not (directory / HEAD_CONFIG).is_file():
        return None
    try:
        config = HeadConfig.from_dict(json.loads((directory / HEAD_CONFIG).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{directory / HEAD_CONFIG}: corrupt head config ({err}).") from None
    head = build_head(config, layout, like)
    head.load_state_dict(_load(directory / HEAD_WEIGHTS, weights=True))
    return head
