"""Speech recognition data (``--task ctc``): a TSV of ``path<TAB>transcript``, a character
vocabulary, and greedy CTC decoding.

The data file has one clip per line, ``path<TAB>text``; a first line ``path<TAB>text`` (any
casing) is a header and skipped. Paths are relative to the TSV's own folder (absolute paths
work too). Clips are read as for audio classification (``audio.read_clip``: mono, the model's
sampling rate or refused, normalised by the model's feature extractor).

The vocabulary is the characters of the training transcripts, laid out as ``transformers``'
``Wav2Vec2CTCTokenizer`` reads a ``vocab.json``: ``<pad>`` (0, also the CTC blank), ``<unk>``
(1, never a target: a character outside the vocabulary is refused, naming it), ``|`` (2, the
word delimiter that stands for a space), then the characters in sorted order. Transcripts are
taken as written (no lower-casing, no punctuation removed); runs of whitespace are one word
boundary, leading and trailing whitespace is dropped.

Greedy decoding (``Vocabulary.decode``): the most probable token per frame, repeats collapsed,
blanks dropped, ``|`` read as a space, as ``Wav2Vec2CTCTokenizer.decode`` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .audio import pad_clips, read_clip
from .files import DataError, _decode, _where

PAD, UNK, DELIMITER = "<pad>", "<unk>", "|"
SPECIAL = (PAD, UNK, DELIMITER)
HEADER = ("path", "text")


@dataclass(frozen=True)
class Transcript:
    """One line of a transcript file: the clip's path (resolved, and as listed) and its text."""

    path: Path
    text: str
    line: int
    listed: str = ""


def read_transcripts(path: "str | Path") -> list[Transcript]:
    """The ``path<TAB>text`` lines of ``path``; refuses missing clips and empty transcripts."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; speech recognition (--task ctc) reads a TSV of path<TAB>transcript "
                        "lines, with paths relative to the TSV's folder.")
    if not path.is_file():
        raise DataError(f"{path}: no such file; --task ctc reads a TSV of clip paths and transcripts "
                        "(path<TAB>text per line).")
    lines = _decode(path, path.read_bytes()).splitlines()
    out: list[Transcript] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        if number == 1 and tuple(f.strip().lower() for f in fields) == HEADER:
            continue
        where = _where(path, number)
        if len(fields) != 2:
            raise DataError(f"{where}: has {len(fields)} tab-separated field(s); --task ctc needs two per line: the "
                            "clip's path, a tab, its transcript.")
        clip, text = fields[0].strip(), " ".join(fields[1].split())
        if not clip:
            raise DataError(f"{where}: the clip path is empty; give the WAV file's path before the tab.")
        if not text:
            raise DataError(f"{where}: the transcript of {clip} is empty; CTC needs text to learn from. Remove the "
                            "line or write the transcript.")
        resolved = path.parent / clip
        if not resolved.is_file():
            raise DataError(f"{where}: no such audio file {resolved} (paths are relative to the TSV's folder); fix "
                            "the path or remove the line.")
        out.append(Transcript(resolved, text, number, clip))
    if not out:
        raise DataError(f"{path}: no clips listed; write one line per clip: path<TAB>transcript.")
    return out


@dataclass(frozen=True)
class Vocabulary:
    """CTC tokens in id order (see module docstring); ``tokens[0]`` is the blank."""

    tokens: tuple[str, ...]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "Vocabulary":
        chars = sorted({c for text in texts for c in text if not c.isspace()} - set(SPECIAL))
        return cls(SPECIAL + tuple(chars))

    @property
    def blank(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.tokens)

    def unknown(self, text: str) -> list[str]:
        """The characters of ``text`` that have no token, in order of first appearance."""
        known = set(self.tokens)
        return list(dict.fromkeys(c for c in text if not c.isspace() and c not in known))

    def encode(self, text: str) -> list[int]:
        """Token ids of a transcript (words joined by ``|``); every character must be known."""
        index = {t: i for i, t in enumerate(self.tokens)}
        return [index[DELIMITER if c == " " else c] for c in " ".join(text.split())]

    def decode(self, frame_ids: Sequence[int]) -> str:
        """Greedy CTC: collapse repeats, drop blanks, ``|`` is a space."""
        out: list[str] = []
        previous = None
        for i in frame_ids:
            if i != previous and i != self.blank:
                token = self.tokens[i]
                out.append(" " if token == DELIMITER else token if token not in SPECIAL else "")
            previous = i
        return " ".join("".join(out).split())

    def to_vocab_json(self) -> dict[str, int]:
        """The ``vocab.json`` ``Wav2Vec2CTCTokenizer`` reads."""
        return {t: i for i, t in enumerate(self.tokens)}


def greedy_ids(logits: "torch.Tensor", frame_mask: "Optional[torch.Tensor]") -> list[list[int]]:
    """The most probable token of every real frame: (B, T, V) logits and the (B, T) frame mask
    (``Layout.hidden_mask``) -> one id list per example, for ``Vocabulary.decode``."""
    best = logits.argmax(-1)  # (B, T)
    frames = frame_mask.sum(-1).tolist() if frame_mask is not None else [logits.shape[1]] * logits.shape[0]
    return [best[b, : int(n)].tolist() for b, n in enumerate(frames)]


def check_known(vocab: Vocabulary, items: Sequence[Transcript], source: "str | Path") -> None:
    """Every character of an evaluation transcript must be in the training vocabulary."""
    for item in items:
        unknown = vocab.unknown(item.text)
        if unknown:
            shown = " ".join(repr(c) for c in unknown)
            raise DataError(f"{_where(Path(source), item.line)}: the transcript has character(s) {shown} that never "
                            "occur in the training transcripts, so the model cannot write them; fix the transcript, "
                            "or add training clips that contain them.")


def ctc_frames_needed(ids: Sequence[int]) -> int:
    """Frames CTC needs for a target: one per token, plus a blank between two equal tokens."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


@dataclass
class CtcSet:
    """Clips of one split with their transcripts and target ids (what the loop reads of data)."""

    values: list[Any]  # float32 numpy arrays (samples,), normalised
    targets: list[list[int]]
    texts: list[str]
    paths: list[str] = field(default_factory=list)
    min_samples: int = 1

    @property
    def dropped(self) -> int:
        return 0

    @property
    def labels(self) -> list[list[int]]:
        return self.targets

    def __len__(self) -> int:
        return len(self.values)

    def lengths(self) -> list[int]:
        return [len(v) for v in self.values]

    def subset(self, index: Sequence[int]) -> "CtcSet":
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return CtcSet(pick(self.values), pick(self.targets), pick(self.texts), pick(self.paths), self.min_samples)

    def collate(self, indices: Sequence[int], *, with_labels: bool = True) -> dict:
        """``input_values`` (B, samples) right-padded, ``attention_mask`` over samples, and
        ``labels`` (B, longest target) padded with -100."""
        batch = pad_clips([self.values[i] for i in indices], self.min_samples)
        if with_labels:
            labels = torch.full((len(indices), max(len(self.targets[i]) for i in indices)), -100, dtype=torch.long)
            for row, i in enumerate(indices):
                labels[row, : len(self.targets[i])] = torch.tensor(self.targets[i])
            batch["labels"] = labels
        return batch


def clip_frames(speech_model: Any) -> Callable[[int], int]:
    """Frames a wav2vec2-style model makes of ``n`` samples (its own
    ``_get_feat_extract_output_lengths``, the count its frame mask uses)."""
    return lambda n: int(speech_model._get_feat_extract_output_lengths(torch.tensor(n)))


def read_ctc_split(path: "str | Path", vocab: Optional[Vocabulary], extractor: Any, min_samples: int,
                   frames: Callable[[int], int]) -> tuple[CtcSet, Vocabulary]:
    """Clips and targets of one TSV. ``vocab=None`` builds the vocabulary from these transcripts
    (the training split); otherwise characters outside it are refused. ``frames(samples)`` is
    the model's frame count for a clip: a clip too short for its transcript is refused, since
    CTC could not align it (``zero_infinity`` would silently ignore it)."""
    items = read_transcripts(path)
    if vocab is None:
        vocab = Vocabulary.from_texts([i.text for i in items])
    else:
        check_known(vocab, items, path)
    rate = extractor.sampling_rate
    values, targets = [], []
    for item in items:
        clip = read_clip(item.path, rate)
        ids = vocab.encode(item.text)
        have, need = frames(len(clip)), ctc_frames_needed(ids)
        if have < need:
            raise DataError(f"{_where(Path(path), item.line)}: {item.listed} lasts {len(clip) / rate:.2f} s, "
                            f"{have} frames of the model, but its transcript needs {need} (one per character and "
                            "space, one more between repeated characters); use a longer clip or a shorter transcript.")
        values.append(extractor(clip, sampling_rate=rate, return_tensors="np").input_values[0].astype("float32"))
        targets.append(ids)
    return CtcSet(values, targets, [i.text for i in items], [str(i.path) for i in items], min_samples), vocab


def transcripts_fingerprint(path: "str | Path") -> dict[str, Any]:
    """Path, content hash (the TSV and every clip it lists) and rows, for ``--resume``."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes())
    items = read_transcripts(path)
    for item in items:
        digest.update(item.path.read_bytes())
    return {"path": str(path.resolve()), "sha256": digest.hexdigest(), "rows": len(items)}


__all__ = ["CtcSet", "Transcript", "Vocabulary", "check_known", "clip_frames", "ctc_frames_needed", "greedy_ids", "read_ctc_split",
           "read_transcripts", "transcripts_fingerprint"]
