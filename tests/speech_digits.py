"""A synthetic spoken-digits set for speech recognition (``--task ctc``): digit sequences rendered
as tones (one frequency per digit, short silent gaps) into WAV files, with a TSV of
``path<TAB>transcript`` beside them, and a tiny random wav2vec2 to learn them with.

The transcript of a clip is its digits separated by spaces ("3 1 4"), so each digit is a word
and WER counts digit errors. Used by ``tests/test_ctc.py`` and ``bench/ctc_digits.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile
import torch
import transformers as T

from helpers import ARCHS

RATE = 8000
#: digit d sounds at FREQS[d] Hz (a factor 1.25 apart: 400 Hz ... 2980 Hz)
FREQS = [400 * 1.25**d for d in range(10)]
#: LoRA where a random base needs it for tones: its convolutional front end (random filters
#: blur neighbouring frequencies), the feature projection and attention's query / value
TARGETS = r".*conv_layers\.\d\.conv|.*feature_projection\.projection|.*(q_proj|v_proj)"


def clip(digits: list[int], rng: np.random.Generator) -> np.ndarray:
    """Tones of 60-90 ms for the digits, 20-40 ms of silence between them, a little noise."""
    parts = []
    for i, d in enumerate(digits):
        if i:
            parts.append(np.zeros(int(rng.integers(160, 320))))
        n = int(rng.integers(480, 720))
        t = np.arange(n) / RATE
        ramp = np.minimum(1.0, np.minimum(np.arange(n), n - np.arange(n)) / 40)  # no clicks
        parts.append(rng.uniform(0.3, 0.8) * ramp * np.sin(2 * math.pi * FREQS[d] * t + rng.uniform(0, 6.28)))
    x = np.concatenate(parts)
    return (x + rng.normal(0, 0.01, len(x))).astype("float32")


def write_digits(root: Path, name: str, n: int, seed: int, *, rate: int = RATE, lengths=(2, 4)) -> Path:
    """``n`` clips of 2-4 random digits in ``root/name/``, listed in ``root/name.tsv`` (paths
    relative to the TSV, a ``path<TAB>text`` header)."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    lines = ["path\ttext"]
    for i in range(n):
        digits = [int(d) for d in rng.integers(0, 10, int(rng.integers(lengths[0], lengths[1] + 1)))]
        soundfile.write(str(root / name / f"{i}.wav"), clip(digits, rng), rate)
        lines.append(f"{name}/{i}.wav\t{' '.join(map(str, digits))}")
    tsv = root / f"{name}.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def speech_base(folder: Path, *, layers: int = 2, seed: int = 0, **config_changes) -> Path:
    """A tiny random wav2vec2 (hidden 64, two layers; two 32-channel convolutions, 20 samples per
    frame) with its 8 kHz feature extractor, saved to ``folder``; ``config_changes`` override."""
    torch.manual_seed(seed)
    config = ARCHS["wav2vec2"].config()
    config.num_hidden_layers = layers
    config.conv_dim, config.conv_kernel, config.conv_stride = (32, 32), (10, 8), (5, 4)
    config.hidden_size, config.intermediate_size = 64, 128
    config.update(config_changes)
    T.Wav2Vec2Model(config).save_pretrained(folder)
    T.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder
