"""Many adapters over one base in one process: what each loaded adapter costs (one table).

    python bench/bench_pool.py                  # MiniLM-shaped random model, batch 32 x 128, pools 8 / 128 / 1024
    python bench/bench_pool.py --quick          # smoke run: batch 8 x 16, pools 8 / 64
    python bench/bench_pool.py --pools 8 128 1024 10000 --methods lora

One model per method grows through the pool sizes. At each size the table gives:

* ``MB/adapter`` and ``x weights``: the resident memory (RSS) the pool added since the bare
  model, per adapter, against the bytes of one adapter's weights;
* ``add ms`` / ``load ms``: one ``add_adapter`` / one ``load_adapter`` at this pool size (the
  median of a few; they should be flat in the pool size);
* ``routed k / one``: a routed batch (``adapter_names=``) over k = 1, 8, 32 distinct adapters
  against the same batch through one active adapter, timed in interleaved rounds (medians), so
  the ratio shows what routing costs, and whether it grows with the number loaded.

The model is all-MiniLM-L6-v2's shape (6 layers, 384 wide) from ``from_config``: random weights
time the same as the real ones. The machine these figures come from is shared: read them as
loaded-machine figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers as T

from adapterkit import AdapterModel

OPTIONS = {"lora": {"r": 8}, "pfeiffer": {}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def minilm(layers: int = 6, width: int = 384) -> AdapterModel:
    cfg = T.BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=12,
                       intermediate_size=4 * width, vocab_size=30522)
    torch.manual_seed(0)
    return AdapterModel(T.BertModel(cfg)).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_rounds(model: AdapterModel, ids: torch.Tensor, pool: int, rounds: int) -> dict[str, float]:
    """Median seconds of: one active adapter, routed over 1, 8 and 32 distinct adapters."""
    batch = ids.shape[0]
    cases = {
        "one": None,
        "routed 1": ["a0"] * batch,
        "routed 8": [f"a{(i % 8) * (pool // 8)}" for i in range(batch)],
        "routed 32": [f"a{(i % 32) * max(pool // 32, 1) % pool}" for i in range(batch)],
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for _ in range(rounds):
            for label, names in cases.items():
                if names is None:
                    model.set_active_adapters("a0")
                    samples[label].append(timed(lambda: model(input_ids=ids)))
                    model.set_active_adapters(None)
                else:
                    samples[label].append(timed(lambda: model(input_ids=ids, adapter_names=names)))
    return {k: statistics.median(v) for k, v in samples.items()}


def grow(method: str, pools: list[int], ids: torch.Tensor, rounds: int, folder: str) -> list[dict]:
    gc.collect()
    model = minilm()
    # one adapter added, saved, routed and deleted before the bare figure: one-off costs (imports,
    # the first forward's buffers) are not charged to the pool
    model.add_adapter("warm", method, **OPTIONS[method])
    weight_mb = sum(p.numel() * p.element_size() for p in model.adapters["warm"].parameters()) / 2**20
    model.save_adapter(os.path.join(folder, method), "warm")
    with torch.inference_mode():
        model(input_ids=ids, adapter_names=["warm"] * ids.shape[0])
    model.delete_adapter("warm")
    gc.collect()
    bare = rss_mb()
    rows, n = [], 0
    for pool in pools:
        while n < pool:
            model.add_adapter(f"a{n}", method, **OPTIONS[method])
            n += 1
        gc.collect()
        per_adapter = (rss_mb() - bare) / pool
        adds, loads = [], []
        for i in range(5):
            adds.append(timed(lambda: model.add_adapter("extra", method, **OPTIONS[method])))
            model.delete_adapter("extra")
            loads.append(timed(lambda: model.load_adapter(os.path.join(folder, method), load_as="extra",
                                                          strict_base=False)))
            model.delete_adapter("extra")
        times = forward_rounds(model, ids, pool, rounds)
        rows.append({"method": method, "pool": pool, "mb": per_adapter, "weights_mb": weight_mb,
                     "add_ms": 1e3 * statistics.median(adds), "load_ms": 1e3 * statistics.median(loads),
                     **{k: v / times["one"] for k, v in times.items() if k != "one"}, "one_s": times["one"]})
        print(f"  {method} {pool}: done", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="+", default=[8, 128, 1024])
    parser.add_argument("--methods", nargs="+", default=["lora", "pfeiffer"], choices=list(OPTIONS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # one method, JSON rows
    args = parser.parse_args()
    if args.quick:
        args.pools, args.batch, args.tokens, args.rounds = [8, 64], 8, 16, 3
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.rows_only:
        ids = torch.randint(0, 30522, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as folder:
            for row in grow(args.methods[0], sorted(args.pools), ids, args.rounds, folder):
                print("ROW " + json.dumps(row), flush=True)
        return
    # each method in a fresh process: memory one model freed would otherwise be reused by the next
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--rows-only", "--methods", method, "--pools", *map(str, args.pools),
               "--batch", str(args.batch), "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows += [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    print(f"\nMiniLM-shaped model, batch {args.batch} x {args.tokens}, inference, {torch.get_num_threads()} thread(s)")
    header = (f"{'method':<9}{'pool':>7}{'MB/adapter':>12}{'weights MB':>12}{'x weights':>10}{'add ms':>9}"
              f"{'load ms':>9}{'one s':>8}{'routed 1':>10}{'routed 8':>10}{'routed 32':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<9}{r['pool']:>7}{r['mb']:>12.3f}{r['weights_mb']:>12.3f}{r['mb'] / r['weights_mb']:>10.2f}"
              f"{r['add_ms']:>9.1f}{r['load_ms']:>9.1f}{r['one_s']:>8.3f}{r['routed 1']:>9.2f}x{r['routed 8']:>9.2f}x"
              f"{r['routed 32']:>9.2f}x")


if __name__ == "__main__":
    main()
