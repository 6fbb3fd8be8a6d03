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
