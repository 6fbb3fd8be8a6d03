"""The CLI, data and training items of the defects issue that are more than one bad-input line
(those are rows of ``docs/bad-input.md``, run by ``tests/test_bad_input_table.py``): concurrent
merges, a full disk, a run that diverges, and the base recorded by ``from_pretrained``."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapterkit import AdapterModel
from adapterkit.cli import main
from trainkit import REPO, sentiment_rows, tiny_bert, write_tsv

FAST = ["--epochs", "1", "--batch-size", "16", "--progress", "none"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("defects")
    tiny_bert(d / "bert")
    write_tsv(d / "train.tsv", sentiment_rows(48, seed=0))
    assert main(["train", "--model", str(d / "bert"), "--train", str(d / "train.tsv"), "--out", str(d / "lora"),
                 "--method", "lora", "--lora-r", "2", *FAST]) == 0
    return d


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, code: int) -> str:
    """The error line of a command that exited 2 (after at most ``note:`` lines, e.g. train's)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert all(line.startswith("note: ") for line in lines[:-1]), lines
    assert lines[-1].startswith("adapterkit ") and ": error: " in lines[-1], lines
    return lines[-1]


# -- merge takes the run lock ------------------------------------------------------------------------
def test_two_merges_into_one_new_out_one_wins_the_other_says_why(ws, tmp_path):
    """Both used to exit 0 and print "saved" while one result was lost (the --out check came before
    the slow load and nothing was locked)."""
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "adapterkit", "merge", "--adapter", str(ws / "lora"), "--out", str(out)]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, _, e in results if c == 2).strip()
    last = err.splitlines()[-1]  # (libraries may warn on stderr before adapterkit starts)
    assert "Traceback" not in err and last.startswith("adapterkit merge: error: "), err
    assert "in use by another adapterkit merge" in last or "holds a model already" in last, err
    assert (out / "config.json").is_file() and not (out / ".adapterkit.lock").exists()


def test_merge_into_an_out_in_use_is_refused_before_loading(ws, tmp_path, capsys):
    from adapterkit.train.runlock import RunLock

    out = tmp_path / "busy"
    with RunLock(out, "merge"):
        err = one_line(capsys, main(["merge", "--adapter", str(ws / "lora"), "--out", str(out)]))
    assert "in use by another adapterkit merge" in err
    assert list(out.iterdir()) == []  # nothing of the refused merge is left


def test_convert_into_a_folder_in_use_is_refused_and_a_finished_one_leaves_no_lock(ws, tmp_path, capsys):
    """convert takes the run lock of its destination, as train and merge do."""
    from adapterkit.train.runlock import RunLock

    busy = tmp_path / "busy"
    with RunLock(busy, "convert"):
        err = one_line(capsys, main(["convert", str(ws / "lora"), str(busy), "--to", "peft", "--without-head"]))
    assert "in use by another adapterkit convert" in err
    assert list(busy.iterdir()) == []  # nothing of the refused convert is left
    done = tmp_path / "peft"
    assert main(["convert", str(ws / "lora"), str(done), "--to", "peft", "--without-head"]) == 0
    assert (done / "adapter_config.json").is_file() and not (done / ".adapterkit.lock").exists()
    # the same destination again: a PEFT folder is replaced, the lock is no foreign file
    assert main(["convert", str(ws / "lora"), str(done), "--to", "peft", "--without-head"]) == 0
    assert sorted(p.name for p in done.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# -- a full disk ------------------------------------------------------------------------------------
def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_train_is_one_line_and_leaves_no_temporary_folders(ws, tmp_path, capsys, monkeypatch):
    from adapterkit.train import checkpoint

    monkeypatch.setattr(checkpoint, "save_file", _full)  # the writer of run checkpoints
    data = (ws / "train.tsv").read_bytes()
    err = one_line(capsys, main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"),
                                 "--out", str(tmp_path / "run"), "--save-every", "1", *FAST]))
    assert "no space left on device" in err and "--resume" in err
    assert (ws / "train.tsv").read_bytes() == data
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("No space left on device (os error 28)")],
                         ids=["oserror", "safetensorerror"])
def test_disk_full_during_merge_keeps_the_previous_model(ws, tmp_path, capsys, monkeypatch, error):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ws / "lora"), "--out", str(out)]) == 0
    before = tree(out)

    def full(*args, **kwargs):
        raise error

    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    err = one_line(capsys, main(["merge", "--adapter", str(ws / "lora"), "--out", str(out), "--overwrite"]))
    assert "o space left on device" in err and "nothing earlier was replaced" in err
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


# -- a run that diverges -------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(ws, tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line(capsys, main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"),
                                 "--out", str(out), "--lr", "1e30", "--save-every", "1", "--epochs", "3",
                                 "--batch-size", "16", "--progress", "none"]))
    assert "Training stopped at step" in err and "lower --lr" in err, err
    assert f"the last good checkpoint (step 1) stays in {out / 'checkpoint'}" in err, err
    weights = load_file(out / "checkpoint" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # not "finished"
    assert not (out / "results.json").exists()


# -- the base of an adapter saved from AdapterModel.from_pretrained -------------------------------------
def test_adapter_saved_from_from_pretrained_records_its_base(ws, tmp_path, capsys):
    from adapterkit.packaged import base_reference

    model = AdapterModel.from_pretrained(str(ws / "bert"))
    model.add_adapter("a", "lora", r=2)
    model.add_classification_head("a", num_labels=2)
    model.save_adapter(tmp_path / "a", "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["base_model"]["source"] == str((ws / "bert").resolve())
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0  # no --model
    assert "merged adapter 'a' into" in capsys.readouterr().out
    assert base_reference("MiniLM") == "minilm"
    assert AdapterModel(model.model).base_source is None  # a handle around a module records nothing


# -- speech adapters through eval and predict ------------------------------------------------------------
@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A tiny wav2vec2 with its feature extractor, WAV folders (one subfolder per label), and a
    speech adapter trained on them with ``adapterkit train``."""
    import numpy as np
    import soundfile
    import transformers as T

    from helpers import ARCHS

    d = tmp_path_factory.mktemp("speech")
    torch.manual_seed(0)
    T.Wav2Vec2Model(ARCHS["wav2vec2"].config()).save_pretrained(d / "speech")
    T.Wav2Vec2FeatureExtractor(sampling_rate=8000).save_pretrained(d / "speech")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("dev", 3)):
        for label, scale in (("yes", 0.5), ("no", 0.05)):
            (d / split / label).mkdir(parents=True)
            for i in range(n):
                clip = rng.normal(0, scale, 800 + 80 * i).astype("float32")
                soundfile.write(str(d / split / label / f"{i}.wav"), clip, 8000)
    assert main(["train", "--model", str(d / "speech"), "--train", str(d / "train"), "--eval", str(d / "dev"),
                 "--out", str(d / "run"), "--epochs", "2", "--batch-size", "4", "--progress", "none"]) == 0
    return d


def test_eval_takes_an_audio_folder_and_reproduces_the_runs_scores(speech, capsys):
    capsys.readouterr()
    assert main(["eval", "--adapter", str(speech / "run"), "--data", str(speech / "dev"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    results = json.loads((speech / "run" / "results.json").read_text())
    assert scores["rows"] == 6 and scores["task"] == "classification"
    for name, value in results["eval"].items():
        assert scores[name] == pytest.approx(value, abs=1e-5), name


def test_predict_takes_audio_files_and_folders(speech, capsys):
    one = speech / "dev" / "yes" / "1.wav"
    capsys.readouterr()
    assert main(["predict", "--adapter", str(speech / "run"), "--json", str(one)]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["predict", "--adapter", str(speech / "run"), "--json", "--batch-size", "4", str(speech / "dev")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).relative_to(speech / "dev").as_posix() for r in rows] == [
        f"{label}/{i}.wav" for label in ("no", "yes") for i in range(3)]
    batched = next(r for r in rows if r["path"] == str(one))
    assert batched["label"] == alone["label"] and set(alone["probabilities"]) == {"no", "yes"}
    for label, p in alone["probabilities"].items():  # routed in a padded batch = alone
        assert batched["probabilities"][label] == pytest.approx(p, abs=1e-5)
    # the model's own output for that clip, read the way predict reads it
    from adapterkit.train.artifacts import load_trained
    from adapterkit.data.audio import prediction_clips

    loaded = load_trained(speech / "run")
    clips = prediction_clips([one], loaded.tokenizer)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(**clips.collate([0], with_labels=False)).logits[0], -1)
    assert alone["probability"] == pytest.approx(probs.max().item(), abs=1e-6)


def test_audio_and_text_mixed_up_are_one_line(speech, ws, capsys):
    err = one_line(capsys, main(["predict", "--adapter", str(speech / "run"), "good film"]))
    assert "classifies audio" in err
    err = one_line(capsys, main(["eval", "--adapter", str(ws / "lora"), "--data", str(speech / "dev")]))
    assert "reads text" in err
    err = one_line(capsys, main(["predict", "--adapter", str(ws / "lora"), str(speech / "dev" / "yes" / "0.wav")]))
    assert "reads text" in err


# -- convert a CLI-trained classifier ------------------------------------------------------------------
def test_a_default_classifier_converts_without_its_head_and_training_said_so(ws, tmp_path, capsys):
    """Encoder heads default to mean pooling, which neither PEFT nor AdapterHub holds: ``convert``
    used to fail for every CLI classifier, suggesting ``with_head=False``, which it did not offer."""
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out", str(run),
                 "--method", "lora", "--lora-r", "2", "--roles", "q,v", *FAST]) == 0  # AdapterHub holds q, v
    err = capsys.readouterr().err
    assert "note: this head (2 layer(s), pooling auto) cannot be converted to PEFT or AdapterHub" in err, err
    err = one_line(capsys, main(["convert", str(run), str(tmp_path / "peft"), "--to", "peft"]))
    assert "pass --without-head to convert the adapter alone" in err and "with_head=False" not in err, err
    assert not (tmp_path / "peft").exists()
    for fmt in ("peft", "adapterhub"):
        assert main(["convert", str(run), str(tmp_path / fmt), "--to", fmt, "--without-head"]) == 0
        out = capsys.readouterr().out
        assert "left behind: its classification head (2 layer(s), pooling auto, 2 outputs)" in out, out
    # the converted adapter computes what the trained one does
    from adapterkit.train.artifacts import load_trained

    trained = load_trained(run)
    ids = torch.tensor([[2, 5, 6, 30, 3]])
    with torch.no_grad():
        want = trained.model.model(input_ids=ids).last_hidden_state
        for fmt in ("peft", "adapterhub"):
            model = AdapterModel.from_pretrained(str(ws / "bert"))
            model.load_adapter(tmp_path / fmt, set_active=True)
            model.eval()
            got = model(input_ids=ids).last_hidden_state
            assert (got - want).abs().max().item() <= 1e-5, fmt


def test_a_head_that_converts_gets_no_note(ws, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out", str(tmp_path / "r"),
                 "--method", "lora", "--lora-r", "2", "--pooling", "cls", *FAST]) == 0
    assert "cannot be converted" not in capsys.readouterr().err
