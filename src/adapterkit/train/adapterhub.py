"""AdapterHub's ``AdapterTrainer``: ``transformers.Trainer`` whose saves write the model's adapters
(``save_all_adapters``) instead of the whole base model. It lives with training, so the core never
imports ``transformers.Trainer``; ``adapterkit.AdapterTrainer`` reaches it on first use."""

from __future__ import annotations

import os
from typing import Optional

import transformers

from ..adapterhub_api import HANDLE
from ..model import AdapterModel

__all__ = ["AdapterTrainer"]


class AdapterTrainer(transformers.Trainer):
    """AdapterHub's ``AdapterTrainer``: a model given to ``adapterkit.init`` (or an ``AdapterModel``)
    is saved as its adapters; any other model as ``transformers.Trainer`` saves it."""

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir or self.args.output_dir
        handle = self.model if isinstance(self.model, AdapterModel) else self.model.__dict__.get(HANDLE)
        if handle is None:
            return super()._save(output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)
        handle.save_all_adapters(output_dir)
