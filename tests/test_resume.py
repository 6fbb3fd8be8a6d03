"""``--resume``: a run interrupted by Ctrl-C or ``kill -9`` continues from its last checkpoint and
ends with the same adapter (to 1e-6) and the same metrics as an uninterrupted run with the seed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainkit import run_cli, sentiment_rows, tiny_bert, write_tsv


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tiny_bert(d / "bert", dropout=0.1)  # dropout on: resuming must restore the RNG too
    write_tsv(d / "train.tsv", sentiment_rows(320, seed=0))
    write_tsv(d / "dev.tsv", sentiment_rows(40, seed=1))
    return d


def args(ws: Path, out: Path) -> list[str]:
    return ["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--eval", str(ws / "dev.tsv"),
            "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "5e-3", "--save-every", "6",
            "--log-every", "3", "--progress", "log"]


def _as_in_a_terminal() -> None:
    # A shell starts background jobs (`cmd &`, as CI runners may) with SIGINT ignored, and a child
    # inherits that: Python then installs no KeyboardInterrupt handler and Ctrl-C does nothing.
    # The test plays a user's Ctrl-C in a terminal, so the run starts with SIGINT's default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "adapterkit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_in_a_terminal)


def checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> int:
    end = time.time() + timeout
    while time.time() < end:
        s = checkpoint_step(out)
        if s >= step:
            return s
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail(f"no checkpoint at step {step} within {timeout} s")


def records(out: Path) -> list[dict]:
    drop = ("elapsed_s", "examples_per_s")
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_runs_resume_to_the_same_adapter(ws, tmp_path):
    ref = tmp_path / "ref"
    done = run_cli(args(ws, ref))
    assert done.returncode == 0, done.stderr

    out = tmp_path / "run"
    # 1. Ctrl-C: exit 130, with the command that continues the run
    proc = start(args(ws, out))
    wait_for_step(proc, out, 12)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"adapterkit train --resume {out}" in err
    # 2. resume, then kill -9 in the middle of the second epoch
    proc = start(["train", "--resume", str(out), "--progress", "log"])
    wait_for_step(proc, out, 54)
    proc.kill()
    proc.wait(timeout=30)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    # a death between the two renames of a checkpoint swap leaves only the previous folder, and a
    # death while writing leaves a partial temporary folder: neither must matter
    os.replace(out / "checkpoint", out / ".checkpoint.old-4242")
    (out / ".checkpoint.tmp-junk").mkdir()
    (out / ".checkpoint.tmp-junk" / "state.json").write_text("{trunc")
    # 3. resume to the end
    res = run_cli(["train", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    assert "resuming at step" in res.stderr

    want = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(want) == sorted(got)
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert records(out) == records(ref)  # same losses, evaluations and best steps, no duplicates
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_resume_refuses_changed_settings_and_data(ws, tmp_path):
    out = tmp_path / "run"
    proc = start(args(ws, out))
    wait_for_step(proc, out, 6)
    proc.kill()
    proc.wait(timeout=30)
    res = run_cli(["train", "--resume", str(out), "--lr", "1e-1"])
    assert res.returncode == 2 and "--lr differ" in res.stderr and res.stderr.strip().count("\n") == 0
    data = tmp_path / "train.tsv"
    shutil.copy(ws / "train.tsv", data)
    run = json.loads((out / "run.json").read_text())
    run["config"]["train"] = str(data)
    run["data"]["train"]["sha256"] = "0" * 64  # as if the file had been edited since
    (out / "run.json").write_text(json.dumps(run))
    res = run_cli(["train", "--resume", str(out)])
    assert res.returncode == 2 and "changed since the run started" in res.stderr
