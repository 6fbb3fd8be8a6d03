"""AdapterHub ``ConfigUnion`` (``architecture: union``, e.g. ``UniPELTConfig``) <-> adapterkit's union.

AdapterHub saves a union as ``{"architecture": "union", "configs": [...]}``, one full config per
part, and all the parts' tensors in one file under their own methods' names: LoRA's
``.loras.<name>.``, a bottleneck's ``.adapters.<name>.``, prefix tuning's ``prefix_tuning``. Each
part is read and written by its method's own reader / writer (``adapterhub.py``,
``adapterhub_prefix.py``) on its share of the tensors; the result is ``ConfigUnion(parts=...)``
(the preset ``unipelt`` when the parts are UniPELT's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import AdapterError, CheckpointError
from ..methods.union import ConfigUnion

READ = {"architecture", "configs"}


def _owner(key: str, name: str) -> str:
    """Which of the union's part kinds a tensor key belongs to."""
    if f".loras.{name}." in key:
        return "lora"
    if "prefix_tuning." in key:
        return "prefix_tuning"
    if f"adapters.{name}." in key:
        return "bottleneck"
    return "?"


def read(ah: dict, tensors: dict, name: str, model, weights_file: Path, *, kind_of: Callable, read_part: Callable):
    """``kind_of(part config, file)``: a part's method; ``read_part``: ``adapterhub.from_adapterhub``."""
    config_file = weights_file.parent / "adapter_config.json"
    parts = ah.get("configs")
    if not isinstance(parts, list) or len(parts) < 2:
        raise CheckpointError(f"'{config_file}': a union's 'configs' must list two configs or more.")
    kinds = [kind_of(part, config_file) for part in parts]
    if len(set(kinds)) != len(kinds) or not set(kinds) <= {"lora", "bottleneck", "prefix_tuning"}:
        raise CheckpointError(f"'{config_file}': adapterkit reads AdapterHub unions of one LoRA, one bottleneck and "
                              f"one prefix tuning part at most (UniPELT), not {kinds}.")
    shares: dict[str, dict] = {kind: {} for kind in kinds}
    for key, value in tensors.items():
        owner = _owner(key, name)
        if owner not in shares:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' for this union of {kinds}; the file was "
                                  "edited or belongs to another adapter.")
        shares[owner][key] = value
    configs, sites, origins = [], {}, {}
    for part, kind in zip(parts, kinds):
        config, part_sites, part_origins = read_part(part, shares[kind], name, model, weights_file)
        configs.append(config)
        sites.update(part_sites)
        origins.update(part_origins)
    try:
        return ConfigUnion(parts=tuple(configs)), sites, origins
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None


def write(config: ConfigUnion, sites: dict, name: str, layout, *, writers: dict) -> tuple[dict[str, Any], dict]:
    placed = config.placed_sites(layout)  # records which part owns each place
    owners = {site.place_id: config._owners[site.key] for site in placed}
    configs, out = [], {}
    for i, part in enumerate(config.parts):
        if part.method not in writers:
            raise AdapterError(f"adapterkit does not write {part.method} in AdapterHub's format, so not this union; "
                               "nothing was written. Save it with format='adapterkit'.")
        part_config, part_out = writers[part.method](part, {p: v for p, v in sites.items() if owners.get(p) == i},
                                                     name, layout)
        configs.append(part_config)
        out.update(part_out)
    return {"architecture": "union", "configs": configs}, out
