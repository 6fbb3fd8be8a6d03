"""Checkpoints: safetensors + JSON, a faithful round trip, and atomic writes.

* save -> load into a fresh model (same base weights) gives identical outputs, head included;
* the folder holds exactly ``adapter_config.json`` and ``adapter_model.safetensors`` (no pickle);
* a save interrupted at any step (tensor write, config write, the final rename) leaves the
  previous checkpoint intact and loadable and no temporary folder behind;
* saving never deletes files it did not write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit.checkpoint_format as ckpt_io
from adapterkit import AdapterModel, CheckpointError
from helpers import CASE_IDS, CASES, make_base, make_model, perturb, run

cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)


def trained(case, seed: int = 7) -> AdapterModel:
    model = make_model(case, head=True)
    perturb(model.adapters, scale=0.1, seed=seed)
    perturb(model.heads, scale=0.1, seed=seed + 1)
    return model


def siblings(path: Path) -> list[str]:
    """Entries beside ``path`` other than the checkpoint itself (temporary folders, leftovers)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@cases
def test_save_then_load_into_a_fresh_model_is_identical(case, batch, tmp_path):
    source = trained(case)
    source.save_adapter(tmp_path / "a", "a")
    target = AdapterModel(make_base(case.arch))  # a new instance of the same base weights
    assert target.load_adapter(tmp_path / "a", set_active=True) == "a"
    assert target.active_head == "a"
    assert torch.equal(run(target.eval(), batch), run(source, batch))
    assert target.records["a"].config == source.records["a"].config.as_saved()  # prefix tuning: folded, flat
    assert target.heads["a"].config == source.heads["a"].config


@cases
def test_load_without_head_and_under_another_name(case, batch, tmp_path):
    source = trained(case)
    source.save_adapter(tmp_path / "a", "a")
    target = AdapterModel(make_base(case.arch))
    assert target.load_adapter(tmp_path / "a", load_as="b", with_head=False, set_active=True) == "b"
    assert list(target.heads) == [] and list(target.adapters) == ["b"]
    source.active_head = None
    assert torch.equal(run(target.eval(), batch), run(source, batch))


def test_checkpoint_is_safetensors_and_json(tmp_path):
    model = trained(CASES[0])
    model.save_adapter(tmp_path / "a", "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["config"] == model.records["a"].config.to_dict()
    assert meta["base_model"]["hidden_size"] == 32 and meta["base_model"]["num_layers"] == 4
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    expected = {f"adapter.{k}" for k in model.adapters["a"].state_dict()} | {f"head.{k}" for k in model.heads["a"].state_dict()}
    assert set(tensors) == expected
    assert siblings(tmp_path / "a") == []


def test_save_all_adapters_then_load_each(batch, tmp_path):
    model = trained(CASES[0])
    model.add_adapter("b", "lora", r=2)
    perturb(model.adapters["b"])
    model.save_all_adapters(tmp_path)
    fresh = AdapterModel(make_base(CASES[0].arch))
    for name in ("a", "b"):
        fresh.load_adapter(tmp_path / name)
    for setup in ("a", "b"):
        model.set_active_adapters(setup)
        fresh.set_active_adapters(setup)
        assert torch.equal(run(fresh.eval(), batch), run(model, batch))


def test_saving_again_replaces_the_checkpoint(batch, tmp_path):
    model = trained(CASES[0])
    model.save_adapter(tmp_path / "a", "a")
    perturb(model.adapters["a"], seed=99)
    model.save_adapter(tmp_path / "a", "a")
    fresh = AdapterModel(make_base(CASES[0].arch))
    fresh.load_adapter(tmp_path / "a", set_active=True)
    assert torch.equal(run(fresh.eval(), batch), run(model, batch))
    assert siblings(tmp_path / "a") == []


# -- interrupted saves -------------------------------------------------------------------------
def _fail_tensor_write(monkeypatch):
    real = ckpt_io.save_file

    def half_then_crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", half_then_crash)


def _fail_config_write(monkeypatch):
    def partial_json(obj, f, **kwargs):
        f.write('{"format_version": 1, "conf')
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_io.json, "dump", partial_json)


def _fail_final_rename(monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if ".tmp-" in Path(src).name:  # moving the finished new checkpoint into place
            raise OSError("Input/output error")
        return real(src, dst)

    monkeypatch.setattr(ckpt_io.os, "replace", replace)


INTERRUPTIONS = [_fail_tensor_write, _fail_config_write, _fail_final_rename]


@pytest.mark.parametrize("interrupt", INTERRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_interrupted_save_keeps_the_previous_checkpoint(interrupt, batch, tmp_path, monkeypatch):
    model = trained(CASES[0])
    model.save_adapter(tmp_path / "a", "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    saved_output = run(model, batch)
    perturb(model.adapters["a"], seed=99)
    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(OSError):
            model.save_adapter(tmp_path / "a", "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert siblings(tmp_path / "a") == [], "a temporary folder was left behind"
    fresh = AdapterModel(make_base(CASES[0].arch))
    fresh.load_adapter(tmp_path / "a", set_active=True)
    assert torch.equal(run(fresh.eval(), batch), saved_output)


@pytest.mark.parametrize("interrupt", INTERRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_interrupted_first_save_leaves_nothing(interrupt, tmp_path, monkeypatch):
    model = trained(CASES[0])
    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(OSError):
            model.save_adapter(tmp_path / "a", "a")
    assert list(tmp_path.iterdir()) == []


def test_saving_into_a_folder_with_other_files_deletes_nothing(tmp_path):
    model = trained(CASES[0])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes.txt"):
        model.save_adapter(tmp_path / "run", "a")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    model.save_adapter(tmp_path / "run" / "a", "a")  # a subfolder is the way
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
