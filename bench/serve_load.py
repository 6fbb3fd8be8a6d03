"""Load benchmark of ``adapterkit serve`` (issue 14): mixed-adapter batches against batching one
adapter at a time, with the arithmetic that bounds their ratio on this machine.

    python bench/serve_load.py                          # all-MiniLM-L6-v2, 8 adapters, 64 clients
    python bench/serve_load.py --model tiny --seconds 3 --rounds 1  # a tiny random BERT: a smoke run

It saves 8 adapters of five methods with different heads (2 to 5 labels), starts three servers
as their own processes on free ports of 127.0.0.1 (all traffic stays on 127.0.0.1):

* ``mixed``: the server's default; the batcher takes every waiting classify request, whatever its
  adapter, and runs them as one forward with per-example routing and per-example heads;
* ``one-adapter``: ``mixed_batches=false``; the batcher takes the oldest request's adapter and
  batches only the waiting requests of that adapter (what a server without routing can do);
* ``http-only``: the mixed server with its forward replaced by canned answers: what HTTP, JSON,
  validation, the batcher and the load generator cost per request on this machine (``c_http``).

Then ``--rounds`` rounds, alternating the modes, of ``--clients`` concurrent clients for
``--seconds`` each: every client sends one-text classify requests for a random adapter
(seeded), one after another, over its own keep-alive connection (a minimal asyncio HTTP/1.1
client: httpx would cost more CPU per request than the server, on the same cores). Last, it
times the forward in this process: ``f(b)``, one adapter's batch of ``b`` texts and a mixed batch
of ``b`` texts over the 8 adapters, fitted as ``f0 + b * f1``. It prints one table: per mode and
round, requests answered within the round, throughput, p50 / p99 latency, errors (any status but
200), mean batch size and the worker's busy share (from the server's ``/metrics``), then the ratio and the
ceiling that ``c_http``, ``f0`` and ``f1`` allow (see the README, "Serving many adapters").

The issue's target is ``mixed`` >= 3 x the throughput of ``one-adapter`` at no worse p99. Run it
on a quiet machine: on a loaded one only the ratios of alternated rounds mean something.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
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
MODES = ("mixed", "one-adapter", "http-only")


def make_adapters(model: str, root: Path, count: int, methods: list[str] = METHODS) -> tuple[str, dict[str, str]]:
    """The base (``tiny``: a random BERT saved under ``root``) and ``count`` saved adapters of
    ``methods`` in turn."""
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
        handle.add_adapter(name, methods[i % len(methods)])
        handle.add_classification_head(name, 2 + i % 4)
        handle.save_adapter(root / name, name)
        dirs[name] = str(root / name)
    return model, dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the load generator ------------------------------------------------------------------------
async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection; its status (the body is read and dropped)."""
    writer.write(request)
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(port: int, adapters: list[str], clients: int, seconds: float, seed: int) -> tuple[list[float], int, int]:
    """Latencies of the answered requests (seconds), the number of errors, and the number of
    requests answered within ``seconds`` (those still under way then finish, uncounted)."""
    latencies: list[float] = []
    errors = in_time = 0
    end = time.monotonic() + seconds

    async def client(rng: random.Random) -> None:
        nonlocal errors, in_time
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < end:
                body = json.dumps({"adapter": rng.choice(adapters), "texts": [rng.choice(TEXTS)]}).encode()
                request = (b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                start = time.perf_counter()
                try:
                    ok = await asyncio.wait_for(_exchange(reader, writer, request), 120) == 200
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                    in_time += time.monotonic() <= end
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*[client(random.Random(seed + i)) for i in range(clients)])
    return latencies, errors, in_time


# -- the servers -------------------------------------------------------------------------------
def serve_http_only(config_path: str) -> None:
    """Run the mixed server with canned answers instead of forwards (``--serve-http-only``)."""
    import uvicorn

    from adapterkit.serve.app import create_app
    from adapterkit.serve.engine import build_engine
    from adapterkit.serve.config import ServeConfig

    config = ServeConfig.from_file(config_path)
    engine = build_engine(config)
    answer = {"label": "LABEL_0", "probability": 1.0, "probabilities": {"LABEL_0": 1.0, "LABEL_1": 0.0}}
    engine.classify = lambda key, jobs: [[answer for _ in job.examples] for job in jobs]
    uvicorn.run(create_app(engine), host="127.0.0.1", port=config.port, log_level="warning")


class Server:
    """One ``adapterkit serve`` process of a mode on a free port of 127.0.0.1."""

    def __init__(self, mode: str, model: str, dirs: dict[str, str], args: argparse.Namespace, root: Path):
        self.mode, self.port = mode, free_port()
        config = {"model": model, "adapters": dirs, "host": "127.0.0.1", "port": self.port, "max_batch": args.clients,
                  "queue_size": 4 * args.clients, "batch_window": args.window, "mixed_batches": mode != "one-adapter",
                  "timeout": 120.0}
        path = root / f"serve-{mode}.json"
        path.write_text(json.dumps(config))
        command = ([sys.executable, __file__, "--serve-http-only", str(path)] if mode == "http-only"
                   else [sys.executable, "-m", "adapterkit", "serve", "--config", str(path)])
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(self.url + "/health", timeout=2)
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the {self.mode} server did not start")
                time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        """Batches run, examples in them and seconds the worker spent on them, so far."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        read = lambda name: sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
        return {"batches": read("adapterkit_batch_size_count"), "examples": read("adapterkit_batch_size_sum"),
                "busy": read("adapterkit_batch_seconds_sum")}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def run_round(server: Server, adapters: list[str], args: argparse.Namespace, seed: int) -> dict:
    before, start = server.metrics(), time.monotonic()
    latencies, errors, in_time = asyncio.run(load(server.port, adapters, args.clients, args.seconds, seed))
    after, elapsed = server.metrics(), time.monotonic() - start
    batches = after["batches"] - before["batches"]
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    return {"mode": server.mode, "requests": in_time, "throughput": in_time / args.seconds,
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "errors": errors,
            "batch": (after["examples"] - before["examples"]) / batches if batches else float("nan"),
            "busy": (after["busy"] - before["busy"]) / elapsed}


# -- the forward, in this process --------------------------------------------------------------
def forward_costs(model: str, dirs: dict[str, str], sizes: tuple[int, ...], repeats: int = 9) -> dict:
    """Seconds of the engine's classify batch of ``b`` one-text jobs, one adapter and mixed: the
    fastest of ``repeats`` (the least disturbed by other processes)."""
    import torch

    from adapterkit.serve.engine import build_engine
    from adapterkit.serve.config import ServeConfig
    from adapterkit.serve.engine import ClassifyJob, ClassifyKey

    config = ServeConfig(model=model, adapters=dirs)
    torch.set_num_threads(config.threads)  # as the servers do
    engine = build_engine(config)
    names, rng = list(dirs), random.Random(0)
    out: dict[str, dict[int, float]] = {"one-adapter": {}, "mixed": {}}
    for b in sizes:
        for mode in out:
            jobs = [ClassifyJob(rng.choice(names) if mode == "mixed" else names[0],
                                engine.encode_texts([rng.choice(TEXTS)], None)) for _ in range(b)]
            key = ClassifyKey(None if mode == "mixed" else names[0])
            engine.classify(key, jobs)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                engine.classify(key, jobs)
                times.append(time.perf_counter() - start)
            out[mode][b] = min(times)
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="a model folder or alias, or 'tiny' (a random BERT)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="the adapters' methods, in turn (default: five different methods; e.g. 'lora' for "
                             "eight LoRA adapters, which routing runs as one batched product per site)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured run per mode and round (bounded)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the modes, alternated")
    parser.add_argument("--window", type=float, default=0.005, help="the servers' batch window (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-http-only", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_http_only:
        return serve_http_only(args.serve_http_only)
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        model, dirs = make_adapters(args.model, root, args.adapters, args.methods.split(","))
        servers = [Server(mode, model, dirs, args, root) for mode in MODES]
        try:
            for server in servers:
                server.wait_ready()
                asyncio.run(load(server.port, list(dirs), args.clients, min(2.0, args.seconds), args.seed + 1000))
            for r in range(args.rounds):
                for server in servers if r % 2 == 0 else servers[::-1]:
                    rows.append({"round": r + 1, **run_round(server, list(dirs), args, args.seed + 100 * r)})
        finally:
            for server in servers:
                server.stop()
        costs = forward_costs(model, dirs, (1, 8, args.clients))
    report(rows, costs, args)


def report(rows: list[dict], costs: dict, args: argparse.Namespace) -> None:
    print(f"{args.clients} clients, {args.adapters} adapters ({args.methods}), {args.seconds:g} s per mode and round, "
          f"model {args.model}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<12}{'round':>6}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'batch':>7}{'busy':>6}")
    for r in rows:
        print(f"{r['mode']:<12}{r['round']:>6}{r['requests']:>10}{r['throughput']:>9.1f}{r['p50_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['errors']:>8}{r['batch']:>7.1f}{r['busy']:>6.2f}")
    mean = lambda mode, key: statistics.fmean(r[key] for r in rows if r["mode"] == mode)
    ratios = [m["throughput"] / o["throughput"] for m, o in
              zip([r for r in rows if r["mode"] == "mixed"], [r for r in rows if r["mode"] == "one-adapter"])]
    b_one, b_mixed = mean("one-adapter", "batch"), mean("mixed", "batch")
    c_http = 1 / mean("http-only", "throughput")
    one, mixed, big = costs["one-adapter"], costs["mixed"], args.clients
    f1 = (one[big] - one[8]) / (big - 8)
    f0 = one[8] - 8 * f1
    per_one = c_http + (f0 + b_one * f1) / b_one
    routing = mixed[big] / one[big]  # what routing over 8 adapters adds to a forward
    per_mixed = c_http + routing * (f0 + b_mixed * f1) / b_mixed
    ceiling = (f0 / 8 + f1) / (mixed[big] / big)
    print(f"throughput ratio mixed / one-adapter per round: {', '.join(f'{x:.2f}x' for x in ratios)} "
          f"(median {statistics.median(ratios):.2f}x); p99 mixed {mean('mixed', 'p99_ms'):.0f} ms, "
          f"one-adapter {mean('one-adapter', 'p99_ms'):.0f} ms")
    print(f"forward in one process ({costs['threads']} torch threads): one adapter f(1) {one[1] * 1e3:.1f} ms, "
          f"f(8) {one[8] * 1e3:.1f} ms, f({big}) {one[big] * 1e3:.1f} ms -> f0 {f0 * 1e3:.1f} ms + b x f1 "
          f"{f1 * 1e3:.2f} ms; mixed f({big}) {mixed[big] * 1e3:.1f} ms")
    print(f"c_http (1 / http-only req/s) {c_http * 1e3:.2f} ms; per request c_http + f(b)/b at the measured batches: "
          f"one-adapter {per_one * 1e3:.2f} ms (b={b_one:.1f}), mixed {per_mixed * 1e3:.2f} ms (b={b_mixed:.1f}) -> "
          f"expected ratio {per_one / per_mixed:.2f}x; with free HTTP and batches of 8 against {big}: "
          f"{ceiling:.2f}x at most")


if __name__ == "__main__":
    main()
