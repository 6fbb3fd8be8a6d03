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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpoint_format import CONFIG_NAME, read_meta
from ..data import LM_TASKS, Columns, TaskSpec, build_task, detect_columns
from ..data.audio import load_feature_extractor
from ..errors import AdapterError, CheckpointError
from ..fingerprint import base_fingerprint
from ..layouts import spec_for
from ..loader import load_config, load_tokenizer, model_is_decoder
from ..model import AdapterModel
from ..sharing import local_folder
from ..packaged import base_reference
from .checkpoint import load_head

BASE_FILE = "adapterkit_base.json"


@dataclass
class Artifact:
    """A located training result: ``kind`` is ``"adapter"`` or ``"model"``."""

    kind: str
    path: Path
    run: Optional[Path] = None


def locate(path: "str | Path", what: str = "--adapter") -> Artifact:
    """Find the adapter or model in ``path``; errors name the argument as ``what`` (e.g. ``--adapter``).
    A remote location (``s3://``, ``http(s)://``, ``hf://``) is fetched into the cache first."""
    path = Path(local_folder(path))
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
    source = read_meta(artifact.path / CONFIG_NAME).get("base_model", {}).get("source")
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
    if kind == "ctc":  # the head's id2label is the vocabulary, blank first (data/ctc.py)
        return TaskSpec(task="ctc", columns=Columns(text="path", label="text"), labels=labels)
    return TaskSpec(task="tagging", columns=Columns(), labels=labels)


def saved_task(adapter: "str | Path") -> Optional[str]:
    """The task recorded beside an adapter or model (``adapterkit_task.json``; for an adapter saved
    from Python, ``ctc`` when its head is one), without loading the model; ``None`` otherwise."""
    artifact = locate(adapter)
    spec = TaskSpec.load(artifact.path)
    if spec is not None:
        return spec.task
    head = read_meta(artifact.path / CONFIG_NAME).get("head") if artifact.kind == "adapter" else None
    return "ctc" if isinstance(head, dict) and head.get("type") == "ctc" else None


@dataclass
class Loaded:
    model: AdapterModel
    tokenizer: Any
    spec: TaskSpec
    name: Optional[str]
    artifact: Optional[Artifact]  # None: the bare base model (``load_bare``)
    base: str
    audio: bool = False  # a speech model: ``tokenizer`` is its feature extractor


def load_trained(adapter: "str | Path", model: Optional[str] = None, *, allow_other_base: bool = False,
                 quantize: Optional[str] = None) -> Loaded:
    """Load the base model with the trained adapter (or the full model) and its head, ready to run.

    An adapter is refused on a base other than the one it was trained on (content fingerprint,
    ``fingerprint.py``): ``--model`` is compared with the base recorded in ``adapterkit_base.json``
    and in the adapter's config; ``allow_other_base=True`` (``--allow-other-base``) skips that.
    ``quantize`` (``--quantize``) loads the base in int8 / int4 (``quantization.py``)."""

    artifact = locate(adapter)
    meta = read_meta(artifact.path / CONFIG_NAME) if artifact.kind == "adapter" else {}  # a damaged file: one line, now
    base = base_model_of(artifact, model)
    decoder = model_is_decoder(base)
    audio = reads_audio(base)
    tokenizer = load_feature_extractor(base) if audio else load_tokenizer(base)
    net = AdapterModel.from_pretrained(base, quantize=quantize)
    if artifact.kind == "model":
        saved = load_head(artifact.path, net.layout, next(iter(net.model.parameters()), None))
        name = "head" if saved is not None else None
        head = net.add_head(name, saved.config, state=saved.state_dict()) if saved is not None else None
        spec = task_of(artifact, head.config.to_dict() if head is not None else None, decoder)
    else:
        recorded = _recorded_base(artifact)
        if model and recorded.get("fingerprint") and not allow_other_base:
            mine = base_fingerprint(net.model, net.layout, version=recorded.get("fingerprint_version", 1))
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
    spec = spec_for(load_config(model))
    return spec is not None and spec.modality == "audio"


def load_bare(model: Optional[str], table: Any, *, task: Optional[str] = None, template: Optional[str] = None,
              verbalizer: Optional[str] = None, text: Optional[str] = None, text_pair: Optional[str] = None,
              label: Optional[str] = None, quantize: Optional[str] = None) -> Loaded:
    """The base model without any adapter, for ``adapterkit eval`` without ``--adapter``: the task
    comes from the flags and the data ``table``, and must be one the LM scores by itself
    (``lm-classification``: zero-shot accuracy; ``causal-lm``: perplexity), since there is no head."""

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
    net = AdapterModel.from_pretrained(model, quantize=quantize)
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
    (directory / BASE_FILE).write_text(json.dumps({"model": base_reference(model), **identity}), encoding="utf-8")
