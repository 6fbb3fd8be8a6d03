"""Feedback while training: a tqdm bar (loss, learning rate, examples/s) on a terminal, plain
log lines when stderr is a file (``nohup``, CI), nothing with ``progress="none"``."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm.auto import tqdm


class Progress:
    def __init__(self, mode: str = "auto", enabled: bool = True):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode if enabled else "none"
        self._bar = None
        self._epoch = 0

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        self._epoch = epoch
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}/{epochs}", unit="step",
                             dynamic_ncols=True, leave=True, file=sys.stderr)

    def update(self, step: int, loss: float, lr: float, speed: float, log: bool) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{speed:.0f}", refresh=False)
        elif self.mode == "log" and log:
            print(f"epoch {self._epoch} step {step}: loss {loss:.4f}  lr {lr:.2e}  {speed:.0f} examples/s",
                  file=sys.stderr, flush=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def write(self, message: str, file: Optional[object] = None) -> None:
        if self.mode == "none":
            return
        out = file or sys.stderr
        if self._bar is not None:
            self._bar.write(message, file=out)
        else:
            print(message, file=out, flush=True)
