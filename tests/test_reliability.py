"""Issue 10, "Reliability": no data loss, no silent wrong result, no traceback for what a user typed.

One test (or more) per item of the issue, in its order. Where the item is about the command line,
the command runs as a user runs it, in a subprocess (``python -m adapterkit``): exit code, one
line on stderr, and what is (not) left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from adapterkit import AdapterError, AdapterModel, CheckpointError
from adapterkit.cli import main
from trainkit import run_cli, sentiment_rows, tiny_bert, tiny_llama, train_and_merge_lora, write_jsonl, write_tsv

FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--progress", "none"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two tiny BERTs of the same shapes and different weights, data, and one trained run."""
    d = tmp_path_factory.mktemp("rel")
    tiny_bert(d / "bert")
    other = tiny_bert(d / "other")
    torch.manual_seed(123)  # the same config and tokenizer, other weights
    T.BertModel(T.BertConfig.from_pretrained(other)).save_pretrained(other)
    write_tsv(d / "train.tsv", sentiment_rows(96, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(32, seed=1))
    res = run_cli(["train", "--model", str(d / "bert"), "--train", str(d / "train.tsv"), "--eval", str(d / "dev.tsv"),
                   "--out", str(d / "run"), *FAST])
    assert res.returncode == 0, res.stderr
    return d


def one_line_exit_2(res: subprocess.CompletedProcess, *needles: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, err)
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def in_process(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """The same command in this process (faster: no interpreter start), as a ``CompletedProcess``."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- data loss ---------------------------------------------------------------------------------------
def test_overwrite_refuses_a_folder_that_is_not_a_run(ws, tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ws / "train.tsv", proj / "train.tsv")
    (proj / "notes.txt").write_text("my notes")
    before = tree(proj)
    args = ["train", "--model", str(ws / "bert"), "--train", str(proj / "train.tsv"), "--out", str(proj), *FAST]
    one_line_exit_2(run_cli(args + ["--overwrite"]), "not a run folder", "--overwrite replaces only")
    err = one_line_exit_2(in_process(capsys, args), "not a run folder")
    assert tree(proj) == before  # the training file and the notes are still there
    assert "pass --overwrite" not in err  # the old message sent users to the flag that deleted their files


def test_overwrite_still_replaces_a_run_folder(ws, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ws / "run", out)
    res = run_cli(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out", str(out),
                   "--overwrite", "--epochs", "1", "--progress", "none"])
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "run.json").read_text())["config"]["epochs"] == 1
    assert not (out / ".adapterkit.lock").exists()  # a finished run lets go of its lock


def test_run_lock_is_exclusive_and_discards_what_it_created(tmp_path):
    from adapterkit.train.runlock import LOCK_NAME, RunLock

    out = tmp_path / "new"
    first = RunLock(out).acquire()
    assert (out / LOCK_NAME).read_text().split() == [str(os.getpid()), "train"]
    with pytest.raises(AdapterError, match=rf"in use by another adapterkit train \(PID {os.getpid()}\)"):
        RunLock(out).acquire()
    first.release(discard=True)  # the run never started: nothing is left behind
    assert not out.exists()


def test_run_lock_copes_with_a_racing_process_making_the_folder_first(tmp_path, monkeypatch):
    """Two merges into one new --out: both found it missing, the slower mkdir failed with "File
    exists" and stopped with "cannot write there" (CI, once in a while)."""
    from adapterkit.train.runlock import LOCK_NAME, RunLock

    out = tmp_path / "new"
    real_mkdir = Path.mkdir

    def beaten(self, *args, **kwargs):
        if self == out and not out.exists():
            real_mkdir(self)  # the other process gets there first
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", beaten)
    lock = RunLock(out, "merge").acquire()
    assert (out / LOCK_NAME).read_text().split() == [str(os.getpid()), "merge"]
    lock.release(discard=True)
    assert out.is_dir()  # the other process made the folder: it is not ours to remove


def test_run_lock_names_a_holder_that_writes_its_line_a_moment_after_locking(tmp_path):
    """The loser of a race read the lock file between the winner's flock and its write, and said
    "in use by another adapterkit train (PID unknown)" of a merge (CI, once)."""
    import fcntl
    import threading

    from adapterkit.train.runlock import LOCK_NAME, RunLock

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner has locked, and not yet written
    late = threading.Timer(0.2, lambda: os.write(fd, b"4242 merge\n"))
    late.start()
    try:
        with pytest.raises(AdapterError, match=r"in use by another adapterkit merge \(PID 4242\)"):
            RunLock(out, "merge").acquire()
    finally:
        late.join()
        os.close(fd)


def test_run_lock_takes_the_lock_now_in_the_folder_not_one_swapped_away(tmp_path, monkeypatch):
    """A folder swapped in between our open and our flock (merge's atomic write, or a run that
    removed its folder again) holds another lock file: the one we opened locks nothing."""
    from adapterkit.train import runlock

    out = tmp_path / "swapped"
    real_flock, swaps = runlock.fcntl.flock, []

    def swap_then_flock(fd, op):
        if not swaps:
            swaps.append(out.rename(tmp_path / "old"))
            out.mkdir()
        return real_flock(fd, op)

    monkeypatch.setattr(runlock.fcntl, "flock", swap_then_flock)
    lock = runlock.RunLock(out).acquire()
    assert swaps and runlock._same_file(out / runlock.LOCK_NAME, lock._fd)
    with pytest.raises(AdapterError, match="in use by another adapterkit train"):
        runlock.RunLock(out).acquire()  # the lock of the folder as it is now is held
    lock.release()
    assert not (out / runlock.LOCK_NAME).exists()


def test_second_run_into_the_same_folder_exits_2_naming_the_first(ws, tmp_path, capsys):
    out = tmp_path / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "adapterkit", "train", "--model", str(ws / "bert"), "--train",
                              str(ws / "train.tsv"), "--out", str(out), "--epochs", "500", "--batch-size", "8",
                              "--progress", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        end = time.time() + 120
        while not (out / "run.json").is_file() and time.time() < end and first.poll() is None:
            time.sleep(0.2)
        assert (out / "run.json").is_file(), first.stderr.read().decode() if first.poll() is not None else "timeout"
        metrics = (out / "metrics.jsonl").read_bytes() if (out / "metrics.jsonl").exists() else b""
        second = ["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out", str(out),
                  "--epochs", "1", "--progress", "none"]
        one_line_exit_2(run_cli(second + ["--overwrite"]), "in use by another adapterkit train", f"PID {first.pid}")
        one_line_exit_2(in_process(capsys, second))  # refused: the folder holds a run
        one_line_exit_2(in_process(capsys, ["train", "--resume", str(out)]), f"PID {first.pid}")
        assert first.poll() is None  # the first run is untouched and still training
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    from adapterkit.train.runlock import RunLock

    RunLock(out).acquire().release()  # kill -9 released the lock: the run can be resumed


# -- silent wrong results ----------------------------------------------------------------------------
def test_base_fingerprint_is_stable_and_tells_bases_apart(ws):
    from adapterkit.fingerprint import base_fingerprint, base_identity

    a = AdapterModel.from_pretrained(str(ws / "bert"))
    again = AdapterModel.from_pretrained(str(ws / "bert"))
    classifier = AdapterModel(T.BertForSequenceClassification.from_pretrained(ws / "bert"))
    bf16 = AdapterModel(T.BertModel.from_pretrained(ws / "bert", dtype=torch.bfloat16))
    other = AdapterModel.from_pretrained(str(ws / "other"))
    fp = base_fingerprint(a.model, a.layout)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert base_fingerprint(again.model, again.layout) == fp
    assert base_fingerprint(classifier.model, classifier.layout) == fp  # wrapper class does not matter
    assert base_fingerprint(bf16.model, bf16.layout) == fp  # neither does loading in bfloat16
    assert base_fingerprint(other.model, other.layout) != fp
    a.add_adapter("l", "lora", r=2)
    with torch.no_grad():
        for p in a.adapters.parameters():
            p.add_(0.5)
    a.merge_adapter("l")  # merged weights are not the base's: the original ones are sampled
    assert base_identity(a)["fingerprint"] == fp


def test_adapter_refuses_another_base_of_the_same_shapes(ws, tmp_path):
    from adapterkit.fingerprint import base_fingerprint

    model = AdapterModel.from_pretrained(str(ws / "bert"))
    model.add_adapter("c", "pfeiffer")
    model.add_classification_head("c", num_labels=2)
    model.save_adapter(tmp_path / "c", "c")
    meta = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert meta["base_model"]["fingerprint"] == base_fingerprint(model.model, model.layout)
    assert meta["base_model"]["name"] == str(ws / "bert")

    other = AdapterModel.from_pretrained(str(ws / "other"))
    with pytest.raises(CheckpointError) as err:
        other.load_adapter(tmp_path / "c")
    message = str(err.value)
    assert str(ws / "bert") in message and str(ws / "other") in message and "strict_base=False" in message
    assert "--allow-other-base" in message and len(other.adapters) == 0 and len(other.heads) == 0
    assert other.load_adapter(tmp_path / "c", strict_base=False) == "c"
    AdapterModel.from_pretrained(str(ws / "bert")).load_adapter(tmp_path / "c")  # the right base loads

    # a checkpoint from before fingerprints loads as before
    shutil.copytree(tmp_path / "c", tmp_path / "old")
    del meta["base_model"]["fingerprint"], meta["base_model"]["name"]
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    AdapterModel.from_pretrained(str(ws / "other")).load_adapter(tmp_path / "old")


def test_eval_with_another_model_is_refused_naming_both(ws, capsys):
    data = ["--data", str(ws / "dev.tsv"), "--json"]
    err = one_line_exit_2(run_cli(["eval", "--adapter", str(ws / "run"), "--model", str(ws / "other"), *data]),
                          "--allow-other-base", str(ws / "other"), str(ws / "bert"))
    assert "fingerprint" in err
    assert in_process(capsys, ["eval", "--adapter", str(ws / "run"), "--model", str(ws / "bert"), *data]).returncode == 0
    res = in_process(capsys, ["eval", "--adapter", str(ws / "run"), "--model", str(ws / "other"), "--allow-other-base",
                              *data])
    assert res.returncode == 0, res.stderr
    # predict and merge take the same check and flag
    one_line_exit_2(in_process(capsys, ["predict", "--adapter", str(ws / "run"), "--model", str(ws / "other"),
                                        "good film"]), "--allow-other-base")
    assert json.loads((ws / "run" / "adapter" / "adapterkit_base.json").read_text())["fingerprint"]


def test_new_adapters_and_heads_follow_the_handles_mode(ws, tmp_path):
    model = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    model.add_adapter("a", "pfeiffer", dropout=0.5)
    model.add_classification_head("a", num_labels=2)
    model.save_adapter(tmp_path / "a", "a")
    model.eval()
    model.add_adapter("b", "pfeiffer", dropout=0.5)
    model.add_classification_head("b", num_labels=2, set_active=False)
    model.load_adapter(tmp_path / "a", load_as="a2")
    for name in ("b", "a2"):
        assert not any(m.training for m in model.adapters[name].modules()), name
        assert not any(m.training for m in model.heads[name].modules()), name
    model.set_active_adapters("a2")
    batch = {"input_ids": torch.tensor([[2, 6, 9, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)  # no dropout at inference
    model.train()
    model.add_adapter("c", "pfeiffer")
    assert model.adapters["c"].training


def test_tsv_without_header_is_refused_naming_the_train_file(ws, tmp_path, capsys):
    headless = tmp_path / "headless.tsv"
    headless.write_text("".join(f"{t}\t{y}\n" for t, y in sentiment_rows(40, seed=3)), encoding="utf-8")
    out = tmp_path / "out"
    base = ["train", "--model", str(ws / "bert"), "--train", str(headless), "--out", str(out), *FAST]
    one_line_exit_2(run_cli(base), f"{headless}:1", "looks like data", "header")
    # with --eval, the train file is named, not the eval file
    err = one_line_exit_2(in_process(capsys, base + ["--eval", str(ws / "dev.tsv")]), str(headless))
    assert str(ws / "dev.tsv") not in err
    # string labels: the header's label also occurs in its column
    words = tmp_path / "words.tsv"
    words.write_text("a good film\tpositive\na dull film\tnegative\nfine\tpositive\n", encoding="utf-8")
    one_line_exit_2(in_process(capsys, base[:4] + [str(words)] + base[5:]), "'positive' also occurs")
    assert not out.exists()


def test_eval_file_with_other_columns_names_both_files(ws, tmp_path, capsys):
    dev = write_tsv(tmp_path / "dev.tsv", sentiment_rows(8, seed=4), header=("text", "label"))
    err = one_line_exit_2(in_process(capsys, ["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--eval",
                                   str(dev), "--out", str(tmp_path / "o"), *FAST]),
                          str(dev), "'sentence'", f"training file {ws / 'train.tsv'}")
    assert "same header" in err and not (tmp_path / "o").exists()


def test_reduction_factor_above_the_hidden_size_is_refused(ws, tmp_path):
    one_line_exit_2(run_cli(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out",
                             str(tmp_path / "o"), "--reduction-factor", "64", *FAST]),
                    "--reduction-factor 64 is larger than the hidden size 32")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage,pattern", [
    ("int", r"tensor 'adapter\..*' has dtype int64.*floating point"),
    ("nan", r"tensor 'adapter\..*' holds NaN or infinite values"),
    ("inf_head", r"tensor 'head\..*' holds NaN or infinite values"),
])
def test_checkpoint_tensors_must_be_finite_floats(ws, tmp_path, damage, pattern):
    model = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    model.add_adapter("c", "pfeiffer")
    model.add_classification_head("c", num_labels=2)
    model.save_adapter(tmp_path / "c", "c")
    weights = tmp_path / "c" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.startswith("head." if damage == "inf_head" else "adapter."))
    value = tensors[key]
    tensors[key] = {"int": lambda: value.to(torch.int64),
                    "nan": lambda: value.clone().fill_(float("nan")),
                    "inf_head": lambda: value.clone().fill_(float("inf"))}[damage]()
    save_file(tensors, str(weights))
    fresh = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    with pytest.raises(CheckpointError, match=pattern) as err:
        fresh.load_adapter(tmp_path / "c")
    assert str(weights) in str(err.value) and len(fresh.adapters) == 0 and len(fresh.heads) == 0


def test_float64_checkpoint_is_cast_to_the_models_dtype(ws, tmp_path):
    model = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    model.add_adapter("c", "lora", r=2)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_()
    model.save_adapter(tmp_path / "c", "c")
    weights = tmp_path / "c" / "adapter_model.safetensors"
    save_file({k: v.double() for k, v in load_file(str(weights)).items()}, str(weights))
    fresh = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    fresh.load_adapter(tmp_path / "c")
    for (k, a), b in zip(model.adapters.state_dict().items(), fresh.adapters.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a, b), k


# -- crashes where a one-line error is promised ------------------------------------------------------
def test_max_length_above_the_models_positions_is_refused_before_training(ws, tmp_path, capsys):
    out = tmp_path / "o"
    one_line_exit_2(run_cli(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out", str(out),
                             "--max-length", "1000", *FAST]), "--max-length 1000", "128 tokens")
    assert not out.exists()
    one_line_exit_2(in_process(capsys, ["eval", "--adapter", str(ws / "run"), "--data", str(ws / "dev.tsv"),
                                        "--max-length", "129"]), "--max-length 129", "128")


def _without_root_override() -> list[str]:
    """A prefix that runs a command without root's power to write into read-only folders."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_read_only_out_is_one_line(ws, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "run").mkdir()
    try:
        for folder in (ro / "run", ro):
            folder.chmod(0o555)
        for out in (ro / "new", ro / "run"):
            cmd = [*_without_root_override(), sys.executable, "-m", "adapterkit", "train", "--model", str(ws / "bert"),
                   "--train", str(ws / "train.tsv"), "--out", str(out), *FAST]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            one_line_exit_2(res, f"--out {out}", "cannot write there", "choose a folder you can write to")
        assert sorted(p.name for p in ro.iterdir()) == ["run"] and not any((ro / "run").iterdir())
    finally:
        for folder in (ro, ro / "run"):
            folder.chmod(0o755)


def test_non_utf8_stdin_on_predict_is_one_line(ws):
    res = subprocess.run([sys.executable, "-m", "adapterkit", "predict", "--adapter", str(ws / "run")],
                         input="a good film\nna\xefve\n".encode("latin-1"), capture_output=True, timeout=240)
    res = subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())
    one_line_exit_2(res, "<stdin>:2: not valid UTF-8", "iconv")


def test_wrong_typed_method_options_are_exit_2(ws, tmp_path, capsys):
    args = ["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out", str(tmp_path / "o"), *FAST]
    one_line_exit_2(run_cli(args + ["-o", "layers=all"]), "layers='all'", "should be a list of integers")
    for option, field in [("non_linearity=3", "non_linearity=3"), ('reduction_factor="16"', "reduction_factor='16'")]:
        one_line_exit_2(in_process(capsys, args + ["-o", option]), field, "should be")
    assert not (tmp_path / "o").exists()


def test_wrong_typed_fields_from_the_api_are_adapter_errors(ws):
    model = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    for options in ({"layers": "all"}, {"non_linearity": 3}, {"leave_out": [0, "1"]}, {"dropout": "0.1"}):
        with pytest.raises(AdapterError, match="should be"):
            model.add_adapter("a", "pfeiffer", **options)
    with pytest.raises(AdapterError, match="num_labels='2' should be an integer"):
        model.add_classification_head("h", num_labels="2")
    with pytest.raises(AdapterError, match="should be"):
        model.add_adapter("l", "lora", r=2.5)
    assert len(model.adapters) == 0 and len(model.heads) == 0
    from adapterkit.train import TrainConfig

    with pytest.raises(AdapterError, match="epochs='3' should be an integer"):
        TrainConfig(train=str(ws / "train.tsv"), epochs="3").validate()


def test_failed_merge_keeps_the_previous_output(ws, tmp_path, monkeypatch):
    merged = train_and_merge_lora(ws, tmp_path, 2, FAST)
    run = tmp_path / "lora"  # the run folder train_and_merge_lora trained into
    before = tree(merged)
    import adapterkit.cli

    def broken(*args, **kwargs):
        raise AdapterError("the disk is full")  # any failure while the new folder is filled

    monkeypatch.setattr(adapterkit.cli, "save_head", broken)  # the name merge calls
    assert main(["merge", "--adapter", str(run), "--out", str(merged), "--overwrite"]) == 2
    assert tree(merged) == before  # the old merged model is whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    # --overwrite replaces a model folder only, never a folder of other files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    one_line_exit_2(run_cli(["merge", "--adapter", str(run), "--out", str(mine), "--overwrite"]), "holds no model")
    assert (mine / "notes.txt").read_text() == "x"


# -- smaller -----------------------------------------------------------------------------------------
def test_resumed_metrics_equal_the_uninterrupted_run_and_no_stray_files(ws, tmp_path, monkeypatch):
    from adapterkit.train import TrainConfig, fit, prepare
    from adapterkit.train import loop

    # 96 rows / 16 = 6 steps per epoch, logged every 4: the epoch-end checkpoint at step 6 falls
    # between two records
    cfg = dict(model=str(ws / "bert"), train=str(ws / "train.tsv"), eval=str(ws / "dev.tsv"), epochs=2,
               batch_size=16, lr=1e-2, log_every=4, save_every=100, progress="none")
    ref = tmp_path / "ref"
    fit(prepare(TrainConfig(**cfg)), ref)

    out = tmp_path / "run"
    saved = loop._Runner.save_checkpoint

    def save_then_die(self):
        saved(self)
        if self.state["step"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop._Runner, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(prepare(TrainConfig(**cfg)), out)
    monkeypatch.setattr(loop._Runner, "save_checkpoint", saved)
    (out / f".run.json.tmp-{os.getpid() + 1}").write_text("{")  # a kill inside write_json_atomic
    (out / ".training.png.tmp-4242.png").write_bytes(b"")
    fit(prepare(TrainConfig(**cfg)), out, resume=True)

    def records(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        drop = ("elapsed_s", "examples_per_s")
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]

    assert records(out) == records(ref)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_saved_folders_follow_the_umask(ws, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        model = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
        model.add_adapter("c", "pfeiffer")
        model.save_adapter(tmp_path / "c", "c")
        assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o755
        res = in_process(capsys, ["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--out",
                                  str(tmp_path / "run"), "--epochs", "1", "--progress", "none"])
        assert res.returncode == 0, res.stderr
        for folder in (tmp_path / "run", tmp_path / "run" / "adapter"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    finally:
        os.umask(old)


def test_predict_reads_input_files_like_eval(ws, tmp_path, capsys):
    rows = sentiment_rows(6, seed=7)
    direct = in_process(capsys, ["predict", "--adapter", str(ws / "run"), *[t for t, _ in rows]])
    assert direct.returncode == 0, direct.stderr
    want = direct.stdout.strip().splitlines()
    jsonl = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": t, "label": y} for t, y in rows])
    tsv = write_tsv(tmp_path / "dev.tsv", rows)
    for path in (jsonl, tsv):
        res = in_process(capsys, ["predict", "--adapter", str(ws / "run"), "--input", str(path)])
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines() == want, path  # the sentences, not JSON text or the header
    # stdin: JSON lines are read as rows; a text may hold a line break
    lines = "".join(json.dumps({"sentence": t}) + "\n" for t, _ in rows)
    res = run_cli(["predict", "--adapter", str(ws / "run")], input=lines)
    assert res.stdout.strip().splitlines() == want, res.stderr
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"sentence": "good\nfilm"}])
    res = in_process(capsys, ["predict", "--adapter", str(ws / "run"), "--json", "--input", str(broken)])
    assert res.returncode == 0 and json.loads(res.stdout)["text"] == "good\nfilm", res.stderr
    one_line_exit_2(in_process(capsys, ["predict", "--adapter", str(ws / "run"), "--input", str(jsonl),
                                        "--text-column", "txt"]), "no column 'txt'", "--text-column")


def test_causal_lm_prompt_with_a_line_break_from_jsonl(tmp_path, capsys):
    llama = tiny_llama(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", [{"prompt": "alice met\n", "completion": "bob in paris ."}] * 24)
    run = tmp_path / "lm"
    assert main(["train", "--model", str(llama), "--train", str(tmp_path / "lm.jsonl"), "--method", "parallel",
                 "--out", str(run), "--epochs", "6", "--lr", "2e-2", "--batch-size", "6", "--progress", "none"]) == 0
    write_jsonl(tmp_path / "ask.jsonl", [{"prompt": "alice met\n"}])
    res = in_process(capsys, ["predict", "--adapter", str(run), "--input", str(tmp_path / "ask.jsonl"),
                              "--max-new-tokens", "3", "--json"])
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["text"] == "alice met\n" and row["generated"].startswith("bob in paris")


def test_deleting_the_active_adapter_and_head_gives_the_base_output(ws):
    """Documented behaviour (docs/design.md): no head is active any more, so the call returns the
    wrapped model's own output, equal to the bare base model's, and says so by having no logits."""
    base = T.BertModel.from_pretrained(ws / "bert").eval()
    model = AdapterModel(T.BertModel.from_pretrained(ws / "bert"))
    model.add_adapter("a", "pfeiffer")
    model.add_classification_head("a", num_labels=2)
    model.set_active_adapters("a")
    model.eval()
    model.delete_adapter("a")
    assert model.active_adapters is None and model.active_head is None
    batch = {"input_ids": torch.tensor([[2, 6, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        out = model(**batch)
        assert torch.equal(out.last_hidden_state, base(**batch).last_hidden_state)
    assert not hasattr(out, "logits")
    with pytest.raises(AdapterError, match="No head named 'a'"):
        model(**batch, head="a")
