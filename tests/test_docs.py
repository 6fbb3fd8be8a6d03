"""The examples in the docs run: module doctests and the README quickstart (on real MiniLM)."""

import doctest
import re
from pathlib import Path

import pytest

import adapterkit.config
import adapterkit.model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [adapterkit.model, adapterkit.config])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no doctest examples"
    assert result.failed == 0


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README quickstart", "exec"), namespace)
    model = namespace["model"]
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("adapters.sst2.", "heads.sst2.")) for n in grads)
    assert (tmp_path / "out/sst2/adapter_model.safetensors").is_file()
