"""Module paths of a foreign checkpoint <-> adapterkit place ids, and placements as config options.

A foreign library names an adapted module by its path in the model it wrapped:
``bert.encoder.layer.0.attention.self.query`` (a task model), ``encoder.layer.0...`` (the bare
backbone), ``transformer.h.0.attn.c_attn``, ``model.layers.0.self_attn.q_proj``. adapterkit's
place ids are layout-relative (``layers.0.attention.self.query``, see ``Layout.place_id_for``), so
the block list's path (``StackSpec.layers``) found anywhere in a foreign path fixes the place,
whatever prefix the foreign model had.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from ..errors import CheckpointError
from ..layouts import Layout, StackLayout, linear_features


def single_stack(layout: Layout) -> Optional[StackLayout]:
    """The one stack of blocks of a single-stack model with a built-in layout (the models the
    peers' formats are read and written for here), else ``None`` (the generic path)."""
    if layout.spec is None or len(layout.stacks) != 1:
        return None
    return next(iter(layout.stacks.values()))


def place_of(layout: Layout, path: str, where: str) -> str:
    """The place id of the module at foreign ``path``; ``where`` names the file and key for errors."""
    stack = single_stack(layout)
    if stack is not None:
        m = re.search(rf"(?:^|\.){re.escape(stack.spec.layers)}\.(\d+)\.(.+)$", path)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= layout.num_layers:
                raise CheckpointError(f"{where}: layer {i} does not exist; this {layout.model_type} model has "
                                      f"{layout.num_layers} layers. Load it into the base model it was trained on.")
            return f"layers.{i}.{rest}"
    names = dict(layout.model.named_modules())
    parts = path.split(".")
    for start in range(len(parts)):  # with or without the foreign model's prefix
        candidate = ".".join(parts[start:])
        if candidate in names:
            return layout.place_id_for(candidate)
    raise CheckpointError(f"{where}: module '{path}' does not exist in this {layout.model_type} model; the adapter "
                          "was made for another architecture. Load it into the base model it was trained on.")


def _embeddings_name(layout: Layout) -> Optional[str]:
    """The module name of the model's input token embeddings (LoRA's role / place ``embeddings``)."""
    module = layout.embeddings
    return next((n for n, m in layout.model.named_modules() if m is module), None) if module is not None else None


def module_at(layout: Layout, place_id: str, where: str):
    """The module at an adapterkit place id (``layers.<i>.<path>``, ``embeddings`` or a module name)."""
    if place_id == "embeddings" and layout.embeddings is not None:
        return layout.embeddings
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", place_id)
    try:
        if m and layout.blocks:
            return layout.blocks[int(m.group(1))].get_submodule(m.group(2))
        return layout.model.get_submodule(place_id)
    except AttributeError:
        raise CheckpointError(f"{where}: '{place_id}' does not exist in this {layout.model_type} model; the "
                              "adapter was made for another architecture. Load it into the base model it was "
                              "trained on.") from None


def backbone_prefix(layout: Layout) -> str:
    """``transformers``' ``base_model_prefix`` (``bert``, ``transformer``, ``model``), or ""."""
    return getattr(layout.model, "base_model_prefix", "") or ""


def peer_path(layout: Layout, place_id: str, with_prefix: bool) -> str:
    """The module path a foreign library uses for ``place_id``: relative to the bare backbone,
    or (``with_prefix``) to a task / LM model around it (``bert.``, ``transformer.``, ``model.``)."""
    prefix = backbone_prefix(layout)
    model = layout.model
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", place_id)
    stack = single_stack(layout)
    if m and stack is not None:
        path = f"{stack.path}.{m.group(1)}.{m.group(2)}"
    elif place_id == "embeddings" and _embeddings_name(layout) is not None:
        path = _embeddings_name(layout)
    else:
        path = place_id
    wrapped = bool(prefix) and hasattr(model, prefix) and getattr(model, prefix) is not model
    if wrapped and path.startswith(prefix + "."):
        path = path[len(prefix) + 1:]  # now relative to the bare backbone
    return f"{prefix}.{path}" if with_prefix and prefix else path


def _split(place_ids: list[str]) -> Optional[tuple[list[int], list[str]]]:
    """``(layers, in-block paths)`` when every id is ``layers.<i>.<path>``."""
    pairs = [re.fullmatch(r"layers\.(\d+)\.(.+)", p) for p in place_ids]
    if not all(pairs):
        return None
    layers = sorted({int(m.group(1)) for m in pairs})
    rests = list(dict.fromkeys(m.group(2) for m in pairs))
    return layers, rests


def placement(layout: Layout, place_ids: list[str], where: str) -> dict[str, Any]:
    """Config options (``roles`` or ``target_modules``, and ``layers``) that select exactly
    ``place_ids`` in this layout; a ``CheckpointError`` when no such options exist."""
    split = _split(place_ids)
    stack = single_stack(layout)
    if split is None or stack is None:  # the generic path: the modules by their full names
        names = [n for n, mod in layout.model.named_modules() if layout.place_id_for(n) in set(place_ids)]
        return {"target_modules": "|".join(re.escape(n) for n in names)}
    layers, rests = split
    if len(place_ids) != len(layers) * len(rests):
        raise CheckpointError(f"{where}: the adapted modules differ from layer to layer ({place_ids[:6]} ...); "
                              "adapterkit places one set of modules in every chosen layer.")
    options: dict[str, Any] = {"layers": None if layers == list(range(layout.num_layers)) else layers}
    roles = {path: role for role, path in stack.spec.linears.items()}
    if all(r in roles for r in rests):
        options["roles"] = [roles[r] for r in rests]
    else:
        alts = "|".join(re.escape(r) for r in rests)
        options["target_modules"] = rf"(?:.*\.)?{re.escape(stack.spec.layers)}\.\d+\.(?:{alts})"
    return options


def place_regex(chosen: list[str], among: list[str]) -> str:
    """A regex that fully matches the place ids ``chosen`` and no other of ``among``: by in-block
    path (``layers.<any index>.<path>``) where that is exact, else id by id."""
    split = _split(chosen)
    if split is not None:
        pattern = r"layers\.\d+\.(?:" + "|".join(re.escape(r) for r in split[1]) + ")"
        if [p for p in among if re.fullmatch(pattern, p)] == [p for p in among if p in set(chosen)]:
            return pattern
    return "|".join(re.escape(p) for p in chosen)


def per_site(values: dict[str, Any], default: Any, among: list[str]) -> Optional[dict[str, Any]]:
    """A PEFT-style ``{pattern: value}`` (``rank_pattern`` / ``alpha_pattern``) giving each place
    of ``among`` its value in ``values`` (``default`` where missing); ``None`` if all are default."""
    groups: dict[Any, list[str]] = {}
    for place in among:
        value = values.get(place, default)
        if value != default:
            groups.setdefault(value, []).append(place)
    return {place_regex(places, among): value for value, places in groups.items()} or None


def is_conv1d(module) -> bool:
    feats = linear_features(module)
    return bool(feats and feats[2])
