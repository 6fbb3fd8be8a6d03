"""Vision and speech layouts end to end: heads, input checks, the ELP speech adapters, WAV folders.

* a tiny random wav2vec2 learns a synthetic audio task (low tones, high tones, noise bursts,
  written as WAV files) with E- and L-adapters through ``adapterkit train`` on the WAV folder;
* a tiny ViT learns horizontal vs vertical stripes with an adapter and the image head;
* image / audio heads pool what they should (CLS or patch mean; frames under the frame mask),
  the CTC head's loss equals ``Wav2Vec2ForCTC``'s with the same weights;
* L-adapters: the head reads the softmax-weighted sum of every layer's adapter; per-example
  routing equals each example alone; save / load identical;
* bad input (image size / channels, audio shape, sampling rate) is refused naming the fix.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import soundfile
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel
from adapterkit.cli import main
from helpers import ARCHS, make_base, make_batch, perturb, run

RATE = 8000


def _speech_model(tmp_path, layers: int = 2):
    torch.manual_seed(0)
    config = ARCHS["wav2vec2"].config()
    config.num_hidden_layers = layers
    model = T.Wav2Vec2Model(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    T.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


def _clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(700, 1000))
    t = np.arange(n) / RATE
    if kind == "noise":
        burst = np.zeros(n)
        start = int(rng.integers(0, n // 2))
        burst[start:start + n // 3] = rng.normal(0, 0.5, size=len(burst[start:start + n // 3]))
        return burst.astype("float32")
    freq = {"low": 300.0, "high": 1800.0}[kind] * rng.uniform(0.9, 1.1)
    return (rng.uniform(0.3, 0.8) * np.sin(2 * math.pi * freq * t + rng.uniform(0, 6.28))).astype("float32")


def _write_split(root, per_class: int, seed: int, rate: int = RATE) -> None:
    rng = np.random.default_rng(seed)
    for kind in ("low", "high", "noise"):
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            soundfile.write(str(root / kind / f"{i}.wav"), _clip(kind, rng), rate)


@pytest.mark.parametrize("method,parts", [
    ("e_adapter+l_adapter", ["bottleneck", "l_adapter"]),
    ("e_adapter+l_adapter+p_adapter", ["bottleneck", "l_adapter", "prompt_tuning"]),  # all three ELP adapters
], ids=["E+L", "E+L+P"])
def test_wav2vec2_learns_tones_and_noise_with_elp_adapters_from_a_wav_folder(method, parts, tmp_path, capsys):
    model = _speech_model(tmp_path)
    _write_split(tmp_path / "data" / "train", 16, seed=0)
    _write_split(tmp_path / "data" / "dev", 8, seed=1)
    out = tmp_path / "run"
    code = main(["train", "--model", str(model), "--train", str(tmp_path / "data" / "train"),
                 "--eval", str(tmp_path / "data" / "dev"), "--test", str(tmp_path / "data" / "dev"),
                 "--method", method, "--epochs", "6", "--batch-size", "8", "--lr", "1e-2",
                 "--progress", "none", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.8  # chance: 1/3
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())["config"]
    assert [p["method"] for p in config["parts"]] == parts

    # the saved adapter and head give the same predictions in a fresh model
    trained = AdapterModel.from_pretrained(str(model))
    name = trained.load_adapter(out / "adapter", set_active=True)
    assert name == "data" and trained.active_head == "data"  # named after the folder that holds train/


def test_audio_folder_at_another_sampling_rate_is_refused(tmp_path, capsys):
    model = _speech_model(tmp_path)
    _write_split(tmp_path / "train", 2, seed=0, rate=16000)
    code = main(["train", "--model", str(model), "--train", str(tmp_path / "train"), "--method", "pfeiffer",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "sampled at 16000 Hz" in err and "expects 8000 Hz" in err and "resample" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    period = torch.randint(3, 6, (n,), generator=g)
    for i in range(n):
        line = (torch.arange(32) // period[i] % 2).float() * 2 - 1  # +-1 stripes
        pattern = line.view(32, 1).expand(32, 32) if labels[i] == 0 else line.view(1, 32).expand(32, 32)
        images[i] += pattern
    return images, labels


def test_vit_learns_horizontal_vs_vertical_stripes_with_an_adapter():
    model = AdapterModel(make_base(ARCHS["vit"]))
    model.add_adapter("stripes", "houlsby")
    model.add_classification_head("stripes", num_labels=2, pooling="mean")  # the patches' mean
    model.train_adapter("stripes")
    images, labels = _stripes(64, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        for i in range(0, 64, 16):
            optimizer.zero_grad()
            model(pixel_values=images[i:i + 16], labels=labels[i:i + 16]).loss.backward()
            optimizer.step()
    model.eval()
    test_images, test_labels = _stripes(64, seed=1)
    with torch.no_grad():
        accuracy = (model(pixel_values=test_images).logits.argmax(-1) == test_labels).float().mean()
    assert accuracy >= 0.85


def test_image_head_pools_cls_or_the_mean_of_patches():
    model = AdapterModel(make_base(ARCHS["deit"]))
    batch = make_batch(arch=ARCHS["deit"])
    hidden = model.model(**batch).last_hidden_state  # (4, 2 + 16, 32): CLS, distillation, patches
    for pooling, expected in (("auto", hidden[:, 0]), ("cls", hidden[:, 0]), ("mean", hidden[:, 2:].mean(1))):
        model.add_classification_head("h", num_labels=3, layers=1, pooling=pooling, overwrite=True)
        model.eval()
        head = model.heads["h"].mlp[-1]
        assert torch.allclose(run(model, batch), head(expected), atol=1e-6)


def test_audio_head_averages_real_frames_only():
    model = AdapterModel(make_base(ARCHS["wav2vec2"]))
    model.add_adapter("a", "pfeiffer", set_active=True)
    model.add_classification_head("a", num_labels=3)
    perturb(model.adapters)
    model.eval()
    batch = make_batch(arch=ARCHS["wav2vec2"])
    padded = run(model, batch)
    for row in (1, 2):
        n = int(batch["attention_mask"][row].sum())
        alone = run(model, {k: v[row:row + 1, :n] for k, v in batch.items()})
        assert (padded[row] - alone[0]).abs().max() <= 1e-5


def test_ctc_head_loss_equals_wav2vec2_for_ctc():
    config = ARCHS["wav2vec2"].config()
    config.update({"ctc_loss_reduction": "mean", "ctc_zero_infinity": True})
    torch.manual_seed(0)
    reference = T.Wav2Vec2ForCTC(config).eval()
    model = AdapterModel(reference.wav2vec2)
    model.add_ctc_head("asr")
    model.eval()
    with torch.no_grad():
        model.heads["asr"].mlp[-1].weight.copy_(reference.lm_head.weight)
        model.heads["asr"].mlp[-1].bias.copy_(reference.lm_head.bias)
    batch = make_batch(arch=ARCHS["wav2vec2"])
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100], [1, 2, 3, -100], [5, 5, 9, 2]])
    ours = model(**batch, labels=labels)
    theirs = reference(**batch, labels=labels)
    assert ours.logits.shape == (4, 39, 12)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-6)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)


def test_l_adapter_head_reads_the_weighted_sum_of_every_layer():
    model = AdapterModel(make_base(ARCHS["wav2vec2"]))
    model.add_adapter("l", "l_adapter", set_active=True)
    unit = model.adapters["l"]["layers-output"]
    perturb(unit)
    model.eval()
    batch = make_batch(arch=ARCHS["wav2vec2"])
    with torch.no_grad(), model.disable_adapters():
        layers = model.model(**batch, output_hidden_states=True).hidden_states[1:]  # each block's output
    weights = torch.softmax(unit.layer_weights, 0)
    expected = sum(w * path(h) for w, path, h in zip(weights, unit.paths, layers))
    assert torch.allclose(run(model, batch), expected, atol=1e-5)
    assert torch.allclose(unit.mix_weights.sum(), torch.tensor(1.0))


def test_l_adapter_routing_equals_each_example_alone():
    model = AdapterModel(make_base(ARCHS["wav2vec2-stable-ln"]))
    model.add_adapter("a", "e_adapter+l_adapter")
    model.add_adapter("b", "l_adapter")
    perturb(model.adapters)
    model.eval()
    batch = make_batch(arch=ARCHS["wav2vec2-stable-ln"])
    names = ["a", None, "b", "a"]
    routed = run(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        alone = run(model, {k: v[i:i + 1] for k, v in batch.items()})
        assert (routed[i] - alone[0]).abs().max() <= 1e-5


def test_l_adapter_with_layerdrop_reads_the_stream_a_skipped_layer_passes_on():
    config = ARCHS["wav2vec2"].config()
    config.layerdrop = 0.5
    torch.manual_seed(0)
    model = AdapterModel(T.Wav2Vec2Model(config))
    model.add_adapter("l", "l_adapter")
    model.train_adapter("l")
    batch = make_batch(arch=ARCHS["wav2vec2"])
    for _ in range(4):  # some layers skipped each time: the sum still has one entry per layer
        model(**batch).last_hidden_state.sum().backward()


@pytest.mark.parametrize("arch_name,inputs,fragment", [
    ("vit", {"pixel_values": torch.randn(2, 3, 64, 64)}, "takes 32x32 images"),
    ("vit", {"pixel_values": torch.randn(2, 1, 32, 32)}, "takes 3-channel images"),
    ("vit", {"pixel_values": torch.randn(2, 32, 32, 3)}, "permute(0, 3, 1, 2)"),
    ("vit", {"pixel_values": torch.randn(3, 32, 32)}, "unsqueeze(0)"),
    ("wav2vec2", {"input_values": torch.randn(2, 1, 400)}, "squeeze(1)"),
    ("wav2vec2", {"input_values": torch.randn(400)}, "unsqueeze(0)"),
    ("wav2vec2", {"input_values": torch.randn(2, 10)}, "at least 20 samples"),
])
def test_bad_image_and_audio_shapes_name_the_layout_and_the_fix(arch_name, inputs, fragment):
    model = AdapterModel(make_base(ARCHS[arch_name]))
    model.add_adapter("a", "pfeiffer", set_active=True)
    with pytest.raises(AdapterError, match=re.escape(fragment)) as err:
        model(**inputs)
    assert f"The {arch_name} layout" in str(err.value)


def test_weight_places_on_wavlm_are_refused_but_bottleneck_adapters_work():
    model = AdapterModel(make_base(ARCHS["wavlm-stable-ln"]))
    with pytest.raises(AdapterError, match="never calls"):
        model.add_adapter("a", "lora")
    assert list(model.adapters) == []
    model.add_adapter("a", "houlsby", set_active=True)
    assert len(model.records["a"].sites) == 8


def test_union_routes_options_round_trips_and_refuses_overlaps():
    from adapterkit import resolve_config
    from adapterkit.config import config_from_dict

    union = resolve_config("e_adapter+l_adapter", reduction_factor=8, non_linearity="gelu", layers=[1, 2])
    bottleneck, layer_sum = union.parts
    assert (bottleneck.reduction_factor, bottleneck.non_linearity, bottleneck.layers) == (8, "gelu", (1, 2))
    assert (layer_sum.non_linearity, layer_sum.layers) == ("gelu", (1, 2))
    assert config_from_dict(json.loads(union.to_json())) == union
    with pytest.raises(AdapterError, match="Did you mean 'reduction_factor'"):
        resolve_config("e_adapter+l_adapter", reduction_facter=8)
    model = AdapterModel(make_base(ARCHS["wav2vec2"]))
    with pytest.raises(AdapterError, match="both choose 'layers.0.ffn_out'"):
        model.add_adapter("a", "pfeiffer+houlsby")
    with pytest.raises(AdapterError, match="two methods or more"):
        resolve_config("pfeiffer+")
    assert list(model.adapters) == []
    model.add_adapter("encoder:a", "e_adapter+l_adapter")  # the stack scope reaches every part
    assert {s.stack for s in model.records["a"].sites} == {"encoder"}


def test_ctc_head_on_an_image_model_is_refused():
    model = AdapterModel(make_base(ARCHS["vit"]))
    with pytest.raises(AdapterError, match="A CTC head labels audio frames"):
        model.add_ctc_head("asr", vocab_size=10)
    assert list(model.heads) == []


def test_routed_heads_on_audio_average_each_examples_real_frames():
    model = AdapterModel(make_base(ARCHS["hubert"]))
    for name, labels in (("a", 3), ("b", 5)):
        model.add_adapter(name, "l_adapter" if name == "a" else "pfeiffer")
        model.add_classification_head(name, num_labels=labels)
    perturb(model.adapters)
    model.eval()
    batch = make_batch(arch=ARCHS["hubert"])
    names = ["a", "b", "a", None]
    out = model(**batch, adapter_names=names, routed_heads=True)
    for i, name in enumerate(names[:3]):
        n = int(batch["attention_mask"][i].sum())
        model.set_active_adapters(name)
        alone = run(model, {k: v[i:i + 1, :n] for k, v in batch.items()})
        assert (out.logits[i] - alone[0]).abs().max() <= 1e-5
    assert out.logits[3] is None
