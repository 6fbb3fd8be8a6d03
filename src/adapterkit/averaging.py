"""Merging trained adapters into a new one (AdapterHub's ``average_adapter``, PEFT's
``add_weighted_adapter``): task arithmetic on adapter weights, so the result costs what one
adapter costs at inference (unlike the ``Average`` block, which runs every adapter).

The weights ``w_1 .. w_N`` are normalised **once**: ``weights=None`` means ``w_i = 1 / N``;
given weights are divided by their sum (``normalize_weights=True``, the default; the sum must
be positive) or used as given (``normalize_weights=False``, e.g. ``[1.0, -0.5]`` to unlearn
part of the second adapter). AdapterHub's ``Average`` block divides equal weights by ``N`` and
then again by ``N``; nothing here divides twice.

Strategies (``combine_strategy``):

* ``"linear"``: every parameter tensor ``P = sum_i w_i P_i`` (bottleneck: down, up, biases,
  norms; LoRA: ``A`` and ``B`` separately, as AdapterHub does, which is *not* the weighted sum
  of the ``delta W``; use ``"lora_svd"`` for that; IA3: the scaling vectors). Needs adapters of
  one config (same method, options and shapes).
* ``"lora_svd"``: LoRA only. At each site ``dW = sum_i w_i * scaling_i * B_i @ A_i`` (any ranks,
  any ``alpha``), truncated to rank ``svd_rank`` (default: the largest input rank) by SVD,
  ``dW ~ U_r S_r V_r^T``, giving ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` and
  ``alpha = r`` (scaling 1). At full rank the new adapter's ``delta W`` equals ``dW``.
* ``"ties"``: TIES-merging (Yadav et al. 2023, sec. 3), tensor by tensor, the adapters'
  parameters taken as task vectors: **trim** each to its top ``density`` fraction by magnitude
  (the rest set to 0), **elect** the sign ``s = sign(sum_i w_i * trimmed_i)``, **disjoint mean**
  over the adapters whose kept entry has sign ``s``: ``P = sum_i w_i m_i trimmed_i /
  sum_i w_i m_i`` (0 where no adapter agrees). With equal weights this is the paper's mean; the
  weights must be positive (the weighted mean is scale-free, so normalising changes nothing).
  Bottleneck and LoRA (``A``, ``B`` separately, as PEFT's ``"ties"``); IA3's vectors are not
  task vectors (they start at one) and are refused.

``combine`` only computes: it returns the new config and state dict, and the handle
(``AdapterModel.average_adapter``) builds and attaches the adapter, so a refused merge changes
nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .checkpoint_format import load_exact
from .config import AdapterConfig
from .errors import AdapterError
from .methods.lora import LoRA
from .setup_lock import setup_change

if TYPE_CHECKING:  # pragma: no cover
    from .records import AdapterRecord

State = dict[str, torch.Tensor]


def normalised_weights(weights: Optional[Sequence[float]], n: int, normalize: bool = True) -> list[float]:
    """The weights the strategies use (see the module docstring): ``1 / N`` each by default,
    else the given ones divided by their sum (``normalize``) or as given."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise AdapterError(f"average_adapter got {len(weights)} weights for {n} adapters; give one weight per adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"average_adapter weights must be finite numbers, got {weights}.")
    if not normalize:
        return weights
    total = sum(weights)
    if total <= 0:
        raise AdapterError(
            f"average_adapter weights {weights} sum to {total}; normalising needs a positive sum. "
            "Pass normalize_weights=False to use negative weights as given."
        )
    return [w / total for w in weights]


def _states(records: Sequence["AdapterRecord"]) -> list[State]:
    return [{k: v.detach() for k, v in r.modules.state_dict().items()} for r in records]


def _require_same_config(records: Sequence["AdapterRecord"], strategy: str) -> None:
    first = records[0]
    for other in records[1:]:
        if other.config != first.config:
            a, b = first.config.to_dict(), other.config.to_dict()
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            hint = " Use combine_strategy='lora_svd' for LoRA adapters of different ranks." \
                if first.config.method == other.config.method == "lora" else ""
            raise AdapterError(
                f"combine_strategy='{strategy}' needs adapters of one config, but '{first.name}' and "
                f"'{other.name}' differ in {diff}.{hint}"
            )


def _linear(records, weights, **_: object) -> tuple[AdapterConfig, State]:
    _require_same_config(records, "linear")
    states = _states(records)
    return records[0].config, {k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]}


def ties_tensor(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES of one parameter over the adapters (trim, elect sign, weighted disjoint mean)."""
    stacked = torch.stack(list(tensors)).flatten(1)  # (N, numel)
    k = max(1, math.ceil(density * stacked.shape[1]))
    keep = torch.zeros_like(stacked, dtype=torch.bool)
    keep.scatter_(1, stacked.abs().topk(k, dim=1).indices, True)
    trimmed = stacked * keep
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).unsqueeze(1)  # (N, 1)
    sign = torch.sign((w * trimmed).sum(0))  # (numel,)
    agree = keep & (torch.sign(trimmed) == sign) & (sign != 0)
    mass = (w * agree).sum(0)
    merged = (w * agree * trimmed).sum(0) / mass.clamp_min(torch.finfo(stacked.dtype).tiny)
    return torch.where(mass > 0, merged, torch.zeros_like(merged)).view(tensors[0].shape)


def _ties(records, weights, *, density: float, **_: object) -> tuple[AdapterConfig, State]:
    _require_same_config(records, "ties")
    if any(w <= 0 for w in weights):
        raise AdapterError(f"combine_strategy='ties' needs positive weights (a weighted mean), got {list(weights)}.")
    if not 0.0 < density <= 1.0:
        raise AdapterError(f"density must be in (0, 1] (the fraction of entries TIES keeps), got {density}.")
    states = _states(records)
    return records[0].config, {k: ties_tensor([s[k] for s in states], weights, density) for k in states[0]}


def _lora_svd(records, weights, *, svd_rank: Optional[int], **_: object) -> tuple[AdapterConfig, State]:
    keys = list(records[0].modules.keys())
    for other in records[1:]:
        if list(other.modules.keys()) != keys:
            raise AdapterError(
                f"combine_strategy='lora_svd' needs LoRA adapters at the same places, but '{records[0].name}' and "
                f"'{other.name}' differ; add them with the same roles / layers / target_modules."
            )

    odd = next(((r.name, k, type(m).__name__) for r in records for k, m in r.modules.items() if type(m) is not LoRA),
               None)
    if odd is not None:
        raise AdapterError(
            f"combine_strategy='lora_svd' refactors LoRA on Linear layers only, but '{odd[0]}' holds a {odd[2]} at "
            f"'{odd[1]}' (an embedding, convolution or sliced LoRA, or a layer-norm copy of train_layer_norms); "
            "use combine_strategy='linear' for it.")
    rank = svd_rank if svd_rank is not None else max(int(m.lora_A.shape[0]) for r in records for m in r.modules.values())
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
    state: State = {}
    for key in keys:
        units = [r.modules[key] for r in records]
        delta = sum(w * u.scaling * (u.lora_B.detach() @ u.lora_A.detach()) for w, u in zip(weights, units))  # (out, in)
        if rank > min(delta.shape):
            raise AdapterError(
                f"svd_rank={rank} exceeds the size of '{key.replace('-', '.')}' ({delta.shape[0]}x{delta.shape[1]}); "
                f"choose svd_rank <= {min(delta.shape)}."
            )
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        root = s[:rank].sqrt()
        state[f"{key}.lora_B"] = (u[:, :rank] * root).to(delta.dtype)  # (out, r)
        state[f"{key}.lora_A"] = (root.unsqueeze(1) * vh[:rank]).to(delta.dtype)  # (r, in)
    config = records[0].config.replace(r=rank, alpha=float(rank), use_rslora=False, rank_pattern=None, alpha_pattern=None)
    return config, state


#: strategy -> (function, the methods it applies to)
COMBINERS: dict[str, tuple[Callable[..., tuple[AdapterConfig, State]], tuple[str, ...]]] = {
    "linear": (_linear, ("bottleneck", "lora", "ia3")),
    "lora_svd": (_lora_svd, ("lora",)),
    "ties": (_ties, ("bottleneck", "lora")),
}


def combine(
    records: Sequence["AdapterRecord"],
    weights: Optional[Sequence[float]] = None,
    combine_strategy: str = "linear",
    *,
    normalize_weights: bool = True,
    svd_rank: Optional[int] = None,
    density: float = 0.2,
) -> tuple[AdapterConfig, State]:
    """The config and weights (keys of the adapter's ``state_dict``) of the merge of
    ``records``; reads them only. See the module docstring for the formulas."""
    if combine_strategy not in COMBINERS:
        raise AdapterError(f"Unknown combine_strategy '{combine_strategy}'; choose one of: {', '.join(COMBINERS)}.")
    if not records:
        raise AdapterError("average_adapter needs at least one adapter to merge.")
    fn, methods = COMBINERS[combine_strategy]
    wrong = [f"{r.name} ({r.config.method})" for r in records if r.config.method not in methods]
    if wrong:
        raise AdapterError(
            f"combine_strategy='{combine_strategy}' applies to {', '.join(methods)} adapters, not {', '.join(wrong)}."
        )
    w = normalised_weights(weights, len(records), normalize_weights)
    return fn(records, w, svd_rank=svd_rank, density=density)


class AveragingMethods:
    """``AdapterModel.average_adapter`` (AdapterHub's name); it uses the handle's ``records``,
    ``_build`` and ``_replace``, so the new adapter is added like any other."""

    @setup_change
    def average_adapter(
        self,
        name: str,
        adapter_list: Sequence[str],
        weights: Optional[Sequence[float]] = None,
        *,
        combine_strategy: str = "linear",
        normalize_weights: bool = True,
        svd_rank: Optional[int] = None,
        density: float = 0.2,
        overwrite: bool = False,
        set_active: bool = False,
    ) -> None:
        """Add adapter ``name`` made by merging the weights of ``adapter_list`` (AdapterHub's
        ``average_adapter``): ``combine_strategy`` ``"linear"``, ``"lora_svd"`` (rank
        ``svd_rank``) or ``"ties"`` (keeping the top ``density`` fraction); weights default to
        ``1 / N`` and are divided by their sum once (``normalize_weights``). Formulas:
        ``averaging.py``. On any error the model is left as it was."""
        self._check_name(name)
        if name in self.adapters and (not overwrite or name in adapter_list):
            raise AdapterError(
                f"An adapter named '{name}' already exists; choose another name"
                + ("." if name in adapter_list else " or pass overwrite=True.")
            )
        if isinstance(adapter_list, str):
            raise AdapterError("average_adapter takes a list of adapter names, e.g. ['a', 'b'].")
        self._require(list(adapter_list))
        config, state = combine([self.records[n] for n in adapter_list], weights, combine_strategy,
                                normalize_weights=normalize_weights, svd_rank=svd_rank, density=density)
        record = self._build(name, config)  # may raise: nothing changed yet
        load_exact(record.modules, state, "", f"average_adapter('{name}')")
        self._replace(record, set_active)
