"""The model card published with an adapter: ``README.md`` with the Hub's YAML front matter.

The front matter (``library_name: adapterkit``, ``base_model``, ``tags``, ``datasets``,
``metrics``) is what the Hugging Face Hub indexes; the body says what the adapter is (method,
size, base), how it was trained (the ``adapterkit train`` command rebuilt from ``run.json``) and
what it scored (``results.json``), and how to load it.
"""

from __future__ import annotations

import json
from typing import Any

#: run.json config keys that are not flags of adapterkit train
_NOT_FLAGS = ("options", "progress", "full_finetune", "group_by_length", "base_dropout")


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings and lists are valid YAML flow values


def train_command(run: dict[str, Any] | None) -> str | None:
    """``adapterkit train ...`` with the run's settings (``run.json``), or ``None``."""
    if not run or not isinstance(run.get("config"), dict):
        return None
    parts = ["adapterkit train"]
    for key, value in run["config"].items():
        if key in _NOT_FLAGS or value is None or value is False or value == [] or value == {}:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    for key, value in (run["config"].get("options") or {}).items():
        parts.append(f"-o {key}={value}")
    return " ".join(parts)


def render(info: dict[str, Any], location: str, run: dict[str, Any] | None = None,
           results: dict[str, Any] | None = None) -> str:
    """The card's text. ``info``: name, base, method, format, size (the manifest's)."""
    base = info.get("base") or {}
    base_model = base.get("model") or base.get("name")
    data = (run or {}).get("data") or {}
    datasets = sorted({str(v.get("path", v)) if isinstance(v, dict) else str(v) for v in data.values()}) \
        if isinstance(data, dict) else []
    metric = (results or {}).get("metric")
    tags = list(dict.fromkeys(["adapterkit", "adapter", str(info.get("method") or "adapter"),
                               str(info.get("format") or "adapterkit")]))
    lines = ["---", "library_name: adapterkit"]
    if base_model:
        lines.append(f"base_model: {_yaml_value(str(base_model))}")
    lines.append(f"tags: {_yaml_value(tags)}")
    if datasets:
        lines.append(f"datasets: {_yaml_value(datasets)}")
    if metric:
        lines.append(f"metrics: {_yaml_value([metric])}")
    lines += ["---", "", f"# {info.get('name', 'adapter')}", "",
              f"A **{info.get('method', '?')}** adapter ({info.get('format', 'adapterkit')} format, "
              f"{int(info.get('size', 0)) / 1e6:.2f} MB) for the base model `{base_model or 'unknown'}`"
              + (f" (fingerprint `{base['fingerprint']}`)" if base.get("fingerprint") else "") + ".", "",
              "## Use it", "", "```python", "from adapterkit import AdapterModel", "",
              f"model = AdapterModel.from_pretrained({str(base_model or 'BASE_MODEL')!r})",
              f"model.load_adapter({location!r}, set_active=True)", "```", "",
              f"or `adapterkit predict --adapter {location} \"some text\"`.", ""]
    command = train_command(run)
    if command:
        lines += ["## Training", "", "```", command, "```", ""]
    if results:
        lines += ["## Results", "", "| split | metric | value |", "|---|---|---|"]
        for split in ("eval", "test"):
            for key, value in sorted((results.get(split) or {}).items()):
                if isinstance(value, (int, float)):
                    lines.append(f"| {split} | {key} | {value:.4g} |")
        if results.get("steps") is not None:
            lines += ["", f"Trained for {results['steps']} steps ({results.get('train_seconds', '?')} s)."]
        lines.append("")
    return "\n".join(lines)
