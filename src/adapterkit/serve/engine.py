"""The model work of the server: tokenising, classify and generate batches, reading each head's
output in its own shape, loading and removing adapters.

``encode_*`` run on the event loop when a request arrives (so its size is known before it
queues); everything else runs on the one worker thread, so a load or an unload never runs beside
a forward. The worker pads batches itself (``pad_sequence``); it takes the tokenizer (under a lock:
a fast tokenizer must not be used by two threads at once) only to decode generated text.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import AdapterError
from ..heads import HeadConfig
from ..loader import load_tokenizer, max_positions
from ..model import AdapterModel
from ..sharing import local_model
from .config import ServeConfig

#: ``max_length`` when the configuration leaves it open (lowered to the model's positions)
DEFAULT_MAX_LENGTH = 512


@dataclass
class Encoded:
    """One example as token ids, with what tagging needs to name its words."""

    text: str
    features: dict[str, list[int]]
    word_ids: list[Optional[int]] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.features["input_ids"])


@dataclass
class ClassifyJob:
    adapter: str
    examples: list[Encoded]


@dataclass
class GenerateJob:
    adapter: Optional[str]
    prompt: Encoded
    stop: list[str]
    cancelled: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class ClassifyKey:
    """Classify requests batch together when these are equal: ``adapter`` is ``None`` (every
    request with every other; each example gets its adapter's head) unless the server batches
    one adapter at a time (``ServeConfig.mixed_batches=False``)."""

    adapter: Optional[str] = None
    kind: str = "classify"


@dataclass(frozen=True)
class GenerateKey:
    """Generate requests batch together only when these are equal."""

    max_new_tokens: int
    temperature: float
    kind: str = "generate"


class Engine:
    """One frozen base model with its adapters and tokenizer, in eval mode."""

    def __init__(self, model: AdapterModel, tokenizer: Any, config: ServeConfig):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self._tokenizer_lock = threading.Lock()
        can_generate = getattr(model.model, "can_generate", None)
        self.causal_lm = bool(can_generate and can_generate() and model.layout.is_decoder)
        self.positions = max_positions(getattr(model.model, "config", None))  # None: unbounded
        self.max_length = _max_length(config.max_length, self.positions)
        eos = getattr(getattr(model.model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    # -- on the event loop -----------------------------------------------------------------------
    def encode_texts(self, texts: list[str], pairs: Optional[list[str]]) -> list[Encoded]:
        """Token ids of each text (and its pair); with a fast tokenizer also word ids and offsets
        (tagging needs them), read from its ``tokenizers`` backend (the same ids as calling the
        tokenizer, at a small share of its per-call cost)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) \
            else None
        if backend is None:
            with self._tokenizer_lock:
                enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
            return [Encoded(text, {k: enc[k][i] for k in enc.keys()}) for i, text in enumerate(texts)]
        keys = self.tokenizer.model_input_names
        with self._tokenizer_lock:
            backend.enable_truncation(self.max_length)  # the state truncation=True, max_length=...,
            backend.no_padding()  # padding=False would set (the backend keeps whatever the last call left)
            encodings = [backend.encode(t) for t in texts] if pairs is None else \
                [backend.encode(t, p) for t, p in zip(texts, pairs)]
        out = []
        for text, e in zip(texts, encodings):
            features = {"input_ids": e.ids}
            if "token_type_ids" in keys:
                features["token_type_ids"] = e.type_ids
            if "attention_mask" in keys:
                features["attention_mask"] = e.attention_mask
            # tagging names the words of the first text only (a pair's second text has its own word ids)
            words = [w if s == 0 else None for w, s in zip(e.word_ids, e.sequence_ids)]
            out.append(Encoded(text, features, words, e.offsets))
        return out

    def encode_prompt(self, prompt: str) -> Encoded:
        """The prompt's token ids, whole: never cut (the caller refuses one over ``max_length``,
        whose end, the question, cutting would lose)."""
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        return Encoded(prompt, {"input_ids": ids, "attention_mask": [1] * len(ids)})

    # -- on the worker thread --------------------------------------------------------------------
    def _pad(self, features: list[dict[str, list[int]]], side: str) -> dict[str, torch.Tensor]:
        """The batch as tensors, padded to its longest example (``pad_sequence``: no tokenizer
        call, so the event loop never waits on the tokenizer lock for a padding)."""
        pad_id = self.tokenizer.pad_token_id or 0
        return {key: pad_sequence([torch.tensor(f[key]) for f in features], batch_first=True,
                                  padding_value=pad_id if key == "input_ids" else 0, padding_side=side)
                for key in features[0]}

    @torch.inference_mode()
    def classify(self, key: ClassifyKey, jobs: list[ClassifyJob]) -> list[list[dict[str, Any]]]:
        """Every job's examples in one forward, each through its adapter and its adapter's head."""
        examples = [e for job in jobs for e in job.examples]
        names = [job.adapter for job in jobs for _ in job.examples]
        batch = self._pad([e.features for e in examples], "right")
        if "token_type_ids" in batch and not _takes_token_types(self.model):
            batch.pop("token_type_ids")
        out = self.model(**batch, adapter_names=names, routed_heads=True)
        rows: dict[str, list[int]] = {}  # each head's rows, read together (one softmax / tolist per head)
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        read: list[dict[str, Any]] = [{}] * len(examples)
        for name, index in rows.items():
            config = self.model.heads[name].config
            logits = torch.stack([out.logits[i] for i in index]).float()
            for i, answer in zip(index, _READERS[config.type](config, logits, [examples[i] for i in index])):
                read[i] = answer
        results, start = [], 0
        for job in jobs:
            results.append(read[start:start + len(job.examples)])
            start += len(job.examples)
        return results

    @torch.inference_mode()
    def generate(self, key: GenerateKey, jobs: list[GenerateJob]) -> list[dict[str, Any]]:
        """The jobs' prompts in one ``generate`` with per-prompt adapters; stops early when every
        job's client has gone."""
        class _AllGone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), all(j.cancelled() for j in jobs), dtype=torch.bool)

        batch = self._pad([j.prompt.features for j in jobs], "left")
        options: dict[str, Any] = {"max_new_tokens": key.max_new_tokens, "do_sample": key.temperature > 0,
                                   "pad_token_id": self.tokenizer.pad_token_id,
                                   "stopping_criteria": StoppingCriteriaList([_AllGone()])}
        if key.temperature > 0:
            options["temperature"] = key.temperature
        ids = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  adapter_names=[j.adapter for j in jobs], **options)
        new = ids[:, batch["input_ids"].shape[1]:]
        with self._tokenizer_lock:
            texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return [_cut(text, job.stop, int((row != self.tokenizer.pad_token_id).sum()),
                     ended=any(int(t) in self.eos_ids for t in row)) for text, job, row in zip(texts, jobs, new)]

    def run(self, key: "ClassifyKey | GenerateKey", jobs: list[Any]) -> list[Any]:
        """A batch of jobs of one key (``Batcher``'s ``run``)."""
        return self.classify(key, jobs) if isinstance(key, ClassifyKey) else self.generate(key, jobs)

    def load(self, name: str, directory: str) -> dict[str, Any]:
        """Load an adapter folder under ``name``; its description for ``GET /v1/adapters``."""
        self.model.load_adapter(directory, load_as=name)
        return self.describe(name)

    def unload(self, name: str) -> None:
        self.model.delete_adapter(name)

    def describe(self, name: str) -> dict[str, Any]:
        record = self.model.records[name]
        head = self.model.heads[name].config if name in self.model.heads else None
        return {"method": record.config.method,
                "head": None if head is None else {"type": head.type, "num_labels": head.num_labels,
                                                   "multilabel": head.multilabel, "labels": _labels(head)}}


def _takes_token_types(model: AdapterModel) -> bool:
    return (getattr(model.config, "type_vocab_size", 0) or 0) > 1


def _labels(config: HeadConfig) -> list[str]:
    return [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def _read_classification(config: HeadConfig, logits: torch.Tensor, examples: list[Encoded]) -> list[dict[str, Any]]:
    labels = _labels(config)
    if config.multilabel:
        return [{"labels": [l for l, p in zip(labels, probs) if p >= 0.5], "probabilities": dict(zip(labels, probs))}
                for probs in torch.sigmoid(logits).tolist()]
    answers = []
    for probs in torch.softmax(logits, -1).tolist():
        best = max(range(len(probs)), key=probs.__getitem__)
        answers.append({"label": labels[best], "probability": probs[best], "probabilities": dict(zip(labels, probs))})
    return answers


def _read_regression(config: HeadConfig, logits: torch.Tensor, examples: list[Encoded]) -> list[dict[str, Any]]:
    return [{"values": values} for values in logits.tolist()]


def _read_tagging(config: HeadConfig, logits: torch.Tensor, examples: list[Encoded]) -> list[dict[str, Any]]:
    """One tag per word (the word's first token decides), words as the tokenizer split them."""
    labels = _labels(config)
    return [_tag_words(labels, best, example) for best, example in zip(logits.argmax(-1).tolist(), examples)]


def _tag_words(labels: list[str], best: list[int], example: Encoded) -> dict[str, Any]:
    tags: list[str] = []
    spans: dict[int, list[int]] = {}
    for t, w in enumerate(example.word_ids):
        if w is not None:
            if w not in spans:
                spans[w] = [t, *example.offsets[t]]
                tags.append(labels[best[t]])
            spans[w][2] = example.offsets[t][1]
    return {"tokens": [example.text[start:end] for _, start, end in spans.values()], "tags": tags}


#: head type -> reader of that head's rows (n, ...) into one answer per example
_READERS: dict[str, Callable[[HeadConfig, torch.Tensor, list[Encoded]], list[dict[str, Any]]]] = {
    "classification": _read_classification, "regression": _read_regression, "tagging": _read_tagging}


def _cut(text: str, stop: list[str], tokens: int, ended: bool = False) -> dict[str, Any]:
    """The generated text up to the first stop string (excluded); ``finish_reason`` is "stop"
    when a stop string or the end-of-sequence token (``ended``) ended it, else "length"."""
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        return {"text": text[:min(cuts)], "finish_reason": "stop", "tokens": tokens}
    return {"text": text, "finish_reason": "stop" if ended else "length", "tokens": tokens}


def _max_length(asked: Optional[int], positions: Optional[int]) -> int:
    """The tokens per text: ``asked``, refused when over the model's ``positions``; when not
    asked, ``DEFAULT_MAX_LENGTH`` or the positions if fewer."""
    if asked is None:
        return min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions is not None and asked > positions:
        raise AdapterError(f"serve --max-length {asked} is more than the model can take: its position embeddings hold "
                           f"{positions} tokens; pass --max-length {positions} or less.")
    return asked


__all__ = ["Engine", "Encoded", "ClassifyJob", "ClassifyKey", "GenerateJob", "GenerateKey"]


def build_engine(config: ServeConfig) -> Engine:
    """Load the base model, its tokenizer and the start-up adapters (``adapterkit serve`` and
    each Ray replica start here)."""
    base = local_model(config.model)  # a base given as a location (s3://, hf://, ...) is fetched into the cache
    model = AdapterModel.from_pretrained(base)
    for name, directory in config.adapters.items():
        model.load_adapter(directory, load_as=name)
    return Engine(model, load_tokenizer(base), config)
