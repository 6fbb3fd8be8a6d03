"""Continuous batching: one decode loop keeps a running batch of rows, each with its own adapter
and sampling settings; a new request is prefilled alone and joins at the next step, a finished
row leaves at once.

**The batch cache.** Every row's keys and values live in one ``DynamicCache`` of shape
``(B, H, P + U, d)`` per layer, laid out per row as ``[dead, prompt, pad, tokens]``:

* ``P`` columns of *prompt region*: the prompt-tuning positions of the row's adapter, right-aligned
  (``p_r`` of them; ``P - p_r`` dead columns in front, masked). ``P`` is the largest ``p_r`` in
  the batch, which is what the input place (``places/input.py``) assumes at a step with a filled
  cache: it extends the 2D mask by ``P`` prompt columns (live where the row has a prompt) and
  shifts each row's positions by ``p_r``;
* ``U`` columns of *token region*: the row's prompt and generated tokens, left-padded (the pad
  columns masked out by the 2D attention mask ``mask`` (B, U) that the loop keeps).

A row is prefilled alone (its own cache, no padding: the exact computation of ``generate``
alone), then merged: both caches are re-laid out to ``max(P, p_r)`` and ``max(U, u_r)`` by
inserting zero columns (dead in front of the prompt region, pads in front of the token region)
and concatenated on the batch dimension. A row that leaves is dropped with ``index_select``, and
columns no remaining row uses are cut off, so the cache stays as narrow as its widest row. Each
step feeds every row's last token with explicit ``position_ids`` (the row's own count of tokens,
so padding never shifts positions) and ``adapter_names`` (per-example routing: LoRA, bottleneck,
IA3, prefix tuning (its prefixes never enter the cache), prompt tuning, unions).

``DecodeBatch`` is the model side and runs only on the server's one worker thread (so loading or
unloading an adapter never runs beside a step); ``DecodeLoop`` is the asyncio side: it queues
rows, runs ``DecodeBatch.tick`` on the worker while any row is queued or running, and hands each
row's ``Update`` to its request.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import AdapterError
from .sampling import SamplingParams, choose, logprobs


class QueueFull(Exception):
    """More rows are waiting than the loop's queue holds (the request answers 429)."""


@dataclass(frozen=True)
class TokenInfo:
    """One generated token, with its log-probability and the top alternatives when asked."""

    token: int
    text: str
    logprob: Optional[float] = None
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Update:
    """What one tick produced for one row: text to add, new tokens, and the end when reached
    (``finish_reason`` "stop" / "length"; or ``error``: (HTTP status, message))."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[tuple[int, str]] = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class Row:
    """One sequence being generated. Written by the worker only (``cancelled`` by the request);
    the request sees it through the ``Update`` objects it is sent."""

    prompt: list[int]
    adapter: Optional[str]
    params: SamplingParams
    sink: Callable[[Update], None] = lambda update: None
    output: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` sent
    prompt_positions: int = 0  # p_r: prompt-tuning positions of the adapter (known after prefill)
    cancelled: bool = False
    finish_reason: Optional[str] = None
    arrived: float = field(default_factory=time.monotonic)
    generator: Optional[torch.Generator] = None

    def __post_init__(self) -> None:
        self.generator = self.params.generator()

    @property
    def length(self) -> int:
        """Tokens of the row in the cache after its next step (prompt + generated)."""
        return len(self.prompt) + len(self.output)

    @property
    def final_length(self) -> int:
        return len(self.prompt) + self.params.max_tokens


class DecodeBatch:
    """The running batch on the model's side (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, tokenizer_lock: Optional[threading.Lock] = None,
                 max_rows: int = 64, max_tokens: int = 65536, max_prefill_tokens: int = 1024):
        self.model, self.tokenizer = model, tokenizer
        self.lock = tokenizer_lock or threading.Lock()
        self.max_rows, self.max_tokens, self.max_prefill_tokens = max_rows, max_tokens, max_prefill_tokens
        config = getattr(model, "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        generation = getattr(getattr(model, "model", model), "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        self.eos: set[int] = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
        forward = inspect.signature(getattr(model, "model", model).forward).parameters
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"  # transformers >= 5.x: cache
        self.rows: list[Row] = []
        self.pending: deque[Row] = deque()
        self._pending_lock = threading.Lock()
        self.cache: Any = None
        self.P = self.U = 0
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, U)
        self.last = torch.zeros(0, dtype=torch.long)  # (B,) each row's newest token (not in the cache yet)
        self.steps = 0

    # -- queueing (any thread) --------------------------------------------------------------------
    def submit(self, rows: list[Row], queue_size: int) -> None:
        with self._pending_lock:
            live = [r for r in self.pending if not r.cancelled]
            if len(live) + len(rows) > queue_size:
                raise QueueFull()
            self.pending = deque(live)
            self.pending.extend(rows)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    # -- one tick (worker thread) -----------------------------------------------------------------
    @torch.inference_mode()
    def tick(self) -> list[tuple[Row, Update]]:
        """Drop rows that have gone, admit and prefill waiting rows, run one decode step; every
        row's update."""
        updates: list[tuple[Row, Update]] = []
        gone = {i for i, r in enumerate(self.rows)
                if r.cancelled or (r.adapter is not None and r.adapter not in self.model.records)}
        for i in sorted(gone):
            if not self.rows[i].cancelled:
                message = f"Adapter '{self.rows[i].adapter}' was unloaded while this request ran."
                updates.append((self.rows[i], Update(error=(404, message))))
        self._keep_rows([i for i in range(len(self.rows)) if i not in gone])
        updates += self._admit()
        if self.rows:
            updates += self._step()
        return updates

    def _admit(self) -> list[tuple[Row, Update]]:
        updates, prefilled = [], 0
        while prefilled < self.max_prefill_tokens and len(self.rows) < self.max_rows:
            with self._pending_lock:
                if not self.pending:
                    break
                row = self.pending[0]
                if not row.cancelled and not self._fits(row):
                    break  # waits for rows to leave (first come, first served)
                self.pending.popleft()
            if row.cancelled:
                continue
            prefilled += len(row.prompt)
            try:
                cache, logits = self._prefill(row)
            except AdapterError as err:
                updates.append((row, Update(error=(400, str(err)))))  # this row only: the batch goes on
                continue
            update = self._advance(row, logits)
            updates.append((row, update))
            if not update.final:
                self._join(row, cache)
        return updates

    def _fits(self, row: Row) -> bool:
        """Room for ``row``: rows, tokens in the batch, and the widest row's positions at its end."""
        if not self.rows:
            return True
        width = max(self.P, self._guess_prompt(row)) + max(max(r.final_length for r in self.rows), row.final_length)
        if self.max_positions is not None and width > self.max_positions:
            return False
        return (len(self.rows) + 1) * (self.P + max(self.U, len(row.prompt))) <= self.max_tokens

    def _guess_prompt(self, row: Row) -> int:
        return max((r.prompt_positions for r in self.rows if r.adapter == row.adapter), default=0)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 names: list[Optional[str]]):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          adapter_names=names, **{self._cache_arg: cache}, **self._keep)

    def _prefill(self, row: Row) -> tuple[Any, torch.Tensor]:
        """The row alone: its cache and the logits of its next token."""
        n = len(row.prompt)
        ids = torch.tensor([row.prompt])
        cache = DynamicCache(config=self.model.model.config)
        out = self._forward(ids, torch.ones_like(ids), torch.arange(n)[None], cache, [row.adapter])
        _layers(cache)  # a cache the loop cannot re-lay out is refused here, for this row (400), not in a step
        row.prompt_positions = cache.get_seq_length() - n
        if self.max_positions is not None and row.prompt_positions + row.final_length > self.max_positions:
            raise AdapterError(f"The prompt ({n} tokens{self._with_prompt(row)}) and max_tokens="
                               f"{row.params.max_tokens} need {row.prompt_positions + row.final_length} positions; "
                               f"this model has {self.max_positions}. Shorten the prompt or lower max_tokens.")
        return cache, out.logits[0, -1]

    @staticmethod
    def _with_prompt(row: Row) -> str:
        return f" after the adapter's {row.prompt_positions} prompt positions" if row.prompt_positions else ""

    def _step(self) -> list[tuple[Row, Update]]:
        """One token for every running row."""
        batch = len(self.rows)
        mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], dim=1)  # (B, U + 1)
        positions = torch.tensor([[r.length - 1] for r in self.rows])  # the newest token's own position
        out = self._forward(self.last[:, None], mask, positions, self.cache, [r.adapter for r in self.rows])
        self.mask, self.U = mask, self.U + 1  # the cache grew in place
        self.steps += 1
        logits = out.logits[:, -1]  # (B, V)
        updates, keep = [], []
        for i, row in enumerate(self.rows):
            update = self._advance(row, logits[i])
            updates.append((row, update))
            if not update.final:
                keep.append(i)
        self.last = torch.tensor([r.output[-1] for r in self.rows], dtype=torch.long)
        if len(keep) < batch:
            self._keep_rows(keep)
        return updates

    def _advance(self, row: Row, logits: torch.Tensor) -> Update:
        """Choose the row's next token and read what it adds (text, log-probabilities, the end)."""
        params = row.params
        token = choose(logits, params, row.generator)
        row.output.append(token)
        with self.lock:
            text = self.tokenizer.decode(row.output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            piece = self.tokenizer.decode([token], clean_up_tokenization_spaces=False) \
                if params.logprobs is not None else ""
        info = TokenInfo(token, piece)
        if params.logprobs is not None:
            chosen, top = logprobs(logits, token, params.logprobs)
            with self.lock:
                named = tuple((self.tokenizer.decode([t], clean_up_tokenization_spaces=False), lp) for t, lp in top)
            info = TokenInfo(token, piece, chosen, named)
        cuts = [text.find(s) for s in params.stop if s and s in text]
        if cuts:
            text, row.finish_reason = text[:min(cuts)], "stop"
        elif token in self.eos or token in params.stop_token_ids:
            row.finish_reason = "stop"
        elif len(row.output) >= params.max_tokens:
            row.finish_reason = "length"
        row.text = text
        return Update(self._new_text(row), [info], row.finish_reason)

    @staticmethod
    def _new_text(row: Row) -> str:
        """The text that can be sent now: all of it at the end; before, none that a later token
        may still change (an incomplete UTF-8 character) or that may start a stop string."""
        safe = row.text
        if row.finish_reason is None:
            safe = safe.rstrip("\ufffd")
            hold = max((len(s) for s in row.params.stop), default=1) - 1
            safe = safe[:max(row.emitted, len(safe) - hold)]
        if len(safe) <= row.emitted or not safe.startswith(row.text[:row.emitted]):
            return ""
        new, row.emitted = safe[row.emitted:], len(safe)
        return new

    # -- the cache ----------------------------------------------------------------------------------
    def _join(self, row: Row, cache: Any) -> None:
        """Merge a prefilled row into the batch (module docstring)."""
        p, u = row.prompt_positions, len(row.prompt)
        token = torch.tensor([row.output[-1]])
        if not self.rows:
            self.cache, self.P, self.U = cache, p, u
            self.mask = torch.ones(1, u, dtype=torch.long)
            self.rows, self.last = [row], token
            return
        P, U = max(self.P, p), max(self.U, u)
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            for attr in ("keys", "values"):
                setattr(mine, attr, torch.cat([_relayout(getattr(mine, attr), self.P, P, U),
                                               _relayout(getattr(theirs, attr), p, P, U)], dim=0))
        self.mask = torch.cat([_pad_left(self.mask, U), _pad_left(torch.ones(1, u, dtype=torch.long), U)], dim=0)
        self.P, self.U = P, U
        self.rows.append(row)
        self.last = torch.cat([self.last, token])

    def fail_all(self, status: int, message: str) -> list[tuple[Row, Update]]:
        """End every running and waiting row with an error (a step failed); the batch is empty after."""
        with self._pending_lock:
            rows, self.pending = self.rows + list(self.pending), deque()
        self._keep_rows([])
        return [(row, Update(error=(status, message))) for row in rows]

    def _keep_rows(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay; columns no remaining row uses are cut off."""
        if len(keep) == len(self.rows) and self.rows:
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.P, self.U = None, 0, 0
            self.mask, self.last = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        mask = self.mask.index_select(0, index)
        cut = int(mask.any(0).long().argmax())  # leading pad columns no row uses
        P = max(r.prompt_positions for r in self.rows)
        for layer in _layers(self.cache):
            for attr in ("keys", "values"):
                t = getattr(layer, attr).index_select(0, index)
                setattr(layer, attr, torch.cat([t[:, :, self.P - P:self.P], t[:, :, self.P + cut:]], dim=2))
        self.mask, self.P, self.U = mask[:, cut:], P, self.U - cut
        self.last = self.last.index_select(0, index)


def _layers(cache: Any) -> list[Any]:
    layers = list(cache.layers)
    if any(type(layer) is not DynamicLayer for layer in layers):
        raise AdapterError("Continuous batching needs a plain key/value cache in every layer (no sliding window); "
                           "this model's cache has other layers.")
    return layers


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)


def _relayout(t: torch.Tensor, p: int, P: int, U: int) -> torch.Tensor:
    """(B, H, p + u, d) laid out as [prompt p, tokens u] -> (B, H, P + U, d) as
    [dead P - p, prompt p, pad U - u, tokens u] (zeros where dead or padded)."""
    b, h, length, d = t.shape
    u = length - p
    if P == p and U == u:
        return t
    return torch.cat([t.new_zeros(b, h, P - p, d), t[:, :, :p], t.new_zeros(b, h, U - u, d), t[:, :, p:]], dim=2)


class DecodeLoop:
    """The asyncio side: runs ``batch.tick`` on the worker while rows are queued or running."""

    def __init__(self, batch: DecodeBatch, on_worker: Callable[..., Awaitable[Any]], *, queue_size: int):
        self.batch, self.on_worker, self.queue_size = batch, on_worker, queue_size
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, rows: list[Row]) -> None:
        """Queue rows (raises ``QueueFull``); they join the batch at the next tick."""
        self.batch.submit(rows, self.queue_size)
        self._wake.set()

    @property
    def depth(self) -> int:
        return len(self.batch.pending)

    async def _run(self) -> None:
        while True:
            if not self.batch.busy:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                updates = await self.on_worker(self.batch.tick)
            except Exception as err:  # noqa: BLE001 - a bug in a step: its rows get the error, the loop goes on
                updates = self.batch.fail_all(500, f"Generation failed ({type(err).__name__}: {err}).")
            for row, update in updates:
                row.sink(update)


__all__ = ["DecodeBatch", "DecodeLoop", "QueueFull", "Row", "TokenInfo", "Update"]
