"""Checkpoint files on disk: permissions follow the umask, saves write through symlinks."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from adapterkit import AdapterModel


def _model() -> AdapterModel:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=100)
    model = AdapterModel(transformers.BertModel(cfg).eval())
    model.add_adapter("a", "lora")
    with torch.no_grad():
        for p in model.adapters["a"].parameters():
            p.normal_()
    return model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("fmt", ["adapterkit", "peft", "adapterhub"])
def test_saved_files_follow_the_umask(tmp_path, umask_022, fmt):
    model = _model()
    model.save_adapter(tmp_path / "out", "a", format=fmt)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("fmt", ["adapterkit", "peft", "adapterhub"])
def test_save_into_a_symlink_writes_through_to_its_target(tmp_path, fmt):
    model = _model()
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    model.save_adapter(link, "a", format=fmt)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-* left behind
    assert (real / "adapter_config.json").is_file()
    model.save_adapter(link, "a", format=fmt)  # again, over the saved one
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    model.load_adapter(link, load_as="b")
    for key, value in model.adapters["a"].state_dict().items():
        torch.testing.assert_close(model.adapters["b"].state_dict()[key], value, rtol=0, atol=0)


def test_folders_written_atomically_follow_the_umask(tmp_path, umask_022):
    """Run checkpoints, merged models and heads go through ``write_dir_atomic``."""
    from safetensors.torch import save_file

    from adapterkit.train.checkpoint import write_dir_atomic

    def fill(tmp):
        (tmp / "sub").mkdir()
        save_file({"w": torch.ones(2)}, str(tmp / "sub" / "best.safetensors"))
        save_file({"w": torch.ones(2)}, str(tmp / "adapterkit_head.safetensors"))

    out = write_dir_atomic(tmp_path / "run", fill)
    modes = {str(f.relative_to(out)): f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()}
    assert modes == {"sub/best.safetensors": 0o644, "adapterkit_head.safetensors": 0o644}
