"""Bad input: every call below raises an ``AdapterError`` whose message names the problem (and the
way out), and leaves the model exactly as it was before the call: the same adapters, configs,
heads, active setup and head, trainable flags, hooks on every module, state (base, adapters and
heads, bit for bit) and outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapterkit import AdapterError, AdapterModel, CheckpointError, Stack
from helpers import ARCHS, Snapshot, make_base, make_batch, perturb

ARCH_NAMES = ["bert", "gpt2"]  # an encoder with nn.Linear, a decoder with transformers' Conv1D
OTHER_TYPE = {"bert": "roberta", "gpt2": "llama"}


def base_with(arch_name: str, seed: int = 0, **changes) -> torch.nn.Module:
    """The tiny model of ``arch_name`` with some config fields changed."""
    arch = ARCHS[arch_name]
    cfg = arch.config()
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return arch.auto.from_config(cfg).eval()


def saved(directory: Path, base: torch.nn.Module, method: str = "pfeiffer", **options) -> Path:
    model = AdapterModel(base)
    model.add_adapter("c", method, **options)
    model.add_classification_head("c", num_labels=2)
    perturb(model.adapters)
    model.save_adapter(directory, "c")
    return directory


@pytest.fixture(scope="module", params=ARCH_NAMES)
def arch_name(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt(arch_name, tmp_path_factory) -> dict[str, Path]:
    """A good checkpoint, damaged copies of it, and checkpoints made for other base models."""
    root = tmp_path_factory.mktemp(f"ckpt-{arch_name}")
    good = saved(root / "good", base_with(arch_name))
    out = {"good": good}

    def damaged(name: str, edit) -> None:
        shutil.copytree(good, root / name)
        edit(root / name)
        out[name] = root / name

    damaged("corrupt_json", lambda d: (d / "adapter_config.json").write_text('{"config": {"method": "bottle'))
    damaged("not_adapter_json", lambda d: (d / "adapter_config.json").write_text('{"hello": 1}'))
    damaged("bad_config_values", lambda d: _edit_json(d, lambda m: m["config"].update(reduction_factor=-2)))
    damaged("unknown_method", lambda d: _edit_json(d, lambda m: m["config"].update(method="botleneck")))
    damaged("truncated_weights", lambda d: _truncate(d / "adapter_model.safetensors"))
    damaged("missing_weights", lambda d: (d / "adapter_model.safetensors").unlink())
    damaged("missing_config", lambda d: (d / "adapter_config.json").unlink())
    damaged("config_not_object", lambda d: _edit_json(d, lambda m: m.update(config="pfeiffer")))
    damaged("no_places", lambda d: _edit_json(d, lambda m: m.pop("places")))
    damaged("edited_config", lambda d: _edit_json(d, lambda m: m["config"].update(reduction_factor=8)))
    out["missing_folder"] = root / "does-not-exist"
    out["other_hidden"] = saved(root / "other_hidden", base_with(arch_name, hidden_size=48))
    out["other_layers"] = saved(root / "other_layers", base_with(arch_name, num_hidden_layers=2))
    out["other_type"] = saved(root / "other_type", make_base(ARCHS[OTHER_TYPE[arch_name]]))
    out["other_ffn"] = saved(root / "other_ffn", base_with(arch_name, **{_ffn_key(arch_name): 40}), "lora", r=2,
                             roles=["ffn_in"])
    return out


def _ffn_key(arch_name: str) -> str:
    return "n_inner" if arch_name == "gpt2" else "intermediate_size"


def _edit_json(directory: Path, edit) -> None:
    meta = json.loads((directory / "adapter_config.json").read_text())
    edit(meta)
    (directory / "adapter_config.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.fixture
def model(arch_name) -> AdapterModel:
    """Two trained adapters (one merged), a head, an active setup: lots of state to disturb."""
    model = AdapterModel(base_with(arch_name))
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("l", "lora", r=2)
    model.add_adapter("m", "ia3")
    model.add_classification_head("a", num_labels=2)
    perturb(model.adapters, scale=0.1)
    model.merge_adapter("m")
    model.train_adapter(Stack("a", "l"))
    return model.eval()


BAD_CALLS = {
    # unknown names and options, with a suggestion
    "unknown-method": (lambda m, c: m.add_adapter("b", "loar"), r"Unknown method or preset 'loar'. Did you mean 'lora'"),
    "unknown-option": (lambda m, c: m.add_adapter("b", "lora", alpah=4), r"Unknown option 'alpah'.*Did you mean 'alpha'"),
    "unknown-option-in-dict": (lambda m, c: m.add_adapter("b", {"method": "bottleneck", "reduction_factr": 4}),
                               r"Did you mean 'reduction_factor'"),
    "wrong-option-type": (lambda m, c: m.add_adapter("b", "pfeiffer", reduction_factor="x"), r"reduction_factor"),
    "unknown-role": (lambda m, c: m.add_adapter("b", "lora", roles=["query"]), r"no linear role \['query'\]"),
    "unknown-head-pooling": (lambda m, c: m.add_classification_head("h", pooling="max"), r"pooling must be one of"),
    # names taken or missing
    "adapter-name-taken": (lambda m, c: m.add_adapter("a", "lora"), r"'a' already exists.*overwrite=True"),
    "invalid-name": (lambda m, c: m.add_adapter("my adapter", "lora"), r"Invalid adapter name"),
    "head-name-taken": (lambda m, c: m.add_classification_head("a"), r"head named 'a' already exists"),
    "train-missing": (lambda m, c: m.train_adapter("nope"), r"No adapter named \['nope'\].*add_adapter"),
    "activate-missing": (lambda m, c: m.set_active_adapters(Stack("a", "nope")), r"No adapter named \['nope'\]"),
    "delete-missing": (lambda m, c: m.delete_adapter("nope"), r"No adapter named \['nope'\]"),
    "merge-missing": (lambda m, c: m.merge_adapter("nope"), r"No adapter named \['nope'\]"),
    "save-missing": (lambda m, c: m.save_adapter(c["good"].parent / "never", "nope"), r"No adapter named"),
    "head-missing": (lambda m, c: m(**make_batch(), head="nope"), r"No head named 'nope'"),
    "delete-head-missing": (lambda m, c: m.delete_head("nope"), r"No head named 'nope'"),
    # sizes that do not fit
    "lora-rank-too-large": (lambda m, c: m.add_adapter("b", "lora", r=33, roles=["attn_proj"]), r"r=33 exceeds.*choose r <= 32"),
    "bottleneck-dim-zero": (lambda m, c: m.add_adapter("b", "pfeiffer", bottleneck_dim=0), r"bottleneck_dim must be >= 1"),
    "reduction-factor-zero": (lambda m, c: m.add_adapter("b", "pfeiffer", reduction_factor=0), r"reduction_factor must be > 0"),
    "layers-out-of-range": (lambda m, c: m.add_adapter("b", "lora", layers=[4]), r"out of range.*4 layers \(0 to 3\)"),
    "leave-out-out-of-range": (lambda m, c: m.add_adapter("b", "lora", leave_out=[5]), r"out of range.*4 layers"),
    "head-zero-labels": (lambda m, c: m.add_classification_head("h", num_labels=0), r"num_labels must be >= 1"),
    # wrong order of operations
    "merge-non-mergeable": (lambda m, c: m.merge_adapter("a"), r"cannot be merged"),
    "merge-twice": (lambda m, c: m.merge_adapter("m"), r"already merged"),
    "unmerge-not-merged": (lambda m, c: m.unmerge_adapter("l"), r"'l' is not merged"),
    "train-merged": (lambda m, c: m.train_adapter("m"), r"merged into the weights.*unmerge_adapter"),
    "routing-with-merged": (lambda m, c: m(**make_batch(), adapter_names=["a", "l", None, "a"]), r"unmerge"),
    # loading
    "load-corrupt-json": (lambda m, c: m.load_adapter(c["corrupt_json"]), r"not valid JSON.*save the adapter again"),
    "load-not-adapter-json": (lambda m, c: m.load_adapter(c["not_adapter_json"]), r"not an adapterkit adapter config"),
    "load-bad-config-values": (lambda m, c: m.load_adapter(c["bad_config_values"]), r"reduction_factor must be > 0"),
    "load-config-not-object": (lambda m, c: m.load_adapter(c["config_not_object"]), r"not an adapterkit adapter config"),
    "load-without-places": (lambda m, c: m.load_adapter(c["no_places"]), r"not an adapterkit adapter config"),
    "load-unknown-method": (lambda m, c: m.load_adapter(c["unknown_method"]), r"Did you mean 'bottleneck'"),
    "load-truncated-weights": (lambda m, c: m.load_adapter(c["truncated_weights"]), r"truncated or corrupt"),
    "load-missing-weights": (lambda m, c: m.load_adapter(c["missing_weights"]), r"adapter_model.safetensors' is missing"),
    "load-missing-config": (lambda m, c: m.load_adapter(c["missing_config"]), r"adapter_config.json' is missing"),
    "load-missing-folder": (lambda m, c: m.load_adapter(c["missing_folder"]), r"folder does not exist"),
    "load-edited-config": (lambda m, c: m.load_adapter(c["edited_config"]), r"has shape .* another base model"),
    "load-other-hidden-size": (lambda m, c: m.load_adapter(c["other_hidden"]), r"hidden_size=48.*hidden_size=32"),
    "load-other-layer-count": (lambda m, c: m.load_adapter(c["other_layers"]), r"num_layers=2.*num_layers=4"),
    "load-other-model-type": (lambda m, c: m.load_adapter(c["other_type"]), r"model_type="),
    "load-other-ffn-size": (lambda m, c: m.load_adapter(c["other_ffn"]), r"weight shape"),
    "load-name-taken": (lambda m, c: m.load_adapter(c["good"], load_as="a"), r"'a' already exists.*load_as"),
}


@pytest.mark.parametrize("call,pattern", BAD_CALLS.values(), ids=list(BAD_CALLS))
def test_bad_input_raises_and_leaves_the_model_unchanged(model, ckpt, call, pattern):
    batch = make_batch()
    before = Snapshot.of(model, batch)
    with pytest.raises(AdapterError, match=pattern):
        call(model, ckpt)
    before.assert_unchanged(model)


def test_checkpoint_errors_are_checkpoint_errors(model, ckpt):
    for name in ("corrupt_json", "truncated_weights", "missing_weights", "missing_folder", "other_hidden"):
        with pytest.raises(CheckpointError):
            model.load_adapter(ckpt[name])


def test_good_checkpoint_loads_into_the_same_model(model, ckpt):
    """The fixtures' good checkpoint is good: the failures above come from the damage."""
    assert model.load_adapter(ckpt["good"]) == "c"


def test_failed_save_creates_nothing(model, tmp_path):
    with pytest.raises(AdapterError):
        model.save_adapter(tmp_path / "x", "nope")
    assert list(tmp_path.iterdir()) == []


def test_unknown_option_lists_valid_ones(model):
    with pytest.raises(AdapterError, match=r"Valid options: .*alpha.*dropout.*\br\b"):
        model.add_adapter("b", "lora", rank=4)
