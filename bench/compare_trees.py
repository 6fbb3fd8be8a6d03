"""Two source trees of adapterkit side by side: the same ``bench_speed.py`` rows, alternated.

    python bench/compare_trees.py OLD_SRC NEW_SRC --rounds 3 --only "pfeiffer|lora" -- --repeats 1

Each round runs ``bench/bench_speed.py`` once with ``PYTHONPATH=OLD_SRC`` and once with
``PYTHONPATH=NEW_SRC`` (the order flips every round), so a busy machine slows both trees alike.
Every run measures its own bare model and floor, so the ratios it reports are taken within one
process; the table gives, per configuration, the median ratio of each tree over the rounds and
their quotient (new / old: below 1 is faster). A refactor is "no worse" when the quotient stays
within the bench's resolution (the bare copy's ratio, about 1.04 on this machine).

``OLD_SRC`` is typically a ``git worktree`` of the old commit's ``src`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(src: str, only: str, extra: list[str]) -> dict[str, float]:
    """The ratio of every row of one ``bench_speed.py`` run with ``src`` first on the path."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        cmd = [sys.executable, str(HERE / "bench_speed.py"), "--only", only, "--no-memory", "--json", str(out), *extra]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["title"]: r["ratio"] for r in rows if r.get("ratio") is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", help="the old tree's src folder")
    p.add_argument("new", help="the new tree's src folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="pfeiffer|lora", help="bench_speed.py --only REGEX")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # further bench_speed.py arguments
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    ratios: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for i in range(args.rounds):
        order = [("old", args.old), ("new", args.new)]
        for tag, src in (order if i % 2 == 0 else order[::-1]):
            for title, ratio in run_once(src, args.only, args.extra).items():
                ratios[tag].setdefault(title, []).append(ratio)
            print(f"round {i + 1}: {tag} done", file=sys.stderr)
    print(f"| configuration | old (median of {args.rounds}) | new | new / old |")
    print("|---|---:|---:|---:|")
    for title in ratios["new"]:
        if title not in ratios["old"]:
            continue
        old, new = statistics.median(ratios["old"][title]), statistics.median(ratios["new"][title])
        print(f"| {title} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
