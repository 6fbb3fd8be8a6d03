"""``adapterkit inspect``: what a saved adapter (or run, or full model) holds, without loading a model.

Reads the JSON files and the safetensors headers only (tensor names and shapes, no weights), and
prints the adapter's config, its head and task, where it sits in the base model, and a parameter
table by place.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .checkpoint_format import CONFIG_NAME, WEIGHTS_NAME, read_meta
from .errors import AdapterError, CheckpointError
from .train.artifacts import locate, read_json


def _shapes(path: Path) -> "OrderedDict[str, list[int]]":
    try:
        with safe_open(str(path), framework="pt") as f:
            return OrderedDict((k, list(f.get_slice(k).get_shape())) for k in sorted(f.keys()))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: cannot be read ({err}); the file is truncated or corrupt.") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _place_of(key: str) -> str:
    """``adapter.layers-3-ffn_out.down.weight`` -> ``layers.3.ffn_out``; ``head.*`` -> ``head``."""
    kind, rest = key.split(".", 1)
    if kind == "head":
        return "head"
    return rest.split(".", 1)[0].replace("-", ".")


def _object(path: Path) -> dict[str, Any]:
    data = read_json(path, "the folder is damaged or was edited by hand.")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; the folder is damaged or "
                              "was edited by hand.")
    return data


def describe(path: "str | Path") -> tuple[dict[str, Any], str]:
    """The summary of a run, adapter or model folder: ``(info for --json, text)``; a damaged or
    hand-edited file is a ``CheckpointError`` naming it (nothing is shown half)."""
    artifact = locate(path, "inspect")
    try:
        return _describe(artifact)
    except AdapterError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:  # a field of the wrong shape in a side file
        raise CheckpointError(f"inspect {path}: a file of the folder has an unexpected field ({type(err).__name__}: "
                              f"{err}); the folder is damaged or was edited by hand.") from None


def _describe(artifact: Any) -> tuple[dict[str, Any], str]:
    info: dict[str, Any] = {"path": str(artifact.path), "kind": artifact.kind}
    lines = [f"{artifact.path}  ({'adapter' if artifact.kind == 'adapter' else 'full model'})"]
    if artifact.run is not None:
        run = _object(artifact.run / "run.json")
        info["run"] = {"status": run.get("status"), "config": run.get("config")}
        cfg = run.get("config", {})
        lines.append(f"run: {artifact.run}  status {run.get('status')}  model {cfg.get('model')}  train {cfg.get('train')}")
        results = artifact.run / "results.json"
        if results.is_file():
            res = _object(results)
            info["results"] = res
            for split in ("eval", "test"):
                if res.get(split):
                    lines.append(f"  {split}: " + "  ".join(f"{k} {v:.4f}" for k, v in res[split].items()))
    task_file = artifact.path / "adapterkit_task.json"
    if task_file.is_file():
        task = _object(task_file)
        info["task"] = task
        labels = task.get("labels") or []
        shown = ", ".join(labels[:12]) + (" ..." if len(labels) > 12 else "")
        cols = {k: v for k, v in task.get("columns", {}).items() if v}
        lines.append(f"task: {task['task']}  columns {cols}" + (f"  labels [{shown}]" if labels else "")
                     + f"  max_length {task.get('max_length')}")
    base_file = artifact.path / "adapterkit_base.json"
    if base_file.is_file():
        info["base"] = _object(base_file).get("model")
        lines.append(f"base model: {info['base']}")
    if artifact.kind == "model":
        return _describe_model(artifact.path, info, lines)
    meta = read_meta(artifact.path / CONFIG_NAME)  # parsed and checked, no weights loaded
    info.update({"name": meta.get("name"), "config": meta.get("config"), "head": meta.get("head"),
                 "base_model": meta.get("base_model", {}), "places": meta.get("places", [])})
    base = meta.get("base_model", {})
    lines.append(f"adapter '{meta.get('name')}'  saved by adapterkit {meta.get('adapterkit_version')}  "
                 f"for {base.get('model_type')} (hidden {base.get('hidden_size')}, {base.get('num_layers')} layers)")
    lines.append("config:")
    for k, v in sorted(meta.get("config", {}).items()):
        lines.append(f"  {k:<28}{json.dumps(v)}")
    if meta.get("head"):
        h = meta["head"]
        lines.append(f"head: {h['type']}  {h['num_labels']} output(s)  {h['layers']} layer(s)  pooling {h['pooling']}"
                     + ("  multilabel" if h.get("multilabel") else ""))
    shapes = _shapes(artifact.path / WEIGHTS_NAME)
    table: "OrderedDict[str, list[int]]" = OrderedDict()
    for key, shape in shapes.items():
        place = _place_of(key)
        row = table.setdefault(place, [0, 0])
        row[0] += 1
        row[1] += _numel(shape)
    ordered = [p for p in meta.get("places", []) if p in table] + [p for p in table if p not in meta.get("places", [])]
    total = sum(r[1] for r in table.values())
    lines.append(f"{'place':<44}{'tensors':>8}{'parameters':>14}")
    for place in ordered:
        lines.append(f"{place:<44}{table[place][0]:>8}{table[place][1]:>14,}")
    lines.append(f"{'total':<44}{sum(r[0] for r in table.values()):>8}{total:>14,}")
    info["parameters"] = {p: table[p][1] for p in ordered}
    info["total_parameters"] = total
    size = sum(f.stat().st_size for f in artifact.path.iterdir() if f.is_file())
    info["size_bytes"] = size
    lines.append(f"size on disk: {size:,} bytes")
    return info, "\n".join(lines)


def _describe_model(path: Path, info: dict[str, Any], lines: list[str]) -> tuple[dict[str, Any], str]:
    config = _object(path / "config.json")
    info["model_type"] = config.get("model_type")
    lines.append(f"transformers model: {config.get('model_type')}  architectures {config.get('architectures')}")
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        if f.name.startswith("adapterkit_head"):
            continue
        total += sum(_numel(s) for s in _shapes(f).values())
    info["total_parameters"] = total
    lines.append(f"parameters: {total:,}")
    head_cfg = path / "adapterkit_head.json"
    if head_cfg.is_file():
        h = _object(head_cfg)
        info["head"] = h
        n = sum(_numel(s) for s in _shapes(path / "adapterkit_head.safetensors").values())
        lines.append(f"head: {h['type']}  {h['num_labels']} output(s)  {h['layers']} layer(s)  pooling {h['pooling']}  "
                     f"{n:,} parameters")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    info["size_bytes"] = size
    lines.append(f"size on disk: {size:,} bytes")
    return info, "\n".join(lines)
