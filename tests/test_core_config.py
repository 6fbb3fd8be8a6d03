"""Configs and the registry: JSON round trips, immutability, presets, and coverage of the suite.

The last tests keep the shared suite honest: every registered method and every architecture
family of the layout table must appear in ``helpers.CASES``, so adding one without a test case
fails here.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from adapterkit import (
    AdapterError,
    HeadConfig,
    available_methods,
    available_presets,
    config_from_dict,
    resolve_config,
)
from adapterkit.layouts import ARCHITECTURES
from helpers import ARCHS, CASES


@pytest.mark.parametrize("preset", available_presets())
def test_presets_round_trip_through_json(preset):
    cfg = resolve_config(preset)
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and type(again) is type(cfg)


@pytest.mark.parametrize("case", CASES[:: max(1, len(CASES) // 12)], ids=lambda c: c.id)
def test_case_configs_round_trip(case):
    cfg = case.config
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_configs_are_immutable_and_replace_makes_a_copy():
    cfg = resolve_config("lora", r=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 8  # type: ignore[misc]
    assert cfg.replace(r=8).r == 8 and cfg.r == 4
    with pytest.raises(AdapterError, match="Did you mean 'alpha'"):
        cfg.replace(alfa=2.0)


def test_lists_become_tuples_so_configs_hash():
    cfg = resolve_config("lora", roles=["q", "v"], layers=[0, 1])
    assert cfg.roles == ("q", "v") and cfg.layers == (0, 1)
    assert hash(cfg) == hash(resolve_config("lora", roles=("q", "v"), layers=(0, 1)))


def test_named_presets_are_the_documented_configs():
    pfeiffer, houlsby, parallel = (resolve_config(p) for p in ("pfeiffer", "houlsby", "parallel"))
    assert (pfeiffer.mh_adapter, pfeiffer.output_adapter) == (False, True)
    assert (houlsby.mh_adapter, houlsby.output_adapter) == (True, True)
    assert parallel.is_parallel and parallel.scaling == 4.0
    assert resolve_config("seq_bn") == pfeiffer and resolve_config("double_seq_bn") == houlsby
    assert resolve_config("PFEIFFER") == pfeiffer


def test_head_config_round_trips():
    head = HeadConfig("classification", 3, id2label={0: "neg", 1: "neu", 2: "pos"})
    again = HeadConfig.from_dict(json.loads(json.dumps(head.to_dict())))
    assert again == head and again.id2label[2] == "pos"


def test_every_registered_method_has_cases():
    covered = {case.config.method for case in CASES}
    library = {m for m in available_methods() if not m.startswith("test_")}  # test_*: registered by tests
    missing = library - covered
    assert not missing, f"add {sorted(missing)} to METHODS in tests/helpers.py"


def test_every_layout_family_has_an_architecture_in_the_cases():
    in_cases = {arch.config().model_type for arch in ARCHS.values()}
    missing = [spec.model_types for spec in ARCHITECTURES if not in_cases & set(spec.model_types)]
    assert not missing, f"add a tiny model for {missing} to ARCHS in tests/helpers.py"
