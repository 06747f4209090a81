"""What the loader (`model/weights.py`) asks of the modules it builds, as protocols they declare.

A module subclasses the protocols it implements; the loader tests `isinstance(module, Protocol)`
instead of probing attribute names. They live apart from `weights.py` because the modules that
declare them (`model/language.py`, `quant/modules.py`) are imported by it.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class OwnsCheckpointKeys(Protocol):
    """Takes official checkpoint keys itself instead of one parameter per key: the stacked experts
    (per-expert keys land in rows of a stack) and the quantized modules (quantise on load).

    The loader hands such a module each of its tensors (`load_tensor`) and does not look at its
    parameters. `quantized`: a pre-quantized checkpoint stores the module's own buffers instead, which
    load like any module's; otherwise `checkpoint_tensor` reads a key back (saving a checkpoint).
    """

    quantized: ClassVar[bool] = False

    def checkpoint_tensors(self) -> dict[str, torch.Size]:
        """Official key suffixes ("7.up_proj.weight") and their shapes."""
        ...

    def load_tensor(self, name: str, tensor: Tensor) -> None: ...

    def checkpoint_tensor(self, name: str) -> Tensor:
        """The tensor stored under official suffix `name` (called only when `quantized` is false)."""
        ...


@runtime_checkable
class KeepsDtype(Protocol):
    """Floating tensors stay in `param_dtype` whatever the model's dtype (the fp32 router, quantization scales)."""

    param_dtype: ClassVar[torch.dtype]


@runtime_checkable
class DevicePaths(Protocol):
    """Runs differently on CPU and CUDA: the path is chosen once, when the loader knows the device."""

    def placed(self, device: torch.device) -> nn.Module:
        """The module to run on `device`: self set up for it, or a twin holding the same tensors."""
        ...


M = TypeVar("M", bound=nn.Module)


def twin(module: nn.Module, cls: type[M]) -> M:
    """A `cls` (a subclass of `module`'s class for another device) sharing `module`'s parameters,
    buffers and settings: nothing is copied or allocated, so it works on the meta device."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def place(model: M, device: torch.device | str) -> M:
    """Swap every `DevicePaths` module of `model` (itself included) for its version on `device`."""
    device = torch.device(device)
    for name, module in reversed(list(model.named_modules())):  # children first: a parent's twin keeps them
        if isinstance(module, DevicePaths):
            placed = module.placed(device)
            if placed is not module and name:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, placed)
            elif placed is not module:
                model = placed  # type: ignore[assignment]
    return model
