"""PEFT VeRA (``peft_type: VERA``) <-> adapterkit's ``vera`` (``methods/vera.py``).

PEFT saves per adapted module ``base_model.model.<path>.vera_lambda_d`` (r,) and
``.vera_lambda_b`` (out,), and, with ``save_projection`` (its default), the shared matrices once:
``base_model.vera_A`` (r, in_max) and ``base_model.vera_B`` (out_max, r). adapterkit draws those
from ``projection_prng_key`` exactly as PEFT does, so reading checks the saved ones against the
draw (a file whose matrices were not drawn from its key is refused: adapterkit keeps the key, not
the matrices) and writing saves them again, so PEFT loads the folder with either setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, CheckpointError
from ..layouts import linear_features
from ..methods.vera import VeRAConfig, draw_projections
from .meta import checkpoint, refuse_options
from .peft_targets import VERA_R, refuse_undeclared
from .places import place_of, placement

SHARED = ("base_model.vera_A", "base_model.vera_B")
PARAMS = ("vera_lambda_d", "vera_lambda_b")
#: PEFT VeraConfig keys read here (the rest are PEFT's bookkeeping, checked by the caller's table)
READ = {"peft_type", "task_type", "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
        "target_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "init_weights"}


def read(cfg: dict, tensors: dict[str, torch.Tensor], model, weights_file: Path, name: str, prefix: str,
         neutral: tuple, bookkeeping: set, head=None, head_state=None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapterkit's in-memory checkpoint of a PEFT VeRA folder (its head, if any, already read by
    ``peft.py`` from ``modules_to_save``)."""
    config_file = weights_file.parent / "adapter_config.json"
    for key, value in cfg.items():
        if key not in READ | bookkeeping and value not in neutral:
            raise CheckpointError(f"'{config_file}': option '{key}' = {value!r} has no adapterkit counterpart; "
                                  "only VeRA adapters without it can be loaded.")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"'{config_file}': option 'bias' = {cfg['bias']!r} trains the base model's biases; "
                              "only bias='none' can be loaded.")
    sites: dict[str, dict[str, torch.Tensor]] = {}
    origins: dict[str, str] = {}
    found: list[tuple[str, str, str, torch.Tensor]] = []  # (key, module path, parameter, tensor)
    declared: dict[str, dict[str, Any]] = {}  # module -> what peft_targets checks against the config
    for key, value in tensors.items():
        if key in SHARED:  # the shared matrices belong to no module
            continue
        m = re.fullmatch(rf"{re.escape(prefix)}(.+)\.({'|'.join(PARAMS)})", key)
        if not m:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' in a PEFT VeRA adapter; the file was "
                                  "edited or is not this adapter's.")
        found.append((key, m.group(1), m.group(2), value))
        site = declared.setdefault(m.group(1), {})
        if m.group(2) == "vera_lambda_d":  # (r,)
            site["rank"] = value.shape[0]
    refuse_undeclared(cfg, declared, config_file, weights_file)  # modules and r as PEFT decides them
    for key, path, param, value in found:
        place = place_of(model.layout, path, f"'{weights_file}', key '{key}'")
        sites.setdefault(place, {})[param] = value
        origins[place] = prefix + path
    if not sites:
        raise CheckpointError(f"'{weights_file}': no VeRA weights in it; the file is incomplete.")
    options = placement(model.layout, list(sites), f"'{weights_file}'")
    r = int(cfg.get("r", VERA_R))  # every vera_lambda_d is (r,): refuse_undeclared checked them
    try:
        config = VeRAConfig(r=r, projection_prng_key=int(cfg.get("projection_prng_key", 0)),
                            d_initial=float(cfg.get("d_initial", 0.1)), dropout=float(cfg.get("vera_dropout") or 0.0),
                            **options)
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None
    _check_projections(config, tensors, model, weights_file)
    return checkpoint(model, name, config, sites, head, head_state or {}, f"'{weights_file}'", origins=origins)


def _check_projections(config: VeRAConfig, tensors: dict, model, weights_file: Path) -> None:
    saved = [tensors.get(k) for k in SHARED]
    if all(t is None for t in saved):
        return  # save_projection=False: PEFT draws them from the key too
    sites = config.sites(model.layout)
    drawn = draw_projections(config.projection_prng_key, config.r, max(s.in_features for s in sites),
                             max(s.out_features for s in sites))
    for key, mine, theirs in zip(SHARED, drawn, saved):
        if theirs is None or tuple(theirs.shape) != tuple(mine.shape) or not torch.equal(theirs.float(), mine):
            raise CheckpointError(f"'{weights_file}': '{key}' is not the matrix drawn from projection_prng_key="
                                  f"{config.projection_prng_key} for these layers; adapterkit keeps VeRA's key, not its "
                                  "matrices, so only adapters with PEFT's own draw can be loaded.")


def write(config: VeRAConfig, sites: dict, paths: dict, hosts: dict, prefix: str) -> tuple[dict, dict]:
    """PEFT's config and tensors for a VeRA adapter at ``sites`` (``hosts``: their modules)."""
    refuse_options(config, {"r", "projection_prng_key", "d_initial", "dropout", "roles", "target_modules", "layers",
                            "leave_out"}, "PEFT")
    feats = [linear_features(h) for h in hosts.values()]
    a, b = draw_projections(config.projection_prng_key, config.r, max(f[0] for f in feats), max(f[1] for f in feats))
    out = {SHARED[0]: a.contiguous(), SHARED[1]: b.contiguous()}
    for place, params in sites.items():
        for param, value in params.items():
            out[f"{prefix}{paths[place]}.{param}"] = value
    return {"peft_type": "VERA", "r": config.r, "projection_prng_key": config.projection_prng_key,
            "save_projection": True, "vera_dropout": config.dropout, "d_initial": config.d_initial,
            "init_weights": True}, out
