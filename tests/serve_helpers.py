"""Tiny saved models and adapters, and a real uvicorn server on 127.0.0.1, for the serve tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from adapterkit import AdapterModel
from adapterkit.loader import load_tokenizer
from adapterkit.serve.engine import build_engine
from adapterkit.serve.config import ServeConfig

VOCAB = 30522  # the minilm tokenizer's


def save_base(folder: Path, config: transformers.PretrainedConfig, cls) -> Path:
    torch.manual_seed(0)
    cls(config).save_pretrained(folder)
    load_tokenizer("minilm").save_pretrained(folder)
    return folder


def make_encoder(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny BERT folder and adapters saved from it: two classifiers with different label sets,
    a tagger, a regressor, one without a head, and 'extra' (for hot loading)."""
    base = save_base(root / "bert", transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB),
        transformers.BertModel)
    model = AdapterModel.from_pretrained(str(base))
    model.add_adapter("sent", "pfeiffer")
    model.add_classification_head("sent", 2, id2label={0: "negative", 1: "positive"})
    model.add_adapter("topic", "lora", r=4)
    model.add_classification_head("topic", 4)
    model.add_adapter("ner", "ia3")
    model.add_tagging_head("ner", 3, id2label={0: "O", 1: "PER", 2: "LOC"})
    model.add_adapter("score", "houlsby")
    model.add_regression_head("score")
    model.add_adapter("nohead", "lora")
    model.add_adapter("extra", "parallel")
    model.add_classification_head("extra", 3, multilabel=True)
    torch.manual_seed(1)
    for p in list(model.adapters.parameters()) + list(model.heads.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    dirs = {}
    for name in model.adapters:
        dirs[name] = root / ("hot" if name == "extra" else "adapters") / name  # hot/: the allowed root
        model.save_adapter(dirs[name], name)
    return base, dirs


def make_decoder(root: Path) -> tuple[Path, dict[str, Path]]:
    base = save_base(root / "llama", transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128), transformers.LlamaForCausalLM)
    model = AdapterModel.from_pretrained(str(base))
    model.add_adapter("poet", "lora", r=4)
    torch.manual_seed(2)
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.save_adapter(root / "gen" / "poet", "poet")
    return base, {"poet": root / "gen" / "poet"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """``create_app`` under a real uvicorn on a free port, in a thread; a context manager."""

    def __init__(self, config: ServeConfig):
        import uvicorn

        from adapterkit.serve.app import create_app
        from adapterkit.serve.connections import uvicorn_config

        self.app = create_app(build_engine(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, replace(config, host="127.0.0.1", port=self.port),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
