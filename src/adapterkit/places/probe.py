"""Which modules a model's forward actually calls: one small probe forward per model.

Adapters run in hooks on their host module, so a host whose ``forward`` the model never calls
leaves the adapter without effect: WavLM's attention hands ``q_proj.weight`` straight to
``F.multi_head_attention_forward``, and a LoRA on ``q_proj`` would train nothing and change
nothing. ``HostProbe`` runs the model once on dummy inputs (chosen by ``main_input_name``:
``input_ids`` (1, 8), ``pixel_values`` from the config's ``image_size`` / ``num_channels``,
``input_values`` (1, 16000) for speech, ``input_features`` for Whisper-style models, plus
``decoder_input_ids`` for encoder-decoders), with a forward hook on every module recording which
ran, and refuses sites whose host did not.

The probe never changes the model: it runs under ``torch.no_grad`` in eval mode, restores each
module's training flag and removes its hooks even on error, and draws its dummy inputs from its
own generator, not the global RNG. Models without a ``transformers`` config (a plain
``nn.Module``) cannot be probed, since their inputs are unknown: the check is skipped for them.
If the probe forward fails (the model needs inputs the probe does not make), the check is skipped
with a warning; it never blocks ``add_adapter``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import AdapterError
from .slots import Site

PROBE_TOKENS = 8
PROBE_DECODER_TOKENS = 4
PROBE_AUDIO_SAMPLES = 16000


def dummy_inputs(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Small inputs for ``model``'s forward, or ``None`` when its input kind is unknown."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is None:
        return None
    g = torch.Generator().manual_seed(0)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 2
        inputs = {name: (torch.arange(PROBE_TOKENS) % vocab).unsqueeze(0)}
    elif name == "pixel_values":
        size = getattr(config, "image_size", 32)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        inputs = {name: torch.randn(1, getattr(config, "num_channels", 3), height, width, generator=g)}
    elif name == "input_values":
        inputs = {name: torch.randn(1, PROBE_AUDIO_SAMPLES, generator=g)}
    elif name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs = {name: torch.randn(1, getattr(config, "num_mel_bins", 80), frames, generator=g)}
    else:
        return None
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else (getattr(config, "pad_token_id", None) or 0)
        inputs["decoder_input_ids"] = torch.full((1, PROBE_DECODER_TOKENS), start)
    return {k: v.to(ref.device, ref.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def probe_forward(model: nn.Module) -> Optional[str]:
    """Run ``model`` once on ``dummy_inputs`` in eval mode without gradients, restoring every
    module's training flag; returns why it could not (``None`` when it ran)."""
    inputs = dummy_inputs(model)
    if inputs is None:
        return "the model has no transformers config or an input kind the probe does not know"
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot probe", reported by the caller
        return f"the probe forward failed ({type(err).__name__}: {err})"
    finally:
        for module, mode in modes.items():
            module.training = mode
    return None


class HostProbe:
    """The set of modules one forward of ``model`` calls, found once and kept."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._ran: Optional[set[nn.Module]] = None
        self._done = False
        #: why the model could not be probed (``None`` after a successful probe)
        self.skipped: Optional[str] = None

    def modules_that_run(self) -> Optional[set[nn.Module]]:
        """The modules whose forward ran in the probe, or ``None`` when the model cannot be probed."""
        if not self._done:
            self._ran = self._probe()
            self._done = True
        return self._ran

    def _probe(self) -> Optional[set[nn.Module]]:
        ran: set[nn.Module] = set()
        handles = [m.register_forward_hook(lambda mod, args, out: ran.add(mod)) for m in self.model.modules()]
        try:
            self.skipped = probe_forward(self.model)
        finally:
            for handle in handles:
                handle.remove()
        if self.skipped is not None:
            warnings.warn(
                f"adapterkit could not check that adapter hosts run in this model: {self.skipped}. "
                "An adapter on a module the forward never calls would change nothing.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return ran

    def check(self, sites: Sequence[Site], describe: Callable[[str], str] = str) -> None:
        """Raise ``AdapterError`` naming every site whose host never runs."""
        ran = self.modules_that_run()
        if ran is None:
            return
        silent = [s for s in sites if s.host not in ran]
        if not silent:
            return
        names = {m: n for n, m in self.model.named_modules()}
        hosts = list(dict.fromkeys(names.get(s.host, s.place_id) for s in silent))
        near = _running_linears_near(hosts[0], [n for m, n in names.items() if m in ran and _is_linear(m)])
        suggestion = f" Linear layers near it that do run: {', '.join(near)}." if near else ""
        raise AdapterError(
            f"The model's forward never calls {len(hosts)} module(s) this adapter would sit on: "
            f"{', '.join(hosts[:8])}{' ...' if len(hosts) > 8 else ''}. Their weights are read directly (as "
            "WavLM's attention passes q_proj.weight to F.multi_head_attention_forward), so an adapter there "
            "would train nothing and change nothing. Target other modules with target_modules=..."
            f"{suggestion} Or use a bottleneck adapter (e.g. 'pfeiffer'), which rewrites a sub-layer's output."
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _running_linears_near(name: str, running: list[str], at_least: int = 2, show: int = 4) -> list[str]:
    """Linear modules that ran and share the longest name prefix with ``name``."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut]) + "."
        near = [n for n in running if n.startswith(prefix)]
        if len(near) >= at_least:
            return near[:show]
    return running[:show]

