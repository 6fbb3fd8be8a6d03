"""Speech recognition through the CLI on synthetic spoken digits (issue 21): the docs' WER figure.

    python bench/ctc_digits.py                      # 300 training clips, 15 epochs (about 3 min on 1 core)
    python bench/ctc_digits.py --train-clips 120 --epochs 6 --out /tmp/ctc   # smaller

Writes digit sequences rendered as tones (``tests/speech_digits.py``: one frequency per digit,
short silent gaps) into WAV files with ``train.tsv`` / ``dev.tsv`` / ``test.tsv``, saves a tiny
random wav2vec2 beside them, and runs ``adapterkit train --task ctc`` (LoRA on the convolutional
front end, the feature projection and attention's query / value; CTC head), selecting on dev
WER and scoring test once. Prints the test WER / CER and the command it ran.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import speech_digits as S  # noqa: E402 - tests/ on the path first

from adapterkit.cli import main as cli  # noqa: E402


def run(out: Path, train_clips: int, epochs: int, lr: float, seed: int) -> dict:
    S.speech_base(out / "model")
    for name, n, data_seed in (("train", train_clips, 0), ("dev", 48, 1), ("test", 96, 2)):
        S.write_digits(out, name, n, data_seed)
    argv = ["train", "--model", str(out / "model"), "--task", "ctc", "--train", str(out / "train.tsv"),
            "--eval", str(out / "dev.tsv"), "--test", str(out / "test.tsv"), "--method", "lora",
            "-o", f"target_modules={S.TARGETS}", "--lora-r", "8", "--epochs", str(epochs), "--batch-size", "4",
            "--lr", str(lr), "--schedule", "constant", "--warmup", "0", "--no-base-dropout", "--seed", str(seed),
            "--progress", "log", "--log-every", "25", "--out", str(out / "run")]
    code = cli(argv)
    if code != 0:
        raise SystemExit(code)
    results = json.loads((out / "run" / "results.json").read_text())
    print("adapterkit " + shlex.join(argv))
    return results


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-clips", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="folder for the data, the model and the run (default: a temporary one)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ctc-digits-"))
    results = run(out, args.train_clips, args.epochs, args.lr, args.seed)
    test = results["test"]
    print(f"test: WER {test['wer']:.3f}  CER {test['cer']:.3f}  sentence accuracy {test['sentence_accuracy']:.3f} "
          f"({args.train_clips} training clips, {args.epochs} epochs, {results['train_seconds']:.0f} s; best dev WER "
          f"{results['best_eval']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
