"""Audio classification data: a folder of WAV files, one subfolder per label.

The layout is the one ``datasets``' ``audiofolder`` and torchvision's ``ImageFolder`` use::

    data/train/yes/clip1.wav      data/dev/yes/...      (--train data/train --eval data/dev)
    data/train/no/clip7.wav       data/dev/no/...

Labels are the subfolder names (sorted); every ``*.wav`` / ``*.flac`` / ``*.ogg`` file directly
inside a label folder is one example. Files are read with ``soundfile`` (libsndfile), mixed down
to mono by averaging the channels, and must have the sampling rate of the model's feature
extractor (``preprocessor_config.json`` beside the model): a different rate is refused naming
the file and the fix (resample beforehand, e.g. ``sox in.wav -r 16000 out.wav``), since
resampling silently would change what the model hears. The feature extractor then normalises
each clip as the model expects (``do_normalize``); batches are right-padded with zeros and
carry an ``attention_mask`` over samples.

``AudioSet`` offers what the training loop reads from encoded text (``labels``, ``lengths()``,
``subset``, ``collate``), so ``adapterkit train`` runs on it unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import transformers

from ..packaged import resolve_model
from .files import DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def is_audio_folder(path: Optional[str]) -> bool:
    """Whether ``path`` is a folder of label subfolders (audio data) rather than a data file."""
    return bool(path) and Path(path).is_dir()


def _files(root: Path) -> list[tuple[Path, str]]:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; audio data is a folder with one subfolder of WAV files per label.")
    labels = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [(f, label.name) for label in labels for f in sorted(label.iterdir())
             if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES]
    if not found:
        raise DataError(f"{root}: no audio files found; put WAV files in one subfolder per label, e.g. "
                        f"{root}/yes/clip1.wav and {root}/no/clip2.wav.")
    return found


def load_feature_extractor(model: str) -> Any:
    """The model's feature extractor (its ``preprocessor_config.json``), offline."""

    folder, _ = resolve_model(model)
    if not (folder / "preprocessor_config.json").is_file():
        raise DataError(f"'{model}' has no preprocessor_config.json (its feature extractor: sampling rate and "
                        "normalisation), which audio data needs; save one beside the model, e.g. "
                        "Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder).")
    try:
        return transformers.AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # OSError, ValueError, ... for a damaged file
        raise DataError(f"'{model}': cannot read its preprocessor_config.json ({type(err).__name__}); fix or "
                        "re-save it with the feature extractor's save_pretrained(folder).") from None


def read_clip(path: Path, sampling_rate: int) -> Any:
    """One clip as a float32 mono numpy array; refuses another sampling rate."""
    import soundfile  # noqa: PLC0415 - optional dependency: soundfile (audio files)

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile.LibsndfileError and friends for damaged files
        raise DataError(f"{path}: cannot read the audio ({type(err).__name__}: {err}); use WAV, FLAC or OGG "
                        "files.") from None
    if rate != sampling_rate:
        raise DataError(f"{path}: sampled at {rate} Hz, but the model's feature extractor expects {sampling_rate} Hz; "
                        f"resample the files first (e.g. sox in.wav -r {sampling_rate} out.wav). adapterkit does not "
                        "resample silently.")
    if data.shape[0] == 0:
        raise DataError(f"{path}: the file holds no samples; remove it.")
    return data.mean(axis=1)  # (samples,), channels mixed down


@dataclass
class AudioSet:
    """Clips of one split, normalised by the feature extractor, with their label ids."""

    values: list[Any]  # float32 numpy arrays (samples,)
    labels: list[int]
    paths: list[str] = field(default_factory=list)
    min_samples: int = 1

    @property
    def dropped(self) -> int:  # what the loop reads of encoded text
        return 0

    def __len__(self) -> int:
        return len(self.values)

    def lengths(self) -> list[int]:
        return [len(v) for v in self.values]

    def subset(self, index: Sequence[int]) -> "AudioSet":
        return AudioSet([self.values[i] for i in index], [self.labels[i] for i in index],
                        [self.paths[i] for i in index], self.min_samples)

    def collate(self, indices: Sequence[int], *, with_labels: bool = True) -> dict:
        """Right-padded ``input_values`` (B, samples) with an ``attention_mask`` over samples."""
        batch = pad_clips([self.values[i] for i in indices], self.min_samples)
        if with_labels:
            batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return batch


def pad_clips(clips: Sequence[Any], min_samples: int = 1) -> dict[str, torch.Tensor]:
    """``input_values`` (B, samples): the clips (1-d float arrays) right-padded with zeros to the
    longest (at least ``min_samples``), and the ``attention_mask`` over their real samples."""
    width = max(min_samples, max(len(c) for c in clips))
    values = torch.zeros(len(clips), width)
    mask = torch.zeros(len(clips), width, dtype=torch.long)
    for row, c in enumerate(clips):
        values[row, : len(c)] = torch.from_numpy(c)
        mask[row, : len(c)] = 1
    return {"input_values": values, "attention_mask": mask}


def read_split(root: "str | Path", labels: Optional[list[str]], extractor: Any, min_samples: int = 1) -> tuple[AudioSet, list[str]]:
    """Every clip under ``root``; ``labels`` fixes the label order (the training split's) and
    refuses labels outside it."""
    root = Path(root)
    files = _files(root)
    names = labels if labels is not None else sorted({label for _, label in files})
    unknown = sorted({label for _, label in files} - set(names))
    if unknown:
        raise DataError(f"{root}: label folder(s) {unknown} do not occur in the training data (labels: {names}); "
                        "rename or remove them.")
    rate = extractor.sampling_rate
    values = []
    for path, _ in files:
        clip = read_clip(path, rate)
        values.append(extractor(clip, sampling_rate=rate, return_tensors="np").input_values[0].astype("float32"))
    ids = [names.index(label) for _, label in files]
    return AudioSet(values, ids, [str(p) for p, _ in files], min_samples), names


def is_audio_file(path: "str | Path") -> bool:
    return Path(path).suffix.lower() in AUDIO_SUFFIXES


def prediction_clips(sources: Sequence["str | Path"], extractor: Any, min_samples: int = 1) -> AudioSet:
    """The clips ``adapterkit predict`` reads: audio files, and every audio file under a folder
    (sorted, at any depth), normalised like training data; the labels are placeholders."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and is_audio_file(f))
            if not found:
                raise DataError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder.")
            files += found
        elif path.is_file() and is_audio_file(path):
            files.append(path)
        else:
            raise DataError(f"{path}: no such audio file; pass WAV, FLAC or OGG files, or folders of them.")
    rate = extractor.sampling_rate
    values = [extractor(read_clip(f, rate), sampling_rate=rate, return_tensors="np").input_values[0].astype("float32")
              for f in files]
    return AudioSet(values, [0] * len(files), [str(f) for f in files], min_samples)


def folder_fingerprint(root: "str | Path") -> dict[str, Any]:
    """Path, content hash and size of an audio folder (for ``--resume``'s same-data check)."""
    root = Path(root)
    digest = hashlib.sha256()
    files = _files(root)
    for path, label in files:
        digest.update(f"{label}/{path.name}\0".encode())
        digest.update(path.read_bytes())
    return {"path": str(root.resolve()), "sha256": digest.hexdigest(), "rows": len(files)}


__all__ = ["AUDIO_SUFFIXES", "AudioSet", "is_audio_file", "is_audio_folder", "load_feature_extractor", "read_clip",
           "read_split", "prediction_clips", "folder_fingerprint"]
