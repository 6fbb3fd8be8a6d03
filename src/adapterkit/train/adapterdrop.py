"""AdapterDrop in ``transformers.Trainer``: a callback that drops the lower layers' adapters at
each training step (``composition.adapterdrop.AdapterDrop``) and brings every adapter back for
evaluation and saving. It lives with training, so the core never imports ``transformers.Trainer``."""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

from ..composition.adapterdrop import AdapterDrop
from ..errors import AdapterError
from ..model import AdapterModel

__all__ = ["AdapterDropCallback"]


class AdapterDropCallback(TrainerCallback):
    """``transformers.Trainer`` callback: AdapterDrop during training steps, every adapter
    back for evaluation and saving.

    >>> trainer = Trainer(model=model, ..., callbacks=[AdapterDropCallback(max_dropped=5)])  # doctest: +SKIP
    """

    def __init__(self, max_dropped: Optional[int] = None, seed: int = 0):
        self.drop = AdapterDrop(max_dropped, seed)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.drop.before_step(_handle(model), state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.drop.after_step(_handle(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.drop.after_step(_handle(model))


def _handle(model: Any) -> AdapterModel:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, AdapterModel):
        raise AdapterError(f"AdapterDropCallback needs the Trainer's model to be an AdapterModel, got {type(model).__name__}.")
    return inner
