"""The handle's heads: adding (one ``add_head`` under every ``add_*_head``), deleting, and the
active head. ``HeadMethods`` is a part of ``AdapterModel`` (``model.py``); a head is built for
the model by ``heads.build_head`` and belongs to the adapter of the same name.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from .checkpoint_format import load_exact
from .errors import AdapterError
from .heads import Head, HeadConfig, build_head
from .setup_lock import setup_change


class HeadMethods:
    """``AdapterModel``'s head methods (AdapterHub's names); they use the handle's ``heads``
    (an ``nn.ModuleDict``), ``layout``, ``config``, ``_active_head`` and ``_check_name``."""

    def _require_head(self, name: Optional[str]) -> None:
        if name is not None and name not in self.heads:
            raise AdapterError(f"No head named '{name}'; heads: {', '.join(self.heads) or 'none'}.")

    @setup_change
    def add_head(self, name: str, config: HeadConfig, *, state: Optional[Mapping[str, torch.Tensor]] = None,
                 overwrite: bool = False, set_active: bool = True) -> Head:
        """The one way a head joins the model: built for it from ``config`` (``heads.build_head``),
        with the weights ``state`` when given (checked exactly); the ``add_*_head`` methods call it."""
        self._check_name(name, "head")
        if name in self.heads and not overwrite:
            raise AdapterError(f"A head named '{name}' already exists; pass overwrite=True or delete_head('{name}').")
        head = self._make_head(config)
        if state is not None:
            load_exact(head, state, "", f"head '{name}'")
        self.heads[name] = head
        if set_active:
            self._active_head = name
        return head

    def _make_head(self, config: HeadConfig) -> Head:
        """A fresh head for this model, following the handle's mode (``heads.build_head``)."""
        return build_head(config, self.layout, self._ref_param()).train(self.training)

    def add_classification_head(
        self,
        name: str,
        num_labels: int = 2,
        *,
        layers: int = 2,
        pooling: str = "auto",
        multilabel: bool = False,
        id2label: Optional[dict[int, str]] = None,
        dropout: float = 0.1,
        overwrite: bool = False,
        set_active: bool = True,
    ) -> None:
        """A sequence classification head (``multilabel=True`` for independent labels)."""
        cfg = HeadConfig("classification", num_labels, layers, pooling, multilabel, dropout, id2label=id2label or {})
        self.add_head(name, cfg, overwrite=overwrite, set_active=set_active)

    def add_regression_head(self, name: str, num_outputs: int = 1, *, layers: int = 2, pooling: str = "auto",
                            dropout: float = 0.1, overwrite: bool = False, set_active: bool = True) -> None:
        """A sequence regression head trained with mean squared error."""
        cfg = HeadConfig("regression", num_outputs, layers, pooling, dropout=dropout)
        self.add_head(name, cfg, overwrite=overwrite, set_active=set_active)

    def add_tagging_head(self, name: str, num_labels: int, *, layers: int = 1,
                         id2label: Optional[dict[int, str]] = None, dropout: float = 0.1,
                         overwrite: bool = False, set_active: bool = True) -> None:
        """A token classification head (labels -100 are ignored)."""
        cfg = HeadConfig("tagging", num_labels, layers, dropout=dropout, id2label=id2label or {})
        self.add_head(name, cfg, overwrite=overwrite, set_active=set_active)

    def add_ctc_head(self, name: str, vocab_size: Optional[int] = None, *, blank: Optional[int] = None,
                     layers: int = 1, dropout: float = 0.1, id2label: Optional[dict[int, str]] = None,
                     overwrite: bool = False, set_active: bool = True) -> None:
        """A CTC head for speech models: per-frame vocabulary logits, CTC loss with labels padded
        by -100. ``vocab_size`` and ``blank`` default to the config's ``vocab_size`` and
        ``pad_token_id`` (as ``Wav2Vec2ForCTC``)."""
        size = vocab_size if vocab_size is not None else getattr(self.config, "vocab_size", None)
        if size is None:
            raise AdapterError("add_ctc_head needs vocab_size= (the model's config has none).")
        pad = blank if blank is not None else getattr(self.config, "pad_token_id", None)
        cfg = HeadConfig("ctc", size, layers, dropout=dropout, id2label=id2label or {}, blank=pad or 0)
        self.add_head(name, cfg, overwrite=overwrite, set_active=set_active)

    @setup_change
    def delete_head(self, name: str) -> None:
        self._require_head(name)
        del self.heads[name]
        if self._active_head == name:
            self._active_head = None

    @property
    def active_head(self) -> Optional[str]:
        return self._active_head

    @active_head.setter
    @setup_change
    def active_head(self, name: Optional[str]) -> None:
        self._require_head(name)
        self._active_head = name
