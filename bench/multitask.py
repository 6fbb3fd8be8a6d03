"""Multi-task without forgetting on real data (issue 13): two adapters on one frozen
all-MiniLM-L6-v2, then AdapterFusion over both on a third task.

The three tasks all come from the SST-2 files in ``../shared/data/sst2`` (the only real text data
on this machine; nothing is copied into the repository). Each is a fixed function of a row:

* **A, sentiment**: SST-2's own label (1 = positive). Trained on a random subset of
  ``train.tsv`` (phrases and sentences), scored on ``test.tsv`` (the GLUE dev set, 872 sentences).
* **B, negation**: 1 when the text holds a negation word (``NEGATIONS``: not, n't, no, never,
  nothing, ...; SST-2 is tokenised, so ``n't`` is a token), else 0. A lexical task with a
  rule-made label, different from sentiment and unknown to A.
* **C, sentiment x negation**: four classes, ``2 * negation + sentiment`` (negative / positive,
  without / with a negation word). Trained on a small subset (``--c-rows``) of ``train.tsv``
  sentences not used for A or B; it needs both what A and what B know.

Steps: train A (Pfeiffer adapter + head) on task A; record A's logits on ``test.tsv``; train B
(Pfeiffer adapter + head) on task B; A's logits again: they must be bit-identical (``torch.equal``),
as must A's adapter and head weights. Then on task C, each with a fresh 4-class head trained for the
same steps and learning rate: A alone (adapter frozen, head trained), B alone (the same), and
``Fuse(A, B)`` (fusion layers and head trained, both adapters frozen). After the fusion run A's
logits are checked once more.

    .venv/bin/python bench/multitask.py                 # the README's run (38 min on 2 shared cores)
    .venv/bin/python bench/multitask.py --quick         # smoke run (tiny step counts)

Writes ``bench/results/multitask.json`` and prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402

from adapterkit import AdapterModel, Fuse  # noqa: E402
from adapterkit.packaged import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"
NEGATIONS = frozenset({"not", "n't", "no", "never", "nothing", "none", "nobody", "nowhere", "neither", "nor",
                       "without", "cannot", "hardly", "barely"})
Row = tuple[str, int]  # (text, SST-2 label)


# -- the tasks -------------------------------------------------------------------------------------------
def negation(text: str) -> int:
    return int(any(token in NEGATIONS for token in text.lower().split()))


TASKS: dict[str, tuple[int, Callable[[Row], int]]] = {  # name -> (classes, label of a row)
    "sentiment": (2, lambda row: row[1]),
    "negation": (2, lambda row: negation(row[0])),
    "sentiment_x_negation": (4, lambda row: 2 * negation(row[0]) + row[1]),
}


def read_tsv(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)  # header: sentence<TAB>label
        for line in f:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            rows.append((text.strip(), int(label)))
    return rows


def encode(tokenizer, rows: list[Row], task: str, max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer([r[0] for r in rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    label = TASKS[task][1]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([label(r) for r in rows])}


def batches(data: dict[str, torch.Tensor], size: int, order: Optional[list[int]] = None):
    n = data["labels"].shape[0]
    order = order if order is not None else list(range(n))
    for start in range(0, len(order), size):
        idx = torch.tensor(order[start:start + size])
        batch = {k: v[idx] for k, v in data.items()}
        width = int(batch["attention_mask"].sum(1).max())  # trim the padding this batch does not need
        yield {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


# -- training and scoring ----------------------------------------------------------------------------
def train(model: AdapterModel, data: dict[str, torch.Tensor], steps: int, lr: float, batch_size: int,
          seed: int) -> float:
    """``steps`` AdamW steps over shuffled epochs of ``data`` on whatever is trainable; seconds taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    n, step, start = data["labels"].shape[0], 0, time.perf_counter()
    while step < steps:
        order = list(range(n))
        rng.shuffle(order)
        for batch in batches(data, batch_size, order):
            if len(batch["labels"]) < batch_size or step >= steps:
                break
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return time.perf_counter() - start


@torch.no_grad()
def logits_on(model: AdapterModel, data: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    out = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches(data, 64)]
    return torch.cat(out)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(-1)
    f1s = []
    for c in range(logits.shape[-1]):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": float((pred == labels).float().mean()), "macro_f1": sum(f1s) / len(f1s)}


def state(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in {**model.adapters[name].state_dict(),
                                     **{f"head.{k}": v for k, v in model.heads[name].state_dict().items()}}.items()}


# -- the run --------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--a-rows", type=int, default=8000)
    ap.add_argument("--b-rows", type=int, default=4000)
    ap.add_argument("--c-rows", type=int, default=2000)
    ap.add_argument("--a-steps", type=int, default=150)
    ap.add_argument("--b-steps", type=int, default=80)
    ap.add_argument("--c-steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 steps each, 200 test rows")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "multitask.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.a_steps = args.b_steps = args.c_steps = 8
    if not (args.data / "train.tsv").is_file():
        print(f"No SST-2 at {args.data}: pass --data FOLDER (train.tsv, test.tsv).", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    train_rows, test_rows = read_tsv(args.data / "train.tsv"), read_tsv(args.data / "test.tsv")
    if args.quick:
        test_rows = test_rows[:200]
    rng = random.Random(args.seed)
    rng.shuffle(train_rows)
    rows_a = train_rows[:args.a_rows]
    rows_b = train_rows[args.a_rows:args.a_rows + args.b_rows]
    # C trains on sentences (five words or more) neither A nor B saw
    rows_c = [r for r in train_rows[args.a_rows + args.b_rows:] if len(r[0].split()) >= 5][:args.c_rows]
    tok = load_tokenizer("minilm")
    enc = lambda rows, task: encode(tok, rows, task, args.max_length)  # noqa: E731
    test = {task: enc(test_rows, task) for task in TASKS}
    result: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "torch_threads": torch.get_num_threads(), "test_rows": len(test_rows)}
    result["label_shares"] = {task: [float((test[task]["labels"] == c).float().mean()) for c in range(TASKS[task][0])]
                              for task in TASKS}

    model = AdapterModel.from_pretrained("minilm")
    for name, task, rows, steps in (("A", "sentiment", rows_a, args.a_steps), ("B", "negation", rows_b, args.b_steps)):
        model.add_adapter(name, "pfeiffer")
        model.add_classification_head(name, TASKS[task][0])
        model.train_adapter(name)
        seconds = train(model, enc(rows, task), steps, args.lr, args.batch_size, args.seed)
        model.set_active_adapters(name)
        logits = logits_on(model, test[task])
        result[name] = {"task": task, "steps": steps, "train_seconds": round(seconds, 1),
                        **scores(logits, test[task]["labels"])}
        print(f"{name} ({task}): {result[name]}", flush=True)
        if name == "A":
            a_logits, a_state = logits, state(model, "A")

    def a_unchanged(when: str) -> bool:
        model.set_active_adapters("A")
        same = torch.equal(logits_on(model, test["sentiment"]), a_logits)
        weights = all(torch.equal(v, state(model, "A")[k]) for k, v in a_state.items())
        print(f"A's test logits bit-identical {when}: {same}; A's weights identical: {weights}", flush=True)
        return same and weights

    result["A_identical_after_B"] = a_unchanged("after training B")
    task, data_c = "sentiment_x_negation", enc(rows_c, "sentiment_x_negation")
    result["C"] = {"task": task, "train_rows": len(rows_c), "steps": args.c_steps}
    for label, setup in (("A alone", "A"), ("B alone", "B"), ("Fuse(A, B)", Fuse("A", "B"))):
        head = f"C_{label.split()[0].replace('(', '_').replace(',', '').replace(')', '')}"
        model.add_classification_head(head, TASKS[task][0], set_active=False)
        torch.manual_seed(args.seed)
        if isinstance(setup, Fuse):
            model.add_adapter_fusion(setup)
            model.train_adapter_fusion(setup, head=head)
        else:
            model.train_adapter(setup, train_head=False)  # activates and freezes; then only the new head trains
            for p in model.adapters.parameters():
                p.requires_grad_(False)
            model.heads[head].requires_grad_(True)
            model.active_head = head
        seconds = train(model, data_c, args.c_steps, args.lr, args.batch_size, args.seed)
        model.set_active_adapters(setup)
        model.active_head = head
        result["C"][label] = {"train_seconds": round(seconds, 1),
                              **scores(logits_on(model, test[task]), test[task]["labels"])}
        print(f"C ({task}), {label}: {result['C'][label]}", flush=True)
    result["A_identical_after_fusion"] = a_unchanged("after training Fuse(A, B)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    c = result["C"]
    print("\n| model | task | test accuracy | macro-F1 |\n|---|---|---:|---:|")
    for name in ("A", "B"):
        print(f"| {name} alone | {result[name]['task']} | {result[name]['accuracy']:.4f} | {result[name]['macro_f1']:.4f} |")
    for label in ("A alone", "B alone", "Fuse(A, B)"):
        print(f"| {label} + new head | {task} | {c[label]['accuracy']:.4f} | {c[label]['macro_f1']:.4f} |")
    ok = result["A_identical_after_B"] and result["A_identical_after_fusion"]
    print(f"\nA bit-identical after B and after the fusion: {ok}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
