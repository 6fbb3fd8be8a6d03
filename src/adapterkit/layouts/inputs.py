"""What a vision or speech model reads, checked before its forward, and its frame-level mask.

Image models (ViT, DeiT) take ``pixel_values`` ``(batch, channels, height, width)`` with the
config's ``num_channels`` and ``image_size`` (another size only with
``interpolate_pos_encoding=True``). Speech models (wav2vec2, HuBERT, WavLM) take mono
``input_values`` ``(batch, samples)``, at least as many samples as the convolutional feature
encoder needs for one frame. A call that breaks this is refused with an ``AdapterError`` naming
the layout and the fix, before anything runs (``transformers`` would fail deep inside, or, for a
``(batch, 1, samples)`` tensor, not at all).

Speech models shorten the input ``attention_mask`` (one entry per sample) to one per frame;
``hidden_mask`` does the same for the heads, with the model's own
``_get_feature_vector_attention_mask``, so audio heads average over real frames only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ..errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from . import Layout


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]  # type: ignore[return-value]


def _check_image(layout: "Layout", inputs: Mapping[str, Any]) -> None:
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        return
    name, config = layout.spec.name, layout.config
    channels = getattr(config, "num_channels", 3)
    height, width = _image_size(config)
    if pixels.dim() != 4:
        raise AdapterError(
            f"The {name} layout takes pixel_values of shape (batch, {channels}, {height}, {width}); got "
            f"{tuple(pixels.shape)}. Add the batch dimension (pixel_values.unsqueeze(0)) or use the model's image "
            "processor.")
    if pixels.shape[1] != channels:
        raise AdapterError(
            f"The {name} layout takes {channels}-channel images (pixel_values (batch, {channels}, {height}, {width})); "
            f"got {pixels.shape[1]} channels in {tuple(pixels.shape)}. Convert the images (e.g. to RGB), or put the "
            "channels first (pixel_values.permute(0, 3, 1, 2)) if they are last.")
    if tuple(pixels.shape[2:]) != (height, width) and not inputs.get("interpolate_pos_encoding"):
        raise AdapterError(
            f"The {name} layout takes {height}x{width} images (config.image_size); got {pixels.shape[2]}x"
            f"{pixels.shape[3]}. Resize them with the model's image processor, or pass interpolate_pos_encoding=True.")


def min_samples(model: torch.nn.Module) -> int:
    """The fewest samples a wav2vec2-style feature encoder turns into one frame."""
    config = model.config
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need


def _check_audio(layout: "Layout", inputs: Mapping[str, Any]) -> None:
    values = inputs.get("input_values")
    if not isinstance(values, torch.Tensor):
        return
    name = layout.spec.name
    if values.dim() != 2 or not values.is_floating_point():
        hint = (" Mix the channels down (e.g. input_values.mean(1)) or drop the channel axis (squeeze(1))."
                if values.dim() == 3 else " Add the batch dimension (input_values.unsqueeze(0))."
                if values.dim() == 1 else "")
        raise AdapterError(
            f"The {name} layout takes mono audio as float input_values of shape (batch, samples); got "
            f"{values.dtype} {tuple(values.shape)}.{hint}")
    need = min_samples(layout.model)
    if values.shape[1] < need:
        raise AdapterError(
            f"The {name} layout needs at least {need} samples per example (one frame of its feature encoder); got "
            f"{values.shape[1]}. Pad short clips with zeros (and mark the padding in attention_mask).")


_CHECKS: dict[str, Callable[["Layout", Mapping[str, Any]], None]] = {"image": _check_image, "audio": _check_audio}


def check_inputs(layout: "Layout", inputs: Mapping[str, Any]) -> None:
    """Refuse image / audio tensors the layout's model cannot take (see the module docstring)."""
    if layout.spec is None:
        return
    check = _CHECKS.get(layout.spec.modality)
    if check is not None:
        check(layout, inputs)


#: inputs a batch can arrive as; the first one present gives the batch size and device
INPUT_KINDS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def hidden_mask(layout: "Layout", attention_mask: Optional[torch.Tensor], hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask over the positions of ``hidden`` (B, T, d): the input mask for text, the
    frame-level mask for speech models, ``None`` without a mask."""
    if attention_mask is None or layout.spec is None or layout.spec.modality != "audio":
        return attention_mask
    if attention_mask.shape[1] == hidden.shape[1]:
        return attention_mask  # already one entry per frame
    return layout.model._get_feature_vector_attention_mask(hidden.shape[1], attention_mask).long()
