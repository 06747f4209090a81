"""kimivl: a command-line multimodal assistant for the Kimi-VL models, 4-bit on one GPU or on a CPU.

Data flows one way, each package importing only those before it: media -> processor -> model
(over kernels and quant) -> engine -> backends -> tasks -> render -> cli, with serve beside cli and
the shot detector (`video`) beside media. README.md, "How it is built", has a line per package."""

__version__ = "0.1.0"
