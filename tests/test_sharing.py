"""Sharing adapters: push -> ls -> pull -> load through an S3 API, a static HTTP server and a Hub
endpoint (all real servers on 127.0.0.1), the verified cache, and publishing's refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from sharing_helpers import hub_server, s3_server, static_server

from adapterkit import AdapterModel, cli
from adapterkit.errors import AdapterError, CheckpointError
from adapterkit.sharing import cache, ls, pull, push

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"
BASE = FIXTURES / "bases" / "bert"
FOREIGN = {"peft": FIXTURES / "peft_bert_lora_cls" / "adapter", "adapterhub": FIXTURES / "ah_bert_seqbn_cls" / "adapter"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def base_model() -> AdapterModel:
    return AdapterModel(T.AutoModel.from_pretrained(BASE, local_files_only=True).eval())


def kit_adapter(folder: Path, seed: int = 1) -> Path:
    model = base_model()
    model.add_adapter("sent", "pfeiffer")
    model.add_classification_head("sent", 2)
    torch.manual_seed(seed)
    for p in list(model.adapters.parameters()) + list(model.heads.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    model.save_adapter(folder, "sent")
    return folder


def sources(tmp_path: Path) -> dict[str, Path]:
    return {"adapterkit": kit_adapter(tmp_path / "src" / "sent"), **FOREIGN}


INPUTS = {"input_ids": torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0)),
          "attention_mask": torch.ones(3, 7, dtype=torch.long)}


def loaded(where) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The adapter's (and head's) tensors and the model's logits with it loaded from ``where``."""
    model = base_model()
    name = model.load_adapter(where, set_active=True, load_as="x")
    model.eval()
    with torch.no_grad():
        logits = model(**INPUTS).logits
    state = {k: v.clone() for k, v in model.state_dict().items() if name in k}
    return state, logits


def assert_identical(a, b) -> None:
    (sa, la), (sb, lb) = a, b
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(la, lb)


@pytest.mark.parametrize("fmt", ["adapterkit", "peft", "adapterhub"])
def test_push_ls_pull_load_through_s3_is_bit_identical(fmt, tmp_path):
    src = sources(tmp_path)[fmt]
    local = loaded(src)
    with s3_server():
        info = push(src, f"s3://adapters/team/{fmt}")
        assert info["format"] == fmt and info["files"] >= 3  # weights, config, card
        rows = ls("s3://adapters/team")
        assert [r["location"] for r in rows] == [f"s3://adapters/team/{fmt}"]
        assert rows[0]["method"] and rows[0]["size"] > 0 and rows[0]["created"]
        fetched = pull(f"s3://adapters/team/{fmt}")
        assert not fetched.hit
        for name in os.listdir(src):
            assert (fetched.folder / name).read_bytes() == (src / name).read_bytes()
        assert_identical(loaded(f"s3://adapters/team/{fmt}"), local)
        assert pull(f"s3://adapters/team/{fmt}").hit  # the second time from the cache


def test_http_file_and_hub_locations_load_identically(tmp_path, monkeypatch):
    src = sources(tmp_path)["adapterkit"]
    local = loaded(src)
    push(src, str(tmp_path / "www" / "sent"))  # a plain folder with a manifest, served statically
    assert_identical(loaded(f"file://{tmp_path / 'www' / 'sent'}"), local)
    with static_server(tmp_path / "www") as url:
        assert_identical(loaded(f"{url}/sent"), local)
        with pytest.raises(AdapterError, match="read only"):
            push(src, f"{url}/other")
    hub = tmp_path / "hub"
    push(src, str(hub / "org" / "adapters" / "sst2"))
    shutil.copytree(FOREIGN["peft"], hub / "org" / "peft-lora")  # published by PEFT: no manifest
    with hub_server(hub) as (url, seen):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert_identical(loaded("hf://org/adapters@main/sst2"), local)
        assert all(auth == "Bearer hf_secret" for _, auth in seen)
        assert [r["location"] for r in ls("hf://org/adapters")] == ["hf://org/adapters@main/sst2"]
        assert_identical(loaded("hf://org/peft-lora"), loaded(FOREIGN["peft"]))
        with pytest.raises(AdapterError, match="no adapter there"):
            pull("hf://org/adapters@main/missing")
        push(src, "hf://org/pushed/sst2")  # through huggingface_hub's create_repo + create_commit
        assert (hub / "org" / "pushed" / "sst2" / "adapterkit_manifest.json").is_file()
        assert_identical(loaded("hf://org/pushed/sst2"), local)
        with pytest.raises(AdapterError, match="--overwrite"):
            push(src, "hf://org/pushed/sst2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # server gone: the cache answers, or a clear error
    assert_identical(loaded("hf://org/adapters@main/sst2"), local)
    with pytest.raises(AdapterError, match="HF_HUB_OFFLINE"):
        pull("hf://org/other")


def test_tampered_file_is_refused_by_name_and_not_cached(tmp_path):
    src = sources(tmp_path)["adapterkit"]
    with s3_server():
        push(src, "s3://adapters/sent")
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
        manifest = json.loads(fs.cat_file("adapters/sent/adapterkit_manifest.json"))
        blob = f"adapters/sent/.adapterkit/blobs/{manifest['files']['adapter_model.safetensors']['sha256']}"
        data = bytearray(fs.cat_file(blob))
        data[-1] ^= 1
        fs.pipe_file(blob, bytes(data))
        with pytest.raises(CheckpointError, match="'adapter_model.safetensors' has SHA-256"):
            base_model().load_adapter("s3://adapters/sent")
        assert cache.entries() == []
    # a file changed inside the cache is noticed too: the next use fetches a good copy again
    push(src, str(tmp_path / "pub"))
    with static_server(tmp_path) as url:
        first = pull(f"{url}/pub").folder
        (first / "adapter_model.safetensors").write_bytes(b"garbage")
        again = pull(f"{url}/pub")
        assert not again.hit and load_file(str(again.folder / "adapter_model.safetensors"))


def test_publishing_over_an_adapter_needs_overwrite_and_readers_never_see_a_mix(tmp_path):
    one, two = kit_adapter(tmp_path / "one", seed=1), kit_adapter(tmp_path / "two", seed=2)
    weights = [(f / "adapter_model.safetensors").read_bytes() for f in (one, two)]
    with s3_server():
        push(one, "s3://adapters/sent")
        with pytest.raises(AdapterError, match="--overwrite"):
            push(two, "s3://adapters/sent")
        seen, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                folder = pull("s3://adapters/sent").folder
                seen.append((folder / "adapter_model.safetensors").read_bytes())

        thread = threading.Thread(target=reader)
        thread.start()
        for i in range(6):
            push((one, two)[i % 2], "s3://adapters/sent", overwrite=True)
        stop.set()
        thread.join()
        assert seen and all(w in weights for w in seen)
        assert pull("s3://adapters/sent").folder.joinpath("adapter_model.safetensors").read_bytes() == weights[1]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="other files"):
        push(one, str(tmp_path / "busy"), overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    push(one, str(tmp_path / "pub"))
    with pytest.raises(AdapterError, match="--overwrite"):
        push(two, str(tmp_path / "pub"))
    push(two, str(tmp_path / "pub"), overwrite=True)
    assert (tmp_path / "pub" / "adapter_model.safetensors").read_bytes() == weights[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def _pull_process(location: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adapterkit", "pull", location], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_during_pull_leaves_nothing_a_load_accepts_and_concurrent_pulls_succeed(tmp_path):
    src = sources(tmp_path)["adapterkit"]
    push(src, str(tmp_path / "www" / "sent"))
    env = {**os.environ, "ADAPTERKIT_CACHE": str(tmp_path / "cache")}
    root = tmp_path / "cache"
    with static_server(tmp_path / "www", delay=0.4) as url:
        proc = _pull_process(f"{url}/sent", env)
        deadline = time.time() + 60
        while not any((root / "tmp").glob("*/*")) and time.time() < deadline:  # a file is downloaded
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert any((root / "tmp").iterdir())  # the partial download is there...
        assert not any((root / "adapters").iterdir())  # ...but nothing a load would use
        assert cache.lookup(f"{url}/sent") is None and cache.entries() == []
        assert cache.prune()["partial"] == 1 and not any((root / "tmp").iterdir())
        procs = [_pull_process(f"{url}/sent", env) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        folders = {out.strip() for out, _ in outs}
        assert len(folders) == 1
        assert_identical(loaded(f"{url}/sent"), loaded(src))


def test_base_fingerprint_and_pickle_refusals_apply_to_remote_adapters(tmp_path):
    src = sources(tmp_path)["adapterkit"]
    pickled = FIXTURES / "ah_bert_seqbn_lnbefore_pooler_bin" / "adapter"
    with s3_server():
        push(src, "s3://adapters/sent")
        push(pickled, "s3://adapters/pickled")
        other = T.AutoModel.from_config(T.AutoConfig.from_pretrained(BASE))  # same shapes, other weights
        with pytest.raises(CheckpointError, match="fingerprint|trained on"):
            AdapterModel(other).load_adapter("s3://adapters/sent")
        with pytest.raises(CheckpointError, match="pickle|\\.bin"):
            base_model().load_adapter("s3://adapters/pickled")
        assert base_model().load_adapter("s3://adapters/pickled", allow_pickle=True)


def test_model_card_and_push_adapter_from_python(tmp_path):
    run = tmp_path / "run"
    kit_adapter(run / "adapter")
    (run / "run.json").write_text(json.dumps({"config": {"model": str(BASE), "method": "pfeiffer", "epochs": 2,
                                                         "train": "sst2/train.tsv"}, "data": {"train": "sst2/train.tsv"}}))
    (run / "results.json").write_text(json.dumps({"metric": "accuracy", "eval": {"accuracy": 0.875}, "steps": 40}))
    push(run, str(tmp_path / "pub"))
    text = (tmp_path / "pub" / "README.md").read_text()
    front = text.split("---")[1]
    assert "library_name: adapterkit" in front and f'base_model: "{BASE}"' in front
    assert 'tags: ["adapterkit", "adapter", "bottleneck"]' in front
    assert 'datasets: ["sst2/train.tsv"]' in front and 'metrics: ["accuracy"]' in front
    assert "adapterkit train --model" in text and "--epochs 2" in text and "| eval | accuracy | 0.875 |" in text
    model = base_model()
    model.add_adapter("x", "lora")
    model.add_classification_head("x", 2)
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.set_active_adapters("x")
    model.eval()
    with torch.no_grad():
        mine = model(**INPUTS).logits
    info = model.push_adapter("x", str(tmp_path / "pub2"))
    assert info["name"] == "x" and info["method"] == "lora"
    assert torch.equal(loaded(str(tmp_path / "pub2"))[1], mine)


def test_cli_push_ls_pull_cache(tmp_path, capsys):
    src = sources(tmp_path)["adapterkit"]
    with s3_server():
        assert cli.main(["push", str(src), "s3://adapters/a"]) == 0
        assert "published sent" in capsys.readouterr().out
        assert cli.main(["push", str(src), "s3://adapters/a"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--overwrite" in err
        assert cli.main(["ls", "s3://adapters", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[0]["location"] == "s3://adapters/a" and rows[0]["method"] == "bottleneck"
        assert cli.main(["pull", "s3://adapters/a"]) == 0
        folder = Path(capsys.readouterr().out.strip())
        assert (folder / "adapter_config.json").is_file()
        assert cli.main(["inspect", "s3://adapters/a"]) == 0  # --adapter / PATH arguments take locations
        assert "bottleneck" in capsys.readouterr().out
        assert cli.main(["convert", "s3://adapters/a", str(tmp_path / "copy"), "--to", "adapterkit",
                         "--model", str(BASE)]) == 0
        assert "converted bottleneck adapter 'sent'" in capsys.readouterr().out
        assert cli.main(["cache", "ls"]) == 0
        assert "s3://adapters/a" in capsys.readouterr().out
        assert cli.main(["cache", "rm", "s3://adapters/a"]) == 0
        assert not folder.exists()
        assert cli.main(["cache", "prune"]) == 0
        assert cli.main(["pull", "s3://adapters/none"]) == 2
        assert "no adapter there" in capsys.readouterr().err
