"""Fixtures shared by the test suite; the case table itself lives in ``helpers.py``."""

from __future__ import annotations

import pytest
import torch

from helpers import ARCHS, SST2_DIR, make_batch

# The models are tiny and the machine is shared: one intra-op thread avoids oversubscription
# stalls (two threads spin-waiting on a busy core cost more than they gain at this size).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (adapter inits draw from it)."""
    torch.manual_seed(0)


@pytest.fixture
def batch(request):
    """The shared batch, with decoder inputs when the test's ``case`` / ``arch`` / ``arch_name``
    parameter is an encoder-decoder."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    arch = params.get("arch") or getattr(params.get("case"), "arch", None) or ARCHS.get(params.get("arch_name"))
    return make_batch(arch=arch)


@pytest.fixture(scope="session")
def sst2_dir():
    if not (SST2_DIR / "train.tsv").is_file():
        pytest.fail(f"SST-2 data not found at {SST2_DIR}; the repository expects ../shared beside it.")
    return SST2_DIR
