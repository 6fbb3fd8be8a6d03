"""The checkpoint format on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic: both files go to a temporary folder beside the target, which then replaces
the target by renames, so an interrupted save leaves the previous checkpoint intact (if the final
rename fails, the previous folder is renamed back). A target that is a symlink is followed: the
save writes through to the folder it points to and the link stays. The files get the permissions
the umask gives (as the folder does), so others can read a shared adapter folder. Because the whole folder is replaced, a save
refuses a target folder that holds anything but a checkpoint, rather than deleting it. Reads check
that both files exist, that the JSON parses and that the tensors load (safetensors only: nothing
is ever unpickled), and raise ``CheckpointError`` naming the file and the fix.

Every tensor read (``check_tensors``) must be floating point and finite: an integer tensor or a
NaN / infinity among adapter or head weights is refused with the file and the key. Floating
tensors of another precision than the model's (float64, float16, bfloat16) are accepted and cast
to the model's dtype when they are copied into its parameters (``load_state_dict``), as
``transformers`` does for base weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
#: the run lock of a command writing this folder (``train.runlock``): not a user's file
LOCK_NAME = ".adapterkit.lock"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it, so put it straight back
    os.umask(mask)
    return mask


def temp_dir(prefix: str, parent: "str | os.PathLike") -> Path:
    """A fresh folder to fill and rename into place, with the permissions ``mkdir`` would give
    (``tempfile.mkdtemp`` makes it 0700, which others on a shared machine could not read)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def follow_umask(folder: Path, *, recursive: bool = False) -> None:
    """Give the files in ``folder`` (and its subfolders, ``recursive``) the permissions ``open``
    would give (``safetensors`` writes its file 0600 through a temporary file, which other users of
    a shared adapter folder cannot read)."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*") if recursive else folder.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def resolve_target(directory: "str | os.PathLike") -> Path:
    """The folder a save writes into: a symlink is followed, so the save writes through to the
    folder it points to (and the link stays a link) instead of replacing the link."""
    target = Path(directory)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def swap_in(tmp: Path, target: Path) -> None:
    """Put the filled folder ``tmp`` at ``target`` by renames only: a reader sees the old folder
    or the new one, never a mix; if the second rename fails the old folder is put back."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous folder back
        raise
    # renamed before deleting, so a half-deleted folder never looks like a usable ".old"
    trash = target.with_name(f".{target.name}.trash-{os.getpid()}")
    os.replace(old, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint(directory: "str | os.PathLike", meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically write ``meta`` (JSON) and ``tensors`` (safetensors) into ``directory`` (through
    a symlink to the folder it points to); the files follow the umask, like the folder."""
    target = resolve_target(directory)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{target.name}.tmp-", target.parent)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "adapterkit"})
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, **meta}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / WEIGHTS_NAME, "rb") as f:
            os.fsync(f.fileno())
        follow_umask(tmp)
        swap_in(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    """A save replaces the whole folder: allow only a new, empty or checkpoint-only one."""
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"'{target}' is a file, not a folder; save the adapter to a folder path.")
    others = sorted(p.name for p in target.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME, LOCK_NAME))
    if others:
        raise CheckpointError(
            f"'{target}' holds other files ({', '.join(others[:5])}) that saving the adapter there would "
            f"delete: save into a new or empty folder, e.g. '{target / 'adapter'}'."
        )


def read_checkpoint(directory: "str | os.PathLike") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a checkpoint folder; returns (meta, tensors)."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"No adapter checkpoint at '{path}': the folder does not exist. Check the path.")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise CheckpointError(
                f"'{f}' is missing: an adapter checkpoint holds {CONFIG_NAME} and {WEIGHTS_NAME}. "
                "Save it again with save_adapter()."
            )
    meta = read_meta(config_file)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"'{weights_file}' cannot be read ({err}); it is truncated or corrupt: save the adapter again."
        ) from None
    check_tensors(tensors, weights_file)
    check_head_size(meta, sum(t.numel() for k, t in tensors.items() if k.startswith("head.")), config_file)
    return meta, tensors


def read_meta(config_file: "str | os.PathLike") -> dict[str, Any]:
    """``adapter_config.json`` parsed and checked (``check_meta``), without the weights: what
    ``inspect`` and the other readers of a checkpoint's description should use."""
    config_file = Path(config_file)
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{config_file}' is not valid JSON ({err}); the file is corrupt: save the adapter again.") from None
    except RecursionError:
        raise CheckpointError(f"'{config_file}' is nested too deeply to be an adapter config; the file is corrupt: "
                              "save the adapter again.") from None
    except OSError as err:
        raise CheckpointError(f"'{config_file}' cannot be read ({err.strerror or err}); check the path.") from None
    check_meta(meta, config_file)
    held = _head_numbers_on_disk(config_file.parent / WEIGHTS_NAME)
    if held is not None:
        check_head_size(meta, held, config_file)
    return meta


def _head_numbers_on_disk(weights_file: Path) -> "int | None":
    """How many numbers the ``head.*`` tensors of a safetensors file hold, read from its header
    only (no tensor is loaded); ``None`` when the file cannot be read (its reader says why)."""
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("head."))
    except Exception:  # noqa: BLE001 - missing or corrupt: read_checkpoint names the problem when it loads the file
        return None


def check_meta(meta: Any, config_file: "str | os.PathLike") -> None:
    """Refuse an ``adapter_config.json`` whose top-level entries have the wrong JSON types (a
    string or list ``format_version``, a list ``base_model``, ...), naming the entry: the readers
    after this one may then index it without a ``TypeError``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(meta.get("places"), list):
        raise CheckpointError(
            f"'{config_file}' is not an adapterkit adapter config (it needs a 'config' object and a 'places' "
            "list); the file was edited or comes from another library: save the adapter again with save_adapter()."
        )

    def wrong(entry: str, want: str) -> CheckpointError:
        return CheckpointError(f"'{config_file}': '{entry}' must be {want}, got {_short(meta_at(entry))}; the file "
                               "was edited or is corrupt: save the adapter again with save_adapter().")

    def meta_at(entry: str) -> Any:
        value: Any = meta
        for part in entry.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise wrong("format_version", "a whole number")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"'{config_file}' has format version {version}, newer than this adapterkit "
            f"understands ({FORMAT_VERSION}); upgrade adapterkit."
        )
    if not all(isinstance(p, str) for p in meta["places"]):
        raise wrong("places", "a list of place names (strings)")
    base = meta.get("base_model", {})
    if not isinstance(base, dict):
        raise wrong("base_model", "an object")
    shapes = base.get("host_shapes", {})
    if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in s)
            for s in shapes.values()):
        raise wrong("base_model.host_shapes", "an object of place -> list of whole numbers")
    if meta.get("head") is not None and not isinstance(meta["head"], dict):
        raise wrong("head", "an object (or null)")
    if meta.get("name") is not None and not isinstance(meta["name"], str):
        raise wrong("name", "a string")


def check_head_size(meta: dict[str, Any], held: int, config_file: "str | os.PathLike") -> None:
    """A head's ``num_labels`` must be a whole number its saved weights (``held`` numbers in the
    ``head.*`` tensors) can hold, as its output layer has at least ``num_labels`` numbers: refused
    before the head is built, so an edited ``num_labels: 1000000000000`` never allocates."""
    head = meta.get("head")
    if not isinstance(head, dict) or "num_labels" not in head:
        return
    labels = head["num_labels"]
    if not isinstance(labels, int) or isinstance(labels, bool) or not 1 <= labels <= max(held, 1):
        raise CheckpointError(f"'{config_file}': the head's num_labels is {_short(labels)}, which its saved weights "
                              f"({held} numbers) cannot hold; the file was edited or is corrupt: save the adapter again.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_tensors(tensors: dict[str, torch.Tensor], source: "str | os.PathLike") -> None:
    """Refuse weights that are not floating point or not finite, naming ``source`` and the key."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise CheckpointError(
                f"'{source}': tensor '{key}' has dtype {str(value.dtype).replace('torch.', '')}, but weights must be "
                "floating point; the file was edited or made by another tool: save the adapter again."
            )
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"'{source}': tensor '{key}' holds NaN or infinite values; the weights are broken (a diverged "
                "training run?): train again with a lower learning rate, or use an earlier checkpoint."
            )


def check_base_shape(saved: dict[str, Any], mine: dict[str, Any], directory: Any) -> None:
    """Refuse a checkpoint whose recorded base (``model_type``, ``hidden_size``, ``num_layers``)
    differs from this model's (``Layout.fingerprint()``)."""
    for key in ("model_type", "hidden_size", "num_layers"):
        if saved.get(key) is not None and mine.get(key) is not None and saved[key] != mine[key]:
            raise CheckpointError(
                f"{directory} was saved for a base model with {key}={saved[key]!r}, but this model has "
                f"{key}={mine[key]!r}. Load it into the base model it was trained on."
            )


def load_exact(module: "torch.nn.Module", tensors: dict[str, torch.Tensor], prefix: str, directory: Any) -> None:
    """Load ``prefix*`` tensors into ``module``, requiring exactly its keys and shapes."""
    expected = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the checkpoint is corrupt or was edited. Save it again."
        )
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{directory}: '{prefix}{key}' has shape {tuple(value.shape)} but this model needs "
                f"{tuple(expected[key].shape)}; the adapter was made for another base model."
            )
    module.load_state_dict(given, strict=True)


def adapter_size_bytes(directory: "str | os.PathLike") -> int:
    """Size on disk of a saved adapter (both files)."""
    path = Path(directory)
    return sum((path / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME) if (path / name).exists())


def write_dir_atomic(target: "str | Path", fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp)`` on a fresh folder beside ``target``, then swap it in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{target.name}.tmp-", target.parent)
    try:
        fill(tmp)
        follow_umask(tmp, recursive=True)  # safetensors writes 0600; the folder follows the umask
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
