"""Reading and writing the files of foreign adapter folders: JSON, safetensors, and (by opt-in
only) pickled ``*.bin`` weights.

Pickles can run code when they are loaded, so a ``.bin`` file is refused unless the caller opts
in (``allow_pickle=True``, CLI ``--allow-pickle``); even then it is read with
``torch.load(..., weights_only=True)``, which unpickles tensors and plain containers only.
Folders are written atomically (``checkpoint_format.write_dir_atomic``): into a temporary sibling
that then replaces the target, and only over a folder that holds nothing but adapter files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint_format import LOCK_NAME, follow_umask, resolve_target, write_dir_atomic
from ..errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a ``CheckpointError`` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"'{path}' is missing; the adapter folder is incomplete.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({err}); the file is corrupt.") from None
    except RecursionError:
        raise CheckpointError(f"'{path}' is nested too deeply to be an adapter file; the file is corrupt.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' holds a {type(data).__name__}, not a JSON object; the file is corrupt.")
    return data


def pickle_refused(path: Path) -> CheckpointError:
    folder = path.parent
    return CheckpointError(
        f"'{path}' is a pickled PyTorch file, which can run code when it is loaded; adapterkit reads "
        f"safetensors. If you trust it, convert it once: adapterkit convert {folder} OUT --to adapterkit "
        f"--model BASE --allow-pickle (or load_adapter(..., allow_pickle=True)), or save it again with "
        "safetensors from the library that wrote it."
    )


def read_weights(folder: Path, safe_name: str, pickle_name: str, *, allow_pickle: bool,
                 required: bool = True) -> tuple[Optional[dict[str, torch.Tensor]], Optional[Path]]:
    """``(tensors, file)`` from ``safe_name``, else (opt-in) ``pickle_name``; ``(None, None)``
    when neither exists and ``required`` is false."""
    safe, pickled = folder / safe_name, folder / pickle_name
    if safe.is_file():
        try:
            return load_file(str(safe)), safe
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"'{safe}' cannot be read ({err}); it is truncated or corrupt.") from None
    if pickled.is_file():
        if not allow_pickle:
            raise pickle_refused(pickled)
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but tensors and containers
            raise CheckpointError(f"'{pickled}' cannot be read safely ({type(err).__name__}: {err}).") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"'{pickled}' does not hold a flat dict of tensors; it is not an adapter's weights.")
        return dict(state), pickled
    if required:
        raise CheckpointError(f"'{safe}' is missing (and there is no {pickle_name}); the adapter folder is incomplete.")
    return None, None


def write_folder(directory: "str | Path", json_files: dict[str, dict], tensor_files: dict[str, dict],
                 replaceable: "set[str] | frozenset[str]") -> Path:
    """Atomically write ``{name: object}`` as JSON and ``{name: tensors}`` as safetensors into
    ``directory``, which must be new, empty or hold only ``replaceable`` files (an adapter of
    the same format, which the save replaces)."""
    target = resolve_target(directory)
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(f"'{target}' is a file, not a folder; save the adapter to a folder path.")
        others = sorted(p.name for p in target.iterdir() if p.name not in replaceable and p.name != LOCK_NAME)
        if others:
            raise CheckpointError(
                f"'{target}' holds other files ({', '.join(others[:5])}) that saving the adapter there would "
                f"delete: save into a new or empty folder, e.g. '{target / 'adapter'}'."
            )

    def fill(tmp: Path) -> None:
        for name, tensors in tensor_files.items():
            tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        follow_umask(tmp)

    return write_dir_atomic(target, fill)
