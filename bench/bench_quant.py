"""Adapters on a quantized all-MiniLM-L6-v2 (int8, int4) against float32: one process, one table.

    python bench/bench_quant.py                # batch 32 x 128 tokens, 5 rounds, 1 thread
    python bench/bench_quant.py --quick        # smoke run: batch 4 x 32, 2 rounds
    python bench/bench_quant.py --json q.jsonl # also write the rows as JSON lines

Rows: inference (``inference_mode``) of the bare model and with a Pfeiffer / a LoRA (q, v) adapter
on the float32, int8 and int4 base; a training step (forward, backward, AdamW) with LoRA on each
base and the float32 *floor* (every weight frozen, the backward forced through every layer: what
any adapter below the top pays); the base's weight memory (``quantization.weight_bytes``: the
quantized tensors' data and scales); and quality: the cosine of mean-pooled sentence embeddings of
SST-2 dev sentences against float32 (the issue's measure), mean and minimum.

Every configuration is built once, then all are timed in rounds (A B C A B C ...) and the median
is quoted. With ``--threads 1`` (default) the process's CPU time measures the work even on a
shared machine; wall time is printed too. Inference rows are judged against the float32 bare
model, training rows against the float32 floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers

from adapterkit import AdapterModel
from adapterkit.packaged import resolve_model
from adapterkit.quantization import quantize_base, weight_bytes

#: SST-2's dev split: $SST2_DIR, else ../shared/data/sst2 beside the checkout (or beside its worktree folder)
SST2_DEV = next((p / "dev.tsv" for p in (Path(os.environ.get("SST2_DIR", "/nonexistent")),
                                        *(Path(__file__).resolve().parents[i] / "shared" / "data" / "sst2" for i in (2, 3)))
                 if (p / "dev.tsv").is_file()), Path("sst2/dev.tsv"))
SCHEMES = ("float32", "int8", "int4")
TARGETS = {"int8-pfeiffer-infer": 0.65, "int8-lora-infer": 0.65}
MEMORY_TARGETS = {"int8": 0.30, "int4": 0.20}

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore")


def load_base(scheme: str) -> torch.nn.Module:
    folder, _ = resolve_model("minilm")
    base = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return quantize_base(base, None if scheme == "float32" else scheme)


def make_batch(batch: int, seq_len: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _infer(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(**batch)

    return step


def _train(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        out = model(**batch)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        hidden.float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def build(scheme: str, what: str, mode: str, batch: dict) -> Callable[[], None]:
    base = load_base(scheme)
    if what == "floor":
        base.requires_grad_(False)
        base.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        base.train()
        return _train(base, batch)
    model = AdapterModel(base)
    if what != "bare":
        model.add_adapter("a", what, set_active=True)
    if mode == "train":
        model.train_adapter("a")
        return _train(model, batch)
    model.eval()
    return _infer(model, batch)


def cases() -> list[tuple[str, str, str]]:
    rows = [(s, w, "infer") for s in SCHEMES for w in ("bare", "pfeiffer", "lora")]
    rows += [("float32", "floor", "train")] + [(s, "lora", "train") for s in SCHEMES]
    return rows


def time_all(built: dict, rounds: int, per_round: int) -> dict:
    samples: dict = {k: [] for k in built}
    for step in built.values():  # warm-up
        step()
    for _ in range(rounds):
        for key, step in built.items():
            n = per_round if key.endswith("infer") else 1
            for _ in range(n):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                step()
                samples[key].append((time.process_time() - cpu0, time.perf_counter() - wall0))
    return {k: {"cpu": statistics.median(c for c, _ in v), "wall": statistics.median(w for _, w in v)}
            for k, v in samples.items()}


def sentences(n: int) -> list[str]:
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines[:n]]


@torch.no_grad()
def embedding_quality(n: int, seq_len: int) -> dict:
    """Mean-pooled sentence embeddings of ``n`` SST-2 dev sentences: cosine to float32's."""
    folder, _ = resolve_model("minilm")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tok(sentences(n), padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = {}
    for scheme in SCHEMES:
        hidden = load_base(scheme)(**enc).last_hidden_state
        pooled[scheme] = (hidden * mask).sum(1) / mask.sum(1)
    out = {}
    for scheme in SCHEMES[1:]:
        cos = torch.nn.functional.cosine_similarity(pooled[scheme], pooled["float32"], dim=-1)
        out[scheme] = {"mean": cos.mean().item(), "min": cos.min().item()}
    return out


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = load_base("float32").config.vocab_size
    batch = make_batch(args.batch, args.seq_len, vocab)
    built = {}
    for scheme, what, mode in cases():
        torch.manual_seed(0)
        built[f"{scheme}-{what}-{mode}"] = build(scheme, what, mode, batch)
    times = time_all(built, args.rounds, args.infer_per_round)
    rows = []
    for key, t in times.items():
        ref = times["float32-bare-infer"] if key.endswith("infer") else times["float32-floor-train"]
        rows.append({"row": key, "cpu_ms": 1e3 * t["cpu"], "wall_ms": 1e3 * t["wall"],
                     "vs": "float32 bare" if key.endswith("infer") else "float32 floor",
                     "ratio_cpu": t["cpu"] / ref["cpu"], "ratio_wall": t["wall"] / ref["wall"],
                     "target": TARGETS.get(key)})
    full = weight_bytes(load_base("float32"))
    for scheme in SCHEMES[1:]:
        size = weight_bytes(load_base(scheme))
        rows.append({"row": f"{scheme}-weights", "bytes": size, "ratio": size / full,
                     "target": MEMORY_TARGETS[scheme]})
    rows.append({"row": "float32-weights", "bytes": full, "ratio": 1.0})
    quality = embedding_quality(args.sentences, args.seq_len)
    for scheme, q in quality.items():
        rows.append({"row": f"{scheme}-embedding-cosine", **q})
    return rows


def table(rows: list[dict], args) -> str:
    head = (f"all-MiniLM-L6-v2, batch {args.batch} x {args.seq_len}, {args.threads} thread(s), {args.rounds} rounds, "
            f"load average {os.getloadavg()[0]:.2f}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines = [head, "", "| row | CPU ms | wall ms | vs | ratio (CPU) | ratio (wall) | target |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "cpu_ms" in r:
            target = f"<= {r['target']:.2f}" if r.get("target") else ""
            lines.append(f"| {r['row']} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | {r['vs']} | {r['ratio_cpu']:.2f} | "
                         f"{r['ratio_wall']:.2f} | {target} |")
    lines += ["", "| base weights | MB | vs float32 | target |", "|---|---:|---:|---:|"]
    for r in rows:
        if "bytes" in r:
            target = f"<= {r['target']:.2f}" if r.get("target") else ""
            lines.append(f"| {r['row']} | {r['bytes'] / 2**20:.1f} | {r['ratio']:.3f} | {target} |")
    lines += ["", f"| embedding cosine to float32 ({args.sentences} SST-2 dev sentences) | mean | min |", "|---|---:|---:|"]
    for r in rows:
        if "mean" in r:
            lines.append(f"| {r['row']} | {r['mean']:.4f} | {r['min']:.4f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--infer-per-round", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sentences", type=int, default=256, help="SST-2 dev sentences for the embedding cosine")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4 x 32, 2 rounds, 32 sentences")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.rounds, args.infer_per_round, args.sentences = 4, 32, 2, 1, 32
    rows = run(args)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
