"""AdamW over the trainable parameters, the learning-rate schedule, and optimizer state as
safetensors + JSON (never pickle: ``torch.save`` of an optimizer's state dict is a pickle).

The schedule is a pure function of the step (no scheduler object whose state must be saved):
linear warm-up from 0 to the peak rate over ``warmup`` steps, then linear decay to 0 (default),
cosine decay, or constant.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import CheckpointError


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, lr_scale: Optional[Callable[[str], float]] = None
) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as in BERT.

    ``lr_scale(name)`` multiplies the learning rate of a parameter (LoRA+ gives LoRA's ``B``
    matrices a larger rate); each group keeps its factor as ``lr_scale`` so that ``set_lr``
    and a resumed run apply it too."""
    scale = lr_scale or (lambda name: 1.0)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in trainable(model):
        groups.setdefault((p.ndim >= 2, float(scale(name))), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))  # decayed first, as checkpoints expect
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * factor, "lr_scale": factor}
         for (decay, factor), params in ordered],
        lr=lr, betas=(0.9, 0.999), eps=1e-8,
    )


def loraplus(ratio: Optional[float]) -> Optional[Callable[[str], float]]:
    """LoRA+ (Hayou et al. 2024): LoRA's ``B`` matrices get ``ratio`` times the learning rate."""
    if ratio is None or ratio == 1.0:
        return None
    return lambda name: ratio if name.rsplit(".", 1)[-1] == "lora_B" else 1.0


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of all steps, >= 1 a number of steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def lr_at(step: int, total_steps: int, warmup: int, peak: float, schedule: str = "linear") -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "param_names": names}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str
) -> None:
    """Inverse of ``optimizer_state``; checks the parameters are the same ones, in order."""
    if meta.get("param_names") != names:
        raise CheckpointError(
            f"{where}: the optimizer state was saved for other trainable parameters than this run has; "
            "resume with the same method and options, or start a new run."
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
