"""Compute kernels (Triton for GPUs, native code for CPUs), one function each beside its PyTorch reference.

The bottom of the model stack: `quant`'s modules, `model` and `engine` call them; they know
tensors and the NF4 format, not the model."""
