"""``training.png``: training loss per step and the evaluation metric per evaluation.

Uses matplotlib's Agg backend (no display needed) and writes atomically (a temporary file then a
rename), so a run killed while plotting never leaves a truncated image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt


def plot_training(records: Sequence[dict[str, Any]], path: "str | Path", metric: str, title: Optional[str] = None) -> Path:
    matplotlib.use("Agg", force=True)

    path = Path(path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split", "eval") == "eval" and metric in r]
    tests = [r for r in records if r.get("type") == "eval" and r.get("split") == "test" and metric in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], lw=1, color="tab:blue", label="train loss")
        ax_lr = ax_loss.twinx()
        ax_lr.plot(steps, [r["lr"] for r in train], lw=0.8, color="tab:gray", alpha=0.6, label="learning rate")
        ax_lr.set_ylabel("learning rate", color="tab:gray")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    eval_loss = [r for r in evals if "loss" in r and metric != "loss"]
    if eval_loss:
        ax_loss.plot([r["step"] for r in eval_loss], [r["loss"] for r in eval_loss], "o-", color="tab:orange",
                     label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(loc="upper right")
    ax_loss.set_title("training")
    if evals:
        ax_metric.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:green")
        for r in evals:
            ax_metric.annotate(f"ep {r.get('epoch', 0):g}", (r["step"], r[metric]), textcoords="offset points",
                               xytext=(0, 6), ha="center", fontsize=7)
        for r in tests:
            ax_metric.plot([r["step"]], [r[metric]], "*", color="tab:red", markersize=10, label=f"test ({r[metric]:.4f})")
        if tests:
            ax_metric.legend(loc="lower right")
    else:
        ax_metric.text(0.5, 0.5, "no evaluation data (--eval FILE)", ha="center", va="center",
                       transform=ax_metric.transAxes)
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"eval {metric}")
    ax_metric.set_title(f"evaluation: {metric}")
    ax_metric.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
