"""Every ```python block of README.md and docs/*.md runs, so the examples never rot.

The blocks of one page run in order in one namespace, in a temporary folder (what a reader typing
them in one session would see). A block that cannot run here (a GPU, a running server, torchrun,
a model download) carries a visible marker on the line right before its fence::

    <!-- not-run: the reason -->

Those are counted and their share is kept small. The pages must also name every page in the site's
nav and carry no internal work-item numbers ("issue 12").
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# an opening fence (indented in lists too), its info word, the body, the closing fence of the same length
FENCE = re.compile(r"^([ \t]*)(`{3,})(\w*)[^\n`]*\n(.*?)^\1\2[ \t]*$", re.DOTALL | re.MULTILINE)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(\S[^>]*?)\s*-->\s*$")
MAX_NOT_RUN_SHARE = 0.2


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, not-run reason or None) for every ```python block of ``page``."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(3) != "python":
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((line, textwrap.dedent(m.group(4)), marker.group(1) if marker else None))
    return blocks


def test_the_block_parser(tmp_path):
    text = ("a\n<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n```bash\nls\n```\n"
            "* item\n\n  ```python\n  z = 3\n  ```\n"
            "```` ```python ```` is inline code\n````markdown\n```python\nnot = code\n```\n````\n")
    page = tmp_path / "page.md"
    page.write_text(text)
    assert python_blocks(page) == [(3, "x = 1\n", "needs a GPU"), (7, "y = 2\n", None), (15, "z = 3\n", None)]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(r is None for *_, r in python_blocks(p))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, reason in python_blocks(page):
        if reason is None:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line + 1}", "exec"), namespace)  # noqa: S102 (the docs)
    if page.name == "README.md":  # the quickstart trained the adapter and head only, and saved them
        grads = {n for n, p in namespace["model"].named_parameters() if p.grad is not None}
        assert grads and all(n.startswith(("adapters.sst2.", "heads.sst2.")) for n in grads)
        assert (tmp_path / "out/sst2/adapter_model.safetensors").is_file()


def test_few_blocks_are_not_run():
    blocks = [(p, line, r) for p in PAGES for line, _, r in python_blocks(p)]
    skipped = [f"{p.relative_to(ROOT)}:{line}: {r}" for p, line, r in blocks if r is not None]
    assert len(blocks) >= 20, "the docs lost their examples"
    assert len(skipped) <= MAX_NOT_RUN_SHARE * len(blocks), "\n".join(skipped)


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f": {p.name}" not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_no_internal_work_item_numbers():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PAGES for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\b[Ii]ssues? #?\d+", line)]
    assert not hits, f"internal work-item numbers in user docs: {hits}"
