"""Adapters made by PEFT and AdapterHub load into adapterkit with the peers' own logits (issue 11).

The fixtures (``tests/fixtures/interop/``, written by ``tests/fixtures/make_interop_fixtures.py``
in the bench environment) hold each peer's checkpoint, the batch and the logits the peer
computed. Here, under ``transformers`` 5.x, adapterkit loads the same base and the adapter and
must reproduce those logits to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError, CheckpointError
from adapterkit.packaged import resolve_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").is_file())


def load_base(case: dict) -> torch.nn.Module:
    folder = resolve_model("minilm")[0] if case["base"] == "minilm" else FIXTURES / "bases" / case["base"]
    cls = T.AutoModelForCausalLM if case["causal_lm"] else T.AutoModel
    return cls.from_pretrained(folder, local_files_only=True).eval()


def fixture(name: str) -> tuple[dict, dict, Path]:
    folder = FIXTURES / name
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "expected.safetensors")), folder


@pytest.mark.parametrize("name", CASES)
def test_peer_fixture_gives_the_peer_logits(name):
    case, expected, folder = fixture(name)
    model = AdapterModel(load_base(case))
    loaded = model.load_adapter(folder / "adapter", set_active=True, allow_pickle=case["allow_pickle"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    want = expected["logits"]
    assert logits.shape == want.shape
    if want.dim() == 3:  # per token: compare the real tokens (padding rows carry no meaning)
        mask = expected["attention_mask"].bool()
        logits, want = logits[mask], want[mask]
    assert (logits - want).abs().max().item() <= 1e-5
    with model.disable_adapters():  # the adapter matters: without it the logits differ
        base = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert loaded in model.adapters
    if base.shape == expected["logits"].shape:
        assert (base - expected["logits"]).abs().max().item() > 1e-3


def logits_of(model: AdapterModel, expected: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits


@pytest.mark.parametrize("fmt", ["adapterkit", "peft", "adapterhub"])
@pytest.mark.parametrize("name", CASES)
def test_fixture_saved_in_each_format_loads_back_identically(name, fmt, tmp_path):
    """Peer -> adapterkit -> any format -> adapterkit gives the same logits; a format that cannot
    express the adapter refuses it and writes nothing."""
    case, expected, folder = fixture(name)
    model = AdapterModel(load_base(case))
    loaded = model.load_adapter(folder / "adapter", set_active=True, allow_pickle=case["allow_pickle"])
    want = logits_of(model, expected)
    out = tmp_path / "out"
    try:
        model.save_adapter(out, loaded, format=fmt)
    except AdapterError as err:
        assert fmt not in ("adapterkit", case["peer"]), f"{name} could not be written as {fmt}: {err}"
        assert "nothing was written" in str(err) and not out.exists()
        return
    again = AdapterModel(load_base(case))
    again.load_adapter(out, set_active=True)
    assert torch.equal(logits_of(again, expected), want)


# -- bad input: a clear error naming the file and key, nothing loaded, model unchanged -----------------
def snapshot(model: AdapterModel) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    return list(model.adapters), list(model.heads), model.active_adapters, hooks, weights


def assert_unchanged(model: AdapterModel, before: tuple) -> None:
    after = snapshot(model)
    assert after[:4] == before[:4]
    assert after[4].keys() == before[4].keys() and all(torch.equal(after[4][k], before[4][k]) for k in before[4])


def copy_fixture(name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(FIXTURES / name / "adapter", tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data["config"] if key.startswith("config.") else data
        target[key.split(".")[-1]] = value
    path.write_text(json.dumps(data))


def edit_weights(path: Path, edit) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def bert_with(**changes) -> AdapterModel:
    config = T.AutoConfig.from_pretrained(FIXTURES / "bases" / "bert")
    for key, value in changes.items():
        setattr(config, key, value)
    return AdapterModel(T.AutoModel.from_config(config))


def model_with_an_adapter() -> AdapterModel:
    model = AdapterModel(load_base({"base": "bert", "causal_lm": False}))
    model.add_adapter("mine", "pfeiffer", set_active=True)
    return model


BAD_INPUTS = {
    # name: (fixture, edit(folder), model factory, words the error must contain)
    "peft architecture mismatch": ("peft_gpt2_lora_lm", None, model_with_an_adapter,
                                   ["adapter_model.safetensors", "transformer.h.0.attn.c_attn", "does not exist"]),
    "adapterhub architecture mismatch": ("ah_llama_lora_lm", None, model_with_an_adapter,
                                         ["adapter_config.json", "model_type", "llama"]),
    "adapterhub hidden size": ("ah_bert_seqbn_cls", None, lambda: bert_with(hidden_size=64),
                               ["adapter_config.json", "hidden_size", "32"]),
    "peft hidden size": ("peft_bert_lora_cls", None, lambda: bert_with(hidden_size=64, intermediate_size=64),
                         ["adapter_model.safetensors", "bert.encoder.layer.0.attention", "shape"]),
    "peft missing key": ("peft_bert_lora_cls", lambda f: edit_weights(
        f / "adapter_model.safetensors",
        lambda t: t.pop("base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight")),
        model_with_an_adapter, ["adapter_model.safetensors", "bert.encoder.layer.1.attention.self.value", "lora_B"]),
    "peft extra key": ("peft_bert_lora_cls", lambda f: edit_weights(
        f / "adapter_model.safetensors",
        lambda t: t.update({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_E.weight":
                            torch.ones(2)})),
        model_with_an_adapter, ["adapter_model.safetensors", "unexpected key", "lora_E"]),
    "adapterhub missing key": ("ah_bert_seqbn_cls", lambda f: edit_weights(
        f / "adapter.safetensors", lambda t: t.pop("bert.encoder.layer.1.output.adapters.a.adapter_up.weight")),
        model_with_an_adapter, ["adapter.safetensors", "bert.encoder.layer.1.output.adapters.a", "up.weight"]),
    "adapterhub extra key": ("ah_bert_seqbn_cls", lambda f: edit_weights(
        f / "adapter.safetensors",
        lambda t: t.update({"bert.encoder.layer.0.output.adapters.a.gate.weight": torch.ones(1)})),
        model_with_an_adapter, ["adapter.safetensors", "bert.encoder.layer.0.output.adapters.a.gate.weight"]),
    "adapterhub head missing key": ("ah_bert_seqbn_cls", lambda f: edit_weights(
        f / "model_head.safetensors", lambda t: t.pop("heads.a.4.weight")),
        model_with_an_adapter, ["model_head.safetensors", "heads.a.4.weight", "missing"]),
    "peft weights file missing": ("peft_bert_lora_cls", lambda f: (f / "adapter_model.safetensors").unlink(),
                                  model_with_an_adapter, ["adapter_model.safetensors", "is missing"]),
    "adapterhub head weights missing": ("ah_bert_seqbn_cls", lambda f: (f / "model_head.safetensors").unlink(),
                                        model_with_an_adapter, ["model_head.safetensors", "is missing"]),
    "unknown peft_type": ("peft_bert_lora_cls", lambda f: edit_json(f / "adapter_config.json", peft_type="LOHA"),
                          model_with_an_adapter, ["adapter_config.json", "peft_type", "LOHA"]),
    "peft option without counterpart": ("peft_bert_lora_cls",
                                        lambda f: edit_json(f / "adapter_config.json", lora_bias=True),
                                        model_with_an_adapter, ["adapter_config.json", "lora_bias"]),
    "peft use_dora without magnitudes": ("peft_bert_lora_cls",
                                         lambda f: edit_json(f / "adapter_config.json", use_dora=True),
                                         model_with_an_adapter, ["adapter_config.json", "use_dora",
                                                                 "lora_magnitude_vector"]),
    "unknown adapterhub config": ("ah_bert_lora_tagging", lambda f: edit_json(
        f / "adapter_config.json", **{"config.architecture": "prompt_tuning"}),
        model_with_an_adapter, ["adapter_config.json", "prompt_tuning"]),
    "adapterhub original_ln_after=False": ("ah_bert_seqbn_cls", lambda f: edit_json(
        f / "adapter_config.json", **{"config.original_ln_after": False}),
        model_with_an_adapter, ["adapter_config.json", "original_ln_after"]),
    "adapterhub gating without gates": ("ah_bert_seqbn_cls",
                                        lambda f: edit_json(f / "adapter_config.json", **{"config.use_gating": True}),
                                        model_with_an_adapter, ["adapter.safetensors", "lacks", "gate.weight"]),
    "pickled adapterhub weights": ("ah_bert_seqbn_lnbefore_pooler_bin", None, model_with_an_adapter,
                                   ["pytorch_adapter.bin", "pickled", "--allow-pickle"]),
    "pickled peft weights": ("peft_gpt2_ia3_lm", None, model_with_an_adapter,
                             ["adapter_model.bin", "pickled", "adapterkit convert"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_foreign_adapter_is_refused_and_the_model_is_unchanged(case, tmp_path):
    name, edit, make, words = BAD_INPUTS[case]
    folder = copy_fixture(name, tmp_path)
    if edit is not None:
        edit(folder)
    model = make()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        model.load_adapter(folder)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert_unchanged(model, before)


def test_adapterhub_lora_on_gpt2_fused_attention_is_refused(tmp_path):
    """AdapterHub adapts slices of GPT-2's c_attn; adapterkit's whole-module LoRA cannot express that."""
    from safetensors.torch import save_file

    folder = tmp_path / "ah"
    folder.mkdir()
    config = {"architecture": "lora", "composition_mode": "scale", "r": 1, "alpha": 1, "selfattn_lora": True,
              "attn_matrices": ["k", "v"], "intermediate_lora": False, "output_lora": False}
    (folder / "adapter_config.json").write_text(json.dumps(
        {"config": config, "model_type": "gpt2", "hidden_size": 32, "name": "a", "version": "adapters.1.3.0"}))
    save_file({f"transformer.h.{i}.attn.c_attn.loras.a.lora_B": torch.ones(64, 1) for i in (0, 1)},
              str(folder / "adapter.safetensors"))
    model = AdapterModel(load_base({"base": "gpt2", "causal_lm": True}))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"adapter.safetensors.*transformer.h.0.attn.c_attn.*slices"):
        model.load_adapter(folder)
    assert_unchanged(model, before)


def test_pickle_that_runs_code_is_refused_even_with_allow_pickle(tmp_path):
    folder = copy_fixture("ah_bert_seqbn_lnbefore_pooler_bin", tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"bert.encoder.layer.0.output.adapters.a.adapter_up.weight": Payload()}, folder / "pytorch_adapter.bin")
    model = model_with_an_adapter()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        model.load_adapter(folder, allow_pickle=True)
    assert_unchanged(model, before)


def test_pickled_weights_load_with_allow_pickle():
    case, expected, folder = fixture("peft_gpt2_ia3_lm")
    model = AdapterModel(load_base(case))
    model.load_adapter(folder / "adapter", set_active=True, allow_pickle=True)
    mask = expected["attention_mask"].bool()
    assert (logits_of(model, expected)[mask] - expected["logits"][mask]).abs().max() <= 1e-5


# -- writing: refused exports write nothing, and never replace what is not an adapter of that format -----
def test_export_the_peer_cannot_express_writes_nothing(tmp_path):
    model = model_with_an_adapter()
    with pytest.raises(AdapterError, match="PEFT has no bottleneck adapter.*nothing was written"):
        model.save_adapter(tmp_path / "out", "mine", format="peft")
    assert not (tmp_path / "out").exists()
    model.add_adapter("ranked", "lora", rank_pattern={"query": 2})
    with pytest.raises(AdapterError, match="AdapterHub has no counterpart for the lora option.*rank_pattern"):
        model.save_adapter(tmp_path / "out", "ranked", format="adapterhub")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match="Unknown adapter format 'onnx'"):
        model.save_adapter(tmp_path / "out", "mine", format="onnx")


def test_export_never_replaces_other_files(tmp_path):
    model = model_with_an_adapter()
    model.add_adapter("lo", "lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        model.save_adapter(out, "lo", format="peft")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    model.save_adapter(tmp_path / "peft", "lo", format="peft")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):  # a PEFT folder is no AdapterHub one
        model.save_adapter(tmp_path / "peft", "lo", format="adapterhub")
    model.save_adapter(tmp_path / "peft", "lo", format="peft")  # the same format replaces it


# -- the options the formats needed ---------------------------------------------------------------------
def test_lora_rank_and_alpha_patterns_and_rslora_per_site():
    model = AdapterModel(load_base({"base": "bert", "causal_lm": False}))
    model.add_adapter("a", "lora", r=4, alpha=8, roles="q,v", use_rslora=True,
                      rank_pattern={"value": 2}, alpha_pattern={r"layers\.1\..*": 3.0})
    mods = model.adapters["a"]
    assert mods["layers-0-attention-self-query"].lora_A.shape[0] == 4
    assert mods["layers-0-attention-self-value"].lora_A.shape[0] == 2
    assert mods["layers-0-attention-self-query"].scaling == pytest.approx(8 / 2)  # alpha / sqrt(4)
    assert mods["layers-1-attention-self-value"].scaling == pytest.approx(3 / 2 ** 0.5)
    from adapterkit import resolve_config

    cfg = model.records["a"].config
    assert resolve_config(json.loads(cfg.to_json())) == cfg
    with pytest.raises(AdapterError, match="rank_pattern key"):
        resolve_config("lora", rank_pattern={"(": 2})


@pytest.mark.parametrize("base", ["bert", "gpt2"])
def test_ia3_input_scaling_merges_exactly_and_disables_to_the_base(base):
    """IA3 on a projection's input (PEFT's feedforward_modules; GPT-2's Conv1D too)."""
    case = {"base": base, "causal_lm": base == "gpt2"}
    model = AdapterModel(load_base(case))
    _, expected, _ = fixture("peft_gpt2_ia3_lm" if base == "gpt2" else "peft_bert_ia3_tagging")
    x = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    with torch.no_grad():
        base_out = model(**x)[0]
    ffn_proj = {"bert": r"output\.dense", "gpt2": r"mlp\.c_proj"}[base]
    model.add_adapter("a", "ia3", roles=("qkv" if base == "gpt2" else "k,v") + ",ffn_proj",
                      input_modules=rf"layers\.\d+\.{ffn_proj}", set_active=True)
    scaled = [k for k, m in model.adapters["a"].items() if m.scales_input]
    assert scaled == ["layers-0-" + ffn_proj.replace("\\.", "-"), "layers-1-" + ffn_proj.replace("\\.", "-")]
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        unmerged = model(**x)[0]
        model.merge_adapter("a")
        merged = model(**x)[0]
        model.unmerge_adapter("a")
        with model.disable_adapters():
            disabled = model(**x)[0]
    assert (unmerged - base_out).abs().max() > 1e-3
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.equal(disabled, base_out)


# -- the command line ------------------------------------------------------------------------------------
def test_cli_convert_round_trip_and_refusals(tmp_path, capsys):
    from adapterkit.cli import main

    src = FIXTURES / "ah_bert_lora_tagging" / "adapter"  # AdapterHub -> adapterkit -> PEFT -> AdapterHub
    base = str(FIXTURES / "bases" / "bert")
    assert main(["convert", str(src), str(tmp_path / "ak"), "--to", "adapterkit", "--model", base]) == 0
    assert main(["convert", str(tmp_path / "ak"), str(tmp_path / "peft"), "--to", "peft", "--model", base]) == 0
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "ah"), "--to", "adapterhub", "--model", base]) == 0
    assert "converted lora adapter 'a' with its head" in capsys.readouterr().out
    case, expected, _ = fixture("ah_bert_lora_tagging")
    mask = expected["attention_mask"].bool()
    for out in ("ak", "peft", "ah"):
        model = AdapterModel(load_base(case))
        model.load_adapter(tmp_path / out, set_active=True)
        assert (logits_of(model, expected)[mask] - expected["logits"][mask]).abs().max() <= 1e-5
    pickled = FIXTURES / "ah_bert_seqbn_lnbefore_pooler_bin" / "adapter"
    assert main(["convert", str(pickled), str(tmp_path / "x"), "--to", "adapterkit", "--model", base]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["convert", str(pickled), str(tmp_path / "x"), "--to", "adapterkit", "--model", base,
                 "--allow-pickle"]) == 0
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "y"), "--to", "peft", "--model", base]) == 2
    assert "PEFT has no bottleneck adapter" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "x"), "--to", "adapterhub", "--model", base]) == 2
    assert "source folder" in capsys.readouterr().err


def test_format_detection_by_the_config_file(tmp_path):
    from adapterkit.interop import detect_format

    assert detect_format(FIXTURES / "peft_bert_lora_cls" / "adapter") == "peft"
    assert detect_format(FIXTURES / "ah_bert_seqbn_cls" / "adapter") == "adapterhub"
    model = model_with_an_adapter()
    model.save_adapter(tmp_path / "ak", "mine")
    assert detect_format(tmp_path / "ak") == "adapterkit"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="neither an adapterkit adapter.*nor an AdapterHub adapter"):
        detect_format(tmp_path / "other")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors. is missing"):  # read_checkpoint says it
        model.load_adapter(tmp_path / "other")
