"""Compute kernels (Triton for GPUs, native code for CPUs), one function each beside its PyTorch reference."""
