"""AdapterHub Compacter (a bottleneck with ``phm_layer: true``) -> adapterkit's ``compacter``.

AdapterHub saves the bottleneck's keys with PHM layers in place of its Linears
(``adapter_down.0.W_left`` / ``W_right`` / ``b``, ``adapter_up.W_left`` / ...) and the adapter's one
rule once, as ``<prefix>shared_parameters.<name>.phm_rule`` (n, n, n). The bottleneck reader maps
the per-layer keys (``adapterhub._bottleneck_param``); this file takes the rule out first and gives
every PHM layer its copy. AdapterHub's other PHM variants (a rule per layer, a factorised rule, a
shared or unfactorised ``W``, no bias) have no counterpart and are refused.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from ..errors import AdapterError, CheckpointError
from ..methods.bottleneck import BottleneckConfig
from ..methods.compacter import CompacterConfig

#: AdapterHub's PHM options and the value adapterkit's Compacter has
REQUIRED = {"phm_layer": True, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
            "factorized_phm_rule": False, "phm_bias": True}


def read(ah: dict, tensors: dict, name: str, model, weights_file: Path, *, bottleneck: Callable):
    config_file = weights_file.parent / "adapter_config.json"
    for key, value in REQUIRED.items():
        if ah.get(key, value) != value:
            raise CheckpointError(f"'{config_file}': Compacter option '{key}' = {ah[key]!r} has no adapterkit "
                                  f"counterpart (it needs {key}={value}); only adapters without it can be loaded.")
    rules = [k for k in tensors if re.fullmatch(rf"(?:.*\.)?shared_parameters\.{re.escape(name)}\.phm_rule", k)]
    if len(rules) != 1:
        raise CheckpointError(f"'{weights_file}': a Compacter adapter needs its shared phm_rule "
                              f"('shared_parameters.{name}.phm_rule') once; found {len(rules)}.")
    rule = tensors[rules[0]]
    rest = {k: v for k, v in tensors.items() if k != rules[0]}
    config, sites, origins = bottleneck({**ah, "phm_layer": False}, rest, name, model, weights_file)
    n = int(ah.get("phm_dim", 4))
    if tuple(rule.shape) != (n, n, n):
        raise CheckpointError(f"'{weights_file}': '{rules[0]}' has shape {tuple(rule.shape)}, but phm_dim={n} "
                              f"needs ({n}, {n}, {n}); the file was edited.")
    try:
        compacter = CompacterConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                                    phm_dim=n, phm_rank=int(ah.get("phm_rank", 1)),
                                    phm_init_range=float(ah.get("phm_init_range", 1e-4)))
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None
    for params in sites.values():
        params["down.phm_rule"], params["up.phm_rule"] = rule, rule
    return compacter, sites, origins


def write(config: CompacterConfig, sites: dict, name: str, layout, *, bottleneck: Callable):
    """AdapterHub's config and tensors: the bottleneck writer's, the rule once as
    ``shared_parameters.<name>.phm_rule``, and the PHM options."""
    rules = [params[k] for params in sites.values() for k in ("down.phm_rule", "up.phm_rule") if k in params]
    if not rules or any(not r.equal(rules[0]) for r in rules):
        raise AdapterError("This Compacter adapter's layers do not share one phm_rule; AdapterHub keeps one per "
                           "adapter. Nothing was written: save it with format='adapterkit'.")
    plain = {place: {k: v for k, v in params.items() if not k.endswith("phm_rule")} for place, params in sites.items()}
    as_bottleneck = BottleneckConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(BottleneckConfig)})
    ah, out = bottleneck(as_bottleneck, plain, name, layout)
    out[f"shared_parameters.{name}.phm_rule"] = rules[0].contiguous()
    ah.update(REQUIRED, phm_dim=config.phm_dim, phm_rank=config.phm_rank, phm_init_range=config.phm_init_range,
              learn_phm=True, phm_c_init="normal", hypercomplex_nonlinearity="glorot-uniform")
    return ah, out
