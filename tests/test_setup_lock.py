"""Setup changes and forwards in other threads (``setup_lock.py``): a forward either runs with a
whole, consistent setup and gives the adapter's own answer, or fails with a clean
``AdapterError``; never a wrong answer, never a ``TypeError`` from a half-changed model."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import transformers as T

from adapterkit import AdapterError, AdapterModel
from adapterkit.setup_lock import SetupLock, lock_of
from helpers import perturb


def _model() -> AdapterModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       vocab_size=100)
    model = AdapterModel(T.BertModel(cfg).eval())
    model.add_adapter("pf", "pfeiffer")
    model.add_adapter("lora", "lora", r=2)
    perturb(model.adapters, scale=0.3)
    return model.eval()


def test_forwards_during_delete_and_reload_give_the_adapters_answer_or_a_clean_error(tmp_path):
    model = _model()
    model.save_adapter(tmp_path / "lora", "lora")
    x = torch.randint(3, 100, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=x, adapter_names=["lora"] * 4).last_hidden_state
        base = model(input_ids=x).last_hidden_state
    assert (want - base).abs().max() > 0.05  # the adapter changes the answer
    stop = threading.Event()
    done: list[float] = []
    failures: list[BaseException] = []

    def forward() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    out = model(input_ids=x, adapter_names=["lora"] * 4).last_hidden_state
                done.append(float((out - want).abs().max()))
            except BaseException as err:  # noqa: BLE001 - every failure is examined below
                failures.append(err)

    threads = [threading.Thread(target=forward) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            model.delete_adapter("lora")
            time.sleep(0.002)
            model.load_adapter(tmp_path / "lora")
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert done and max(done) == 0.0, f"{sum(d > 0 for d in done)} of {len(done)} forwards gave wrong outputs"
    bad = [f"{type(e).__name__}: {e}" for e in failures
           if not isinstance(e, AdapterError) or "adapters in this model: pf." not in str(e)]
    assert not bad, bad[:3]


def test_a_change_waits_for_the_forward_in_flight():
    lock, order = SetupLock(), []
    inside = threading.Event()

    def reader() -> None:
        with lock.reading():
            inside.set()
            time.sleep(0.05)
            order.append("forward done")

    t = threading.Thread(target=reader)
    t.start()
    inside.wait()
    with lock.writing():
        order.append("change")
    t.join()
    assert order == ["forward done", "change"]


def test_a_waiting_change_holds_new_forwards_back():
    lock, order = SetupLock(), []
    first_in, writer_waiting = threading.Event(), threading.Event()

    def first() -> None:
        with lock.reading():
            first_in.set()
            writer_waiting.wait()
            while not lock._waiting_writers:
                time.sleep(0.001)
            time.sleep(0.05)  # the later forward tries to start meanwhile
        order.append("first done")

    def writer() -> None:
        first_in.wait()
        writer_waiting.set()
        with lock.writing():
            order.append("change")

    def later() -> None:
        writer_waiting.wait()
        while not lock._waiting_writers:  # until the writer is queued
            time.sleep(0.001)
        with lock.reading():
            order.append("later forward")

    threads = [threading.Thread(target=f) for f in (first, writer, later)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order.index("change") < order.index("later forward")


def test_changes_nest_and_a_change_inside_a_forward_is_refused():
    model = _model()
    model.add_adapter("lora", "lora", r=2, overwrite=True)  # a change calling a change (delete) in one thread
    with model.disable_adapters(), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))  # a forward inside a change's block
    handle = model.model.encoder.layer[0].register_forward_hook(lambda *a: model.delete_adapter("pf"))
    try:
        with pytest.raises(AdapterError, match=r"call delete_adapter\(\) from inside a forward of the same model"):
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        handle.remove()
    assert set(model.adapters) == {"pf", "lora"}
    model.delete_adapter("pf")  # the lock was released


def test_copies_get_their_own_lock():
    model = _model()
    lock = lock_of(model)
    twin = copy.deepcopy(model)
    assert lock_of(twin) is not lock
    ran = threading.Event()

    def forward_twin() -> None:
        with torch.no_grad():
            twin(input_ids=torch.tensor([[5, 6, 7]]))
        ran.set()

    with lock.writing():  # the original's lock held: the copy still runs in another thread
        t = threading.Thread(target=forward_twin)
        t.start()
        assert ran.wait(timeout=30)
    t.join()
