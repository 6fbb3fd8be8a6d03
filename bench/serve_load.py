"""Load benchmark of ``adapterkit serve`` (issue 14): mixed-adapter batches against batching one
adapter at a time.

    python bench/serve_load.py                          # all-MiniLM-L6-v2, 8 adapters, 64 clients, 20 s a mode
    python bench/serve_load.py --model tiny --seconds 3 # a tiny random BERT: a quick smoke run

For each mode the script starts ``adapterkit serve`` as its own process (on a free port of
127.0.0.1) with 8 adapters of different methods and heads (2 to 5 labels), warms it up, then
runs ``--clients`` concurrent clients for ``--seconds``: each sends one-text classify requests
for a random adapter (seeded), one after another. It prints requests answered, throughput,
p50 / p99 latency and errors (any status other than 200) per mode, and the throughput ratio.

* ``mixed``: the server's default; requests of all adapters share one forward pass;
* ``one-adapter``: ``mixed_batches=false``; a batch holds requests of one adapter only (what a
  server without per-example routing can do).

The issue's target is ``mixed`` >= 3 x the throughput of ``one-adapter`` at no worse p99. Run it
on a quiet machine: the numbers are meaningless on a busy one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

METHODS = ["pfeiffer", "lora", "ia3", "houlsby", "parallel", "lora", "pfeiffer", "ia3"]
TEXTS = ["a fine, moving film", "dull and far too long", "the plot goes nowhere", "an instant classic",
         "I laughed, I cried", "two hours I will never get back", "solid acting, weak script", "wonderful"]


def make_adapters(model: str, root: Path, count: int) -> tuple[str, dict[str, str]]:
    """The base (``tiny``: a random BERT saved under ``root``) and ``count`` saved adapters."""
    import torch
    import transformers

    from adapterkit import AdapterModel
    from adapterkit.loader import load_tokenizer

    if model == "tiny":
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=128)).save_pretrained(root / "base")
        load_tokenizer("minilm").save_pretrained(root / "base")
        model = str(root / "base")
    handle = AdapterModel.from_pretrained(model)
    dirs = {}
    for i in range(count):
        name = f"task{i}"
        handle.add_adapter(name, METHODS[i % len(METHODS)])
        handle.add_classification_head(name, 2 + i % 4)
        handle.save_adapter(root / name, name)
        dirs[name] = str(root / name)
    return model, dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, adapters: list[str], clients: int, seconds: float, seed: int) -> tuple[list[float], int]:
    """Latencies of the answered requests (seconds) and the number of errors."""
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def client(rng: random.Random, http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < end:
            body = {"adapter": rng.choice(adapters), "texts": [rng.choice(TEXTS)]}
            start = time.perf_counter()
            try:
                answer = await http.post("/v1/classify", json=body)
                ok = answer.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*[client(random.Random(seed + i), http) for i in range(clients)])
    return latencies, errors


def run_mode(model: str, dirs: dict[str, str], mixed: bool, args: argparse.Namespace, root: Path) -> dict:
    port = free_port()
    config = {"model": model, "adapters": dirs, "port": port, "max_batch": args.clients, "queue_size": 4 * args.clients,
              "batch_window": args.window, "mixed_batches": mixed, "timeout": 120.0}
    path = root / f"serve-{'mixed' if mixed else 'one'}.json"
    path.write_text(json.dumps(config))
    server = subprocess.Popen([sys.executable, "-m", "adapterkit", "serve", "--config", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        asyncio.run(load(url, list(dirs), args.clients, min(2.0, args.seconds), args.seed + 1000))  # warm up
        latencies, errors = asyncio.run(load(url, list(dirs), args.clients, args.seconds, args.seed))
    finally:
        server.terminate()
        server.wait(30)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    return {"mode": "mixed" if mixed else "one-adapter", "requests": len(latencies),
            "throughput": len(latencies) / args.seconds, "p50_ms": pick(0.50), "p99_ms": pick(0.99), "errors": errors,
            "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="a model folder or alias, or 'tiny' (a random BERT)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured run per mode (bounded)")
    parser.add_argument("--window", type=float, default=0.005, help="the server's batch window (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        model, dirs = make_adapters(args.model, root, args.adapters)
        rows = [run_mode(model, dirs, mixed, args, root) for mixed in (True, False)]
    print(f"{args.clients} clients, {args.adapters} adapters, {args.seconds:g} s per mode, model {args.model}")
    print(f"{'mode':<12}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in rows:
        print(f"{r['mode']:<12}{r['requests']:>10}{r['throughput']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}"
              f"{r['errors']:>8}")
    if rows[1]["throughput"]:
        print(f"throughput ratio mixed / one-adapter: {rows[0]['throughput'] / rows[1]['throughput']:.2f}x")


if __name__ == "__main__":
    main()
