"""AdapterHub's entry points, so that AdapterHub code runs after changing one import line
(``import adapterkit as adapters``):

* ``AutoAdapterModel.from_pretrained(name)`` -- an ``AdapterModel`` (flexible heads);
* ``init(model)`` -- adds the adapter methods (``add_adapter``, ``train_adapter``,
  ``set_active_adapters``, ``load_adapter``, ``save_adapter``, ...) to a ``transformers`` model in
  place, as ``adapters.init`` does. The adapters run from hooks on the model's own modules, so
  calling the model itself runs them; their parameters are registered under the model
  (``adapterkit_adapters``), so its optimiser and ``Trainer`` see them. No class is changed: the
  methods are the instance's attributes, bound to an ``AdapterModel`` kept beside it;
* ``load_adapter("org/name", source="hf")`` -- the Hub form (``AdapterModel.load_adapter``);
* the config names ``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``, ``SeqBnInvConfig``-free
  presets; ``AdapterTrainer`` (``transformers.Trainer`` that saves the adapters, not the base) is
  ``train/adapterhub.py``, reached as ``adapterkit.AdapterTrainer``.
"""

from __future__ import annotations

from typing import Any

from .config import resolve_config
from .errors import AdapterError
from .model import AdapterModel

#: the methods ``init`` gives a model (AdapterHub's names; all exist on ``AdapterModel``)
_METHODS = ("add_adapter", "delete_adapter", "train_adapter", "set_active_adapters", "load_adapter", "save_adapter",
            "save_all_adapters", "push_adapter", "merge_adapter", "disable_adapters", "adapter_summary",
            "add_adapter_fusion", "train_adapter_fusion", "load_adapter_fusion", "save_adapter_fusion",
            "freeze_model")
HANDLE = "_adapterkit_handle"


class AutoAdapterModel:
    """AdapterHub's ``AutoAdapterModel``: ``from_pretrained`` gives an ``AdapterModel``."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs: Any) -> AdapterModel:
        return AdapterModel.from_pretrained(name_or_path, **kwargs)


def init(model: Any, adapters_config: Any = None) -> Any:
    """Give the ``transformers`` model ``model`` AdapterHub's adapter methods, in place (and return it)."""
    if adapters_config is not None:
        raise AdapterError("init(model, adapters_config=...) is not supported; call init(model) and add adapters "
                           "with model.add_adapter(name, config=...).")
    if isinstance(model, AdapterModel) or model.__dict__.get(HANDLE) is not None:
        return model
    handle = AdapterModel(model)
    model.__dict__[HANDLE] = handle  # not a submodule: the handle holds the model (no cycle)
    model.add_module("adapterkit_adapters", handle.adapters)  # the adapters' parameters belong to the model
    model.add_module("adapterkit_heads", handle.heads)
    for name in _METHODS:
        if hasattr(handle, name):
            model.__dict__[name] = getattr(handle, name)
    model.__dict__["adapter_model"] = handle
    return model


def _preset(preset: str):
    def make(**options: Any):
        return resolve_config(preset, **options)

    make.__name__ = make.__qualname__ = {"seq_bn": "SeqBnConfig", "double_seq_bn": "DoubleSeqBnConfig",
                                         "par_bn": "ParBnConfig"}[preset]
    make.__doc__ = f"AdapterHub's ``{make.__name__}(**options)``: the ``{preset}`` preset with those options."
    return make


SeqBnConfig = _preset("seq_bn")
DoubleSeqBnConfig = _preset("double_seq_bn")
ParBnConfig = _preset("par_bn")
