"""Which modules a PEFT config declares, decided as PEFT decides it.

PEFT builds its LoRA / IA3 layers only on the modules its config targets (``target_modules``:
a regex matched against the whole module name, or names matched as the name or its last
components; ``layers_to_transform`` / ``layers_pattern`` narrowing a list; ``exclude_modules``
and ``modules_to_save`` taking modules out) and gives each the rank of ``rank_pattern`` or ``r``;
weights in the file for any other module, or of another rank, are never applied (PEFT skips or
refuses them). adapterkit reads the sites from the tensors, so a config that lies about its
targets would make it apply weights PEFT would not: ``undeclared`` names every such weight, and
the reader refuses the folder (mirrors ``peft.tuners.tuners_utils.check_target_module_exists``,
``peft.utils.other.get_pattern_key`` and IA3's ``_check_target_module_feedforward``).

The same holds for the methods built on them: DoRA's ``lora_magnitude_vector`` (out,) belongs to a
targeted LoRA module and exists only under ``use_dora: true`` (without it PEFT makes no magnitude
and skips the vectors); VeRA (``peft_type: VERA``) targets modules with the same rules, has one
``r`` for every module (default 256, no ``rank_pattern``; ``vera_lambda_d`` is (r,)), and its shared
``base_model.vera_A`` / ``vera_B`` belong to no module (``peft_vera.py`` checks them against the draw).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from ..errors import CheckpointError
from ..methods.lora import pattern_value

ALL_LINEAR = "all-linear"  # PEFT's shorthand, expanded to every Linear but the output layer


def targeted(cfg: dict[str, Any], key: str) -> bool:
    """Whether PEFT puts an adapter layer on the module named ``key`` under config ``cfg``."""
    if _matches(cfg.get("exclude_modules"), key):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.get("modules_to_save") or []):
        return False
    targets = cfg.get("target_modules")
    if targets is None or targets == ALL_LINEAR:  # PEFT's per-architecture default, or every Linear
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _in_layers(cfg, key)


def _matches(names: Any, key: str) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _in_layers(cfg: dict[str, Any], key: str) -> bool:
    """``layers_to_transform`` (with ``layers_pattern``): the first numbered component counts."""
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = cfg.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


VERA_R = 256  # VeraConfig's default r (LoraConfig's is 8)


def declared_rank(cfg: dict[str, Any], key: str) -> int:
    """The rank PEFT gives the LoRA layer on ``key``: ``rank_pattern``'s, else ``r``; VeRA's ``r``."""
    if cfg.get("peft_type") == "VERA":  # VeraConfig has no rank_pattern
        return int(cfg.get("r", VERA_R))
    return int(pattern_value(cfg.get("rank_pattern"), key, int(cfg.get("r", 8))))


def is_feedforward(cfg: dict[str, Any], key: str) -> bool:
    """IA3: whether PEFT scales ``key``'s input (``feedforward_modules``) rather than its output."""
    modules = cfg.get("feedforward_modules") or []
    if isinstance(modules, str):
        return re.fullmatch(modules, key) is not None
    return any(key.endswith(m) for m in modules)


def undeclared(cfg: dict[str, Any], sites: dict[str, dict[str, Any]]) -> Optional[str]:
    """What the config does not declare about ``sites`` (module name -> ``{"rank": r}`` for LoRA and
    VeRA, ``{"magnitude": True}`` too for a DoRA magnitude vector, ``{"input": bool}`` for IA3), as
    one phrase naming the weights; None when all agree."""
    problems = []
    outside = [k for k in sites if not targeted(cfg, k)]
    if outside:
        problems.append(f"weights for {_names(outside)}, which its target_modules {cfg.get('target_modules')!r}"
                        + (f" (layers_to_transform {cfg['layers_to_transform']!r})" if cfg.get("layers_to_transform")
                           is not None else "") + " do not name")
    ranks = {k: s["rank"] for k, s in sites.items() if "rank" in s and k not in outside}
    wrong = {k: r for k, r in ranks.items() if r != declared_rank(cfg, k)}
    if wrong:
        k, r = next(iter(wrong.items()))
        problems.append(f"weights of rank {r} for {_names(list(wrong))}, where its "
                        f"{'r says' if cfg.get('peft_type') == 'VERA' else 'r / rank_pattern say'} "
                        f"{declared_rank(cfg, k)}")
    magnitudes = [k for k, s in sites.items() if s.get("magnitude") and k not in outside]
    if magnitudes and not cfg.get("use_dora"):
        problems.append(f"DoRA magnitude vectors (lora_magnitude_vector) for {_names(magnitudes)}, which PEFT makes "
                        "only with use_dora=true; its use_dora is " + json.dumps(cfg.get("use_dora", False)))
    flips = [k for k, s in sites.items() if "input" in s and k not in outside and s["input"] != is_feedforward(cfg, k)]
    if flips:
        problems.append(f"IA3 vectors for {_names(flips)} whose shapes scale the "
                        f"{'input' if sites[flips[0]]['input'] else 'output'}, unlike its feedforward_modules")
    return "; ".join(problems) or None


def refuse_undeclared(cfg: dict[str, Any], sites: dict[str, dict[str, Any]], config_file: Path,
                      weights_file: Path) -> None:
    """Raise ``CheckpointError`` naming what ``undeclared`` finds: PEFT itself would not apply
    those weights, so adapterkit's outputs would differ from PEFT's for the same folder."""
    problem = undeclared(cfg, sites)
    if problem:
        raise CheckpointError(f"'{weights_file}' holds {problem} in '{config_file}'; PEFT would not apply them, so "
                              "the file and its config disagree. Fix the config (or the weights) so they describe "
                              "the same modules, or load the folder it was saved with.")


def _names(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in sorted(keys)[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


__all__ = ["targeted", "declared_rank", "is_feedforward", "undeclared", "refuse_undeclared", "ALL_LINEAR", "VERA_R"]
