"""AdapterHub's *static* heads: the head of the ``transformers`` task model an adapter was trained in.

Since AdapterHub 1.0 the standard path is ``adapters.init(model)`` on a model such as
``BertForSequenceClassification``; ``save_adapter(..., with_head=True)`` then writes that model's
own head: ``head_config.json`` with ``"config": null``, the ``model_class`` and ``num_labels`` /
``label2id``, and the head's weights in ``model_head.safetensors`` under the model's own module
names (``classifier.weight``, ``score.weight``, ``classifier.out_proj.bias``, ...).

Where the task model's head is exactly an adapterkit ``Head`` (the table ``peft.HEADS``, shared with
PEFT's ``modules_to_save`` heads: BERT's pooler + classifier, RoBERTa's classification head, the
decoders' ``score`` on the last token, token-classification ``classifier``), the equivalent head
is built, so the wrapped model gives the task model's logits whichever class wraps the base.
Otherwise the head is skipped with the reason (``load_adapter`` warns with it) and the adapter is
loaded alone: the adapter never fails to load because of its head.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..heads import HeadConfig
from . import heads as H
from .peft import HEADS

#: ``model_class`` suffix -> the task type of the head table
TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS"}


def read_static_head(data: dict[str, Any], tensors: dict[str, torch.Tensor], layout, head_file: Any
                     ) -> tuple[Optional[HeadConfig], dict[str, torch.Tensor], Optional[str]]:
    """``(head, head tensors, None)``, or ``(None, {}, why)`` when adapterkit has no equivalent."""
    model_class = str(data.get("model_class") or "")
    task = next((t for suffix, t in TASKS.items() if model_class.endswith(suffix)), None)
    if task is None:
        return None, {}, (f"'{head_file}' holds the head of {model_class or 'an unnamed model class'}, which has no "
                          "adapterkit counterpart (adapterkit builds the heads of *ForSequenceClassification and "
                          "*ForTokenClassification); the adapter was loaded without it: add a head and train it")
    prefix = getattr(layout.model, "base_model_prefix", "")
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, param = key.rpartition(".")
        stems.setdefault(stem, {})[param] = value
    for spec in HEADS:
        modules = [m.format(prefix=prefix) for m in spec.modules]
        optional = {m.format(prefix=prefix) for m in spec.from_base}
        if (spec.task_type == task and layout.model_type in spec.model_types
                and set(stems) <= set(modules) and set(modules) - optional <= set(stems)):
            break
    else:
        return None, {}, (f"'{head_file}': the {model_class} head (modules {sorted(stems)}) is not a head adapterkit "
                          f"builds on {layout.model_type}; the adapter was loaded without it: add a head and train it")
    try:
        layers = [stems.get(m) or H.base_module_weights(layout, m.split(".", 1)[-1], f"'{head_file}'")
                  for m in modules]
    except CheckpointError as err:
        return None, {}, f"{err} The adapter was loaded without its head"
    num_labels = int(data.get("num_labels") or layers[-1]["weight"].shape[0])
    head_type = spec.head_types[0] if num_labels > 1 or len(spec.head_types) == 1 else spec.head_types[-1]
    id2label = {int(v): str(k) for k, v in (data.get("label2id") or {}).items()}
    head = HeadConfig(head_type, num_labels, layers=len(layers), pooling=spec.pooling, id2label=id2label)
    return head, H.head_layers(layers), None


__all__ = ["read_static_head"]
