"""The docstring examples run (module doctests). The README and docs/ pages: tests/test_docs_examples.py."""

import doctest

import pytest

import adapterkit.config
import adapterkit.model


@pytest.mark.parametrize("module", [adapterkit.model, adapterkit.config])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no doctest examples"
    assert result.failed == 0
