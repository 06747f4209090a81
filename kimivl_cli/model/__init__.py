"""The model: MoonViT -> projector -> DeepSeek-V3 language model, the MLA cache, the checkpoint loader.

Above `kernels` and `quant` (the loader swaps quantized modules in); `engine` runs it. `config`
is a leaf every layer may read.

Exports resolve lazily, so `import kimivl_cli.model.config` stays as light as the config itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KimiVL": "kimivl",
    "KimiVLConfig": "config",
    "TextConfig": "config",
    "VisionConfig": "config",
    "LanguageModel": "language",
    "LatentCache": "cache",
    "load_model": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
