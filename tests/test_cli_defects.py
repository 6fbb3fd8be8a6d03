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
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


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
    assert "\n" not in err and ("in use by another adapterkit merge" in err or "holds a model already" in err), err
    assert (out / "config.json").is_file() and not (out / ".adapterkit.lock").exists()


def test_merge_into_an_out_in_use_is_refused_before_loading(ws, tmp_path, capsys):
    from adapterkit.train.runlock import RunLock

    out = tmp_path / "busy"
    with RunLock(out, "merge"):
        err = one_line(capsys, main(["merge", "--adapter", str(ws / "lora"), "--out", str(out)]))
    assert "in use by another adapterkit merge" in err
    assert list(out.iterdir()) == []  # nothing of the refused merge is left


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
