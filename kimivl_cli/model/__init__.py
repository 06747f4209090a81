"""model layer: MoonViT -> projector -> DeepSeek-V3 language model, and the checkpoint loader."""

from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig, TextConfig, VisionConfig
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.model.weights import load_model

__all__ = ["KimiVL", "KimiVLConfig", "LatentCache", "TextConfig", "VisionConfig", "load_model"]
