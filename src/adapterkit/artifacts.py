"""Find and load what training produced, for ``eval``, ``predict``, ``inspect`` and ``merge``.

``--adapter`` accepts any of:

* a run folder written by ``adapterkit train`` (``run.json`` + ``adapter/`` or ``model/``);
* an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), from the CLI or
  from ``AdapterModel.save_adapter``;
* a full model folder (``config.json``) written by ``--full-finetune`` or ``adapterkit merge``,
  with its task head in ``adapterkit_head.*``.

Folders written by the CLI also hold ``adapterkit_task.json`` (task, columns, labels) and
``adapterkit_base.json`` (the base model), so ``--model`` may be left out. An adapter saved from
Python has neither: its head's label names are used, and ``--model`` is required.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .data import Columns, TaskSpec
from .errors import AdapterError, CheckpointError
from .io import CONFIG_NAME, WEIGHTS_NAME
from .model import AdapterModel

BASE_FILE = "adapterkit_base.json"


@dataclass
class Artifact:
    """A located training result: ``kind`` is ``"adapter"`` or ``"model"``."""

    kind: str
    path: Path
    run: Optional[Path] = None


def locate(path: "str | Path", what: str = "--adapter") -> Artifact:
    """Find the adapter or model in ``path``; errors name the argument as ``what`` (e.g. ``--adapter``)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{what} {path}: no such folder; pass a run folder (--out of adapterkit train) or an adapter folder.")
    if not path.is_dir():
        raise AdapterError(f"{what} {path}: is a file; pass the folder that holds {CONFIG_NAME}, or a run folder.")
    if (path / CONFIG_NAME).is_file():
        return Artifact("adapter", path)
    if (path / "config.json").is_file():
        return Artifact("model", path)
    if (path / "run.json").is_file():
        if (path / "adapter" / CONFIG_NAME).is_file():
            return Artifact("adapter", path / "adapter", run=path)
        if (path / "model" / "config.json").is_file():
            return Artifact("model", path / "model", run=path)
        raise AdapterError(f"{what} {path}: the run has not saved an adapter yet (no adapter/ folder); wait for the "
                           f"first evaluation or resume it with adapterkit train --resume {path}.")
    raise AdapterError(f"{what} {path}: not an adapter ({CONFIG_NAME} missing), a run folder (run.json) or a model "
                       "folder (config.json).")


def base_model_of(artifact: Artifact, model: Optional[str]) -> str:
    """``--model`` if given, else the base recorded beside the adapter."""
    if artifact.kind == "model":
        return str(artifact.path)
    if model:
        return model
    recorded = _recorded_base(artifact).get("model") or _saved_source(artifact)
    if recorded:
        return str(recorded)
    raise AdapterError(f"{artifact.path}: does not record its base model; pass --model PATH_OR_ALIAS.")


def _saved_source(artifact: Artifact) -> Optional[str]:
    """The base ``save_adapter`` recorded (``base_model.source``) for a handle made with
    ``AdapterModel.from_pretrained``; the CLI's own ``adapterkit_base.json`` comes first."""
    if not (artifact.path / CONFIG_NAME).is_file():
        return None
    source = read_meta(artifact.path).get("base_model", {}).get("source")
    return source if isinstance(source, str) and source else None


def read_json(path: Path, fix: str) -> Any:
    """A JSON file the CLI reads beside an adapter or run; any problem is a ``CheckpointError``
    naming the file and ``fix`` (Python's reader recurses per level: deep nesting is refused too)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: cannot be read ({err}); {fix}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to read; {fix}") from None


def read_meta(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` with the types of its top-level fields checked, so a hand-edited or
    damaged file is one ``CheckpointError`` naming the field, not a traceback from deep inside."""
    file = path / CONFIG_NAME
    fix = "the adapter is damaged or was edited by hand; save it again (or restore the file)."
    meta = read_json(file, fix)
    expected = {"format_version": int, "name": str, "config": dict, "head": dict, "base_model": dict, "places": list}
    problems = [] if isinstance(meta, dict) else [f"it holds a JSON {type(meta).__name__}, not an object"]
    for key, kind in expected.items() if not problems else ():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            problems.append(f"'{key}' is {json.dumps(value)[:40]}, not a JSON {_JSON_NAMES[kind]}")
    if not problems and "config" not in meta:
        problems.append("it has no 'config'")
    head = meta.get("head") if not problems else None
    if head:
        problems += _head_problems(head, path)
    if problems:
        raise CheckpointError(f"{file}: {'; '.join(problems)}; {fix}")
    return meta


_JSON_NAMES = {int: "integer", str: "string", dict: "object", list: "array"}


def tensor_shapes(path: Path) -> "OrderedDict[str, list[int]]":
    """Name -> shape of every tensor in a safetensors file, read from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return OrderedDict((k, list(f.get_slice(k).get_shape())) for k in sorted(f.keys()))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: cannot be read ({err}); the file is truncated or corrupt.") from None


def _head_problems(head: dict[str, Any], path: Path) -> list[str]:
    """``num_labels`` must be a whole number that the saved head weights hold (a false one would
    build a head of that many outputs before the weights are read)."""
    n = head.get("num_labels")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return [f"head 'num_labels' is {json.dumps(n)[:40]}, not a positive whole number"]
    try:
        shapes = tensor_shapes(path / WEIGHTS_NAME)
    except CheckpointError:
        return []  # the loader names the damaged weights file itself
    head_dims = {d for k, shape in shapes.items() if k.startswith("head.") for d in shape}
    if head_dims and n not in head_dims:
        return [f"head 'num_labels' is {n}, but no head weight has {n} rows (the saved head has other sizes)"]
    return []


def task_of(artifact: Artifact, head_config: Optional[dict[str, Any]], decoder: bool) -> TaskSpec:
    """The saved task, or one derived from the head (adapters saved from Python)."""
    spec = TaskSpec.load(artifact.path)
    if spec is not None:
        return spec
    if head_config is None:
        if decoder:
            return TaskSpec(task="causal-lm", columns=Columns(text="text"))
        raise AdapterError(f"{artifact.path}: has no task head, so there is nothing to predict with an encoder model.")
    labels = [head_config.get("id2label", {}).get(str(i), str(i)) for i in range(head_config["num_labels"])]
    kind = head_config["type"]
    if kind == "classification":
        return TaskSpec(task="multilabel" if head_config.get("multilabel") else "classification", columns=Columns(), labels=labels)
    if kind == "regression":
        return TaskSpec(task="regression", columns=Columns())
    return TaskSpec(task="tagging", columns=Columns(), labels=labels)


@dataclass
class Loaded:
    model: AdapterModel
    tokenizer: Any
    spec: TaskSpec
    name: Optional[str]
    artifact: Optional[Artifact]  # None: the bare base model (``load_bare``)
    base: str
    audio: bool = False  # a speech model: ``tokenizer`` is its feature extractor


def load_trained(adapter: "str | Path", model: Optional[str] = None, *, allow_other_base: bool = False) -> Loaded:
    """Load the base model with the trained adapter (or the full model) and its head, ready to run.

    An adapter is refused on a base other than the one it was trained on (content fingerprint,
    ``fingerprint.py``): ``--model`` is compared with the base recorded in ``adapterkit_base.json``
    and in the adapter's config; ``allow_other_base=True`` (``--allow-other-base``) skips that."""
    from .train.checkpoint import load_head
    from .fingerprint import base_fingerprint
    from .loader import load_model, load_tokenizer, model_is_decoder

    artifact = locate(adapter)
    meta = read_meta(artifact.path) if artifact.kind == "adapter" else {}  # a damaged file: one line, now
    base = base_model_of(artifact, model)
    decoder = model_is_decoder(base)
    audio = reads_audio(base)
    tokenizer = _processor(base) if audio else load_tokenizer(base)
    net = load_model(base)
    if artifact.kind == "model":
        head = load_head(artifact.path, net.layout, next(iter(net.model.parameters()), None))
        name = None
        if head is not None:
            name = "head"
            net.heads[name] = head
            net.active_head = name
        spec = task_of(artifact, head.config.to_dict() if head is not None else None, decoder)
    else:
        recorded = _recorded_base(artifact)
        if model and recorded.get("fingerprint") and not allow_other_base:
            mine = base_fingerprint(net.model, net.layout)
            if mine != recorded["fingerprint"]:
                raise AdapterError(
                    f"--model {model} is not the base {artifact.path} was trained on ({recorded.get('model')}, "
                    f"fingerprint {recorded['fingerprint']}; this one has {mine}): its scores would be wrong. Drop "
                    "--model to use the recorded base, or pass --allow-other-base to use this one anyway.")
        name = net.load_adapter(artifact.path, set_active=True, strict_base=not allow_other_base)
        spec = task_of(artifact, meta.get("head"), decoder)
    net.eval()
    return Loaded(net, tokenizer, spec, name, artifact, base, audio)


def reads_audio(model: str) -> bool:
    """Whether ``model`` is a speech encoder (its inputs are audio samples, not tokens)."""
    from .layouts import spec_for
    from .loader import load_config

    spec = spec_for(load_config(model))
    return spec is not None and spec.modality == "audio"


def _processor(model: str) -> Any:
    """A speech model's feature extractor, which takes the tokenizer's place for audio."""
    from .data.audio import load_feature_extractor

    return load_feature_extractor(model)


def load_bare(model: Optional[str], table: Any, *, task: Optional[str] = None, template: Optional[str] = None,
              verbalizer: Optional[str] = None, text: Optional[str] = None, text_pair: Optional[str] = None,
              label: Optional[str] = None) -> Loaded:
    """The base model without any adapter, for ``adapterkit eval`` without ``--adapter``: the task
    comes from the flags and the data ``table``, and must be one the LM scores by itself
    (``lm-classification``: zero-shot accuracy; ``causal-lm``: perplexity), since there is no head."""
    from .data import LM_TASKS, build_task, detect_columns
    from .loader import load_model, load_tokenizer, model_is_decoder

    if not model:
        raise AdapterError("adapterkit eval without --adapter scores the bare model: pass --model (e.g. smollm2), or "
                           "pass --adapter to score a trained adapter.")
    decoder = model_is_decoder(model)
    columns = detect_columns(table, text=text, text_pair=text_pair, label=label, task=task)
    spec = build_task(table, columns, task, decoder=decoder, template=template, verbalizer=verbalizer)
    if spec.task not in LM_TASKS:
        raise AdapterError(f"{table.path}: task {spec.task} needs a trained head, which a bare model lacks: pass "
                           "--adapter, or score a causal LM's own answers with --template and --verbalizer "
                           "(lm-classification).")
    tokenizer = load_tokenizer(model)
    net = load_model(model)
    net.eval()
    return Loaded(net, tokenizer, spec, None, None, model)


def _recorded_base(artifact: Artifact) -> dict[str, Any]:
    ref = artifact.path / BASE_FILE
    if not ref.is_file():
        return {}
    data = read_json(ref, "pass --model PATH_OR_ALIAS and delete the file.")
    return data if isinstance(data, dict) else {}


def write_base_ref(directory: Path, model: str, identity: dict[str, Any]) -> None:
    """Record the base beside an adapter (``adapterkit_base.json``: path or alias, fingerprint,
    name), so ``eval`` / ``predict`` need no ``--model`` and can check one that is given."""
    from .packaged import base_reference

    (directory / BASE_FILE).write_text(json.dumps({"model": base_reference(model), **identity}), encoding="utf-8")
