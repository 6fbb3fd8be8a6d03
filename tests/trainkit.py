"""Tiny models and data files for the training-workflow tests (CLI, loop, resume, DDP, Trainer).

``tiny_bert(path)`` saves a 2-layer BERT (hidden 32) with a small WordPiece vocabulary and its
``BertTokenizerFast``; ``tiny_llama(path)`` a 2-layer Llama with a word-level tokenizer. Both load
with ``AdapterModel.from_pretrained(path)`` / ``adapterkit train --model path`` in well under a
second, so the whole workflow runs in tests without the real models.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import transformers as T

REPO = Path(__file__).resolve().parents[1]

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "warm", "bright", "smart", "moving"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "poor", "flat", "grim", "silly", "tired"]
NEUTRAL = ["the", "a", "film", "movie", "story", "plot", "is", "was", "very", "quite", "and", "acting", "cast", "it"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL + ["paris", "london", "alice", "bob", "visited", "met", "in"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert(path: Path, *, dropout: float = 0.0, layers: int = 2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + WORDS + ["##s", "##ly"]
    if int(T.__version__.split(".")[0]) >= 5:  # transformers 5 takes the vocabulary itself
        tok = T.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    else:  # 4.57 reads it from a vocab.txt
        (path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        tok = T.BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    config = T.BertConfig(vocab_size=len(SPECIAL) + len(WORDS) + 2, hidden_size=32, num_hidden_layers=layers,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    import torch

    torch.manual_seed(0)
    T.BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS + ["?", ".", ":"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                    unk_token="<unk>")
    config = T.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True,
                           initializer_range=0.5)  # large enough embeddings for confident logits
    import torch

    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(NEUTRAL, 2) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows: Sequence[Sequence[Any]], header: Sequence[str] = ("sentence", "label")) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(args: Sequence[str], *, cwd: Optional[Path] = None, timeout: int = 240, input: Optional[str] = None,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python -m adapterkit ARGS`` in a subprocess (exit code, stdout, stderr as text)."""
    import os

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "adapterkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, input=input, env=full_env)


def train_and_merge_lora(ws: Path, tmp_path: Path, rank: int, fast: Sequence[str]) -> Path:
    """Train a LoRA adapter with the CLI on ``ws``'s tiny BERT and ``merge`` it; the merged folder."""
    from adapterkit.cli import main

    run = tmp_path / "lora"
    assert main(["train", "--model", str(ws / "bert"), "--train", str(ws / "train.tsv"), "--method", "lora",
                 "--lora-r", str(rank), "--out", str(run), *fast]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--out", str(merged)]) == 0
    return merged
