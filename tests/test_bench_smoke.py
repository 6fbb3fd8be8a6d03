"""The benchmark scripts still run (tiny sizes), and the arithmetic they report is consistent."""

from __future__ import annotations

import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_adapter_share_reports_every_preset_with_consistent_arithmetic(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import adapter_share
    finally:
        sys.path.remove(str(BENCH))
    assert adapter_share.main(["--batch", "2", "--seq-len", "16", "--forwards", "1", "--threads", "1"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"\| (\w+) \| ([\d.]+) % \| (-?[\d.]+) % \| ([\d.]+) \|", line)
        if m:
            rows[m[1]] = (float(m[2]), float(m[3]), float(m[4]))
    assert set(rows) == set(adapter_share.PRESETS)
    # Houlsby = two Pfeiffer-sized bottlenecks per layer: twice the multiply-adds.
    assert rows["pfeiffer"][0] > 0 and abs(rows["houlsby"][0] - 2 * rows["pfeiffer"][0]) <= 0.011  # 2-decimal rounding
    assert rows["ia3"][0] == 0.0  # IA3 only rescales: no matrix multiplication
    assert 0 < rows["lora"][0] < rows["pfeiffer"][0]  # rank 8 on 2 of 6 matrices < width 24 after the FFN
    assert all(share > 0 for _, share, _ in rows.values())  # the adapter's code ran inside the forward


def test_multitask_tasks_are_the_documented_functions_of_a_row(tmp_path, capsys):
    """bench/multitask.py (issue 13): the three tasks' labels, and a missing data folder is a
    clear error before anything loads."""
    sys.path.insert(0, str(BENCH))
    try:
        import multitask
    finally:
        sys.path.remove(str(BENCH))
    label = {task: fn for task, (_, fn) in multitask.TASKS.items()}
    assert [multitask.TASKS[t][0] for t in ("sentiment", "negation", "sentiment_x_negation")] == [2, 2, 4]
    assert label["negation"](("it is n't a good film", 0)) == 1 and label["negation"](("notable work", 1)) == 0
    assert label["sentiment_x_negation"](("never dull", 1)) == 3 and label["sentiment_x_negation"](("dull", 0)) == 0
    assert label["sentiment"](("never dull", 1)) == 1
    assert multitask.main(["--data", str(tmp_path / "nowhere")]) == 2
    assert "No SST-2 at" in capsys.readouterr().err


def test_quantized_verdict_decides_only_what_its_seeds_can():
    """bench/accuracy.py --table quantized: PASS only when the whole 95 % interval of the paired mean
    lies within ±0.5 points, FAIL only when wholly outside, UNDECIDED otherwise (issue 22)."""
    sys.path.insert(0, str(BENCH))
    try:
        import accuracy
    finally:
        sys.path.remove(str(BENCH))
    mean, half = accuracy.paired_interval([0.6, -0.6])
    assert mean == 0.0 and abs(half - 12.706 * 0.6 * 2 ** 0.5 / 2 ** 0.5) < 1e-9  # sd 0.6 * sqrt 2, / sqrt 2 pairs
    assert accuracy.paired_interval([0.3]) == (0.3, float("inf"))
    assert accuracy.within_tolerance(0.1, 0.3, 0.5) == "PASS"
    assert accuracy.within_tolerance(-0.1, 0.5, 0.5) == "UNDECIDED"
    assert accuracy.within_tolerance(-1.2, 0.5, 0.5) == "FAIL"

    def run(seed, acc, quantize=None):
        return {"seed": seed, "test_accuracy": acc, "quantize": quantize}

    def row(label, quantize, accs):
        runs = [run(s, a, quantize) for s, a in zip((42, 43, 44), accs)]
        return {"label": label, "method": "lora", "options": {}, "runs": runs, "test_accuracy": sum(accs) / len(accs)}

    lines = accuracy.quantized_verdict([row("float", None, [0.85, 0.84, 0.86]), row("int8", "int8", [0.851, 0.841, 0.861])])
    assert lines[0].startswith("PASS: int8:") and "+0.10 ± 0.00 points (95 %, 3 seeds" in lines[0]
    assert lines[1].startswith("PASS: every quantized row pooled") and "3 pairs" in lines[1]
