"""kimivl: a command-line multimodal assistant for the Kimi-VL models, 4-bit on one GPU."""

__version__ = "0.1.0"
