"""The intermediate stages of a forward pass, recorded by forward hooks, named and laid out as the golden
files are (`shared/golden/README.md`), so the model's forwards carry no tracing argument.

    with record_stages(model) as stages:
        logits = model(input_ids, pixel_values, grid_hws)
    stages["projector_out"], stages["router_topk_idx.layer1"], stages["hidden_states"], ...

`model` is a `KimiVL` or any part of one (a `MoonViT`, a `LanguageModel`): every stage module found
under it is hooked, and the hooks are removed on exit. A later forward inside the block overwrites the
stages it reaches. Tokens are flattened over the batch, as the router sees them: one prompt is [T, ...].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kimivl_cli.model.language import DecoderStack, Router
from kimivl_cli.model.projector import Projector
from kimivl_cli.model.vision import Encoder, MoonViT, PatchEmbed, PositionTable

Stages = dict[str, torch.Tensor]

# Modules whose whole output is a stage.
_OUTPUTS: dict[type[nn.Module], str] = {
    PositionTable: "vision_pos_emb",
    PatchEmbed: "vision_patch_embed",
    Encoder: "vision_encoder_out",
    Projector: "projector_out",
}


def _store(stages: Stages, key: str) -> Any:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        stages[key] = output

    return hook


def _store_tower(stages: Stages) -> Any:
    """MoonViT's per-image merged features [h/kh * w/kw, M, D] -> `vision_tower_out.<image>`."""

    def hook(module: nn.Module, args: tuple, output: list[torch.Tensor]) -> None:
        for key in [k for k in stages if k.startswith("vision_tower_out.")]:
            del stages[key]  # a forward with fewer images leaves none of an earlier one's behind
        stages.update({f"vision_tower_out.{i}": out for i, out in enumerate(output)})

    return hook


def _store_routing(stages: Stages, layer: int) -> Any:
    """The router's (ids [T, K], weights [T, K]) with the ids ascending per token, weights alongside."""

    def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        idx, weights = output
        sorted_idx, order = idx.sort(dim=-1)
        stages[f"router_topk_idx.layer{layer}"] = sorted_idx
        stages[f"router_topk_weight.layer{layer}"] = weights.gather(1, order)

    return hook


def _hook_stack(stack: DecoderStack, stages: Stages) -> list[RemovableHandle]:
    """`hidden_states` [L+1, T, D]: each layer's input (the embeddings, then every layer's output but
    the last's), then the final norm's output; plus each MoE layer's routing."""
    inputs: dict[int, torch.Tensor] = {}

    def layer_input(i: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[i] = args[0]

        return hook

    def final_norm(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        states = [inputs[i] for i in range(len(stack.layers))] + [output]
        stages["hidden_states"] = torch.stack(states).flatten(1, 2)

    handles = [stack.norm.register_forward_hook(final_norm)]
    for i, layer in enumerate(stack.layers):
        handles.append(layer.register_forward_pre_hook(layer_input(i)))
        handles += [
            m.register_forward_hook(_store_routing(stages, i)) for m in layer.modules() if isinstance(m, Router)
        ]
    return handles


@contextmanager
def record_stages(model: nn.Module) -> Iterator[Stages]:
    """Hook every golden stage under `model` for the duration of the block; yields the stages dict."""
    stages: Stages = {}
    handles: list[RemovableHandle] = []
    try:
        for module in model.modules():
            key = next((key for kind, key in _OUTPUTS.items() if isinstance(module, kind)), None)
            if key is not None:
                handles.append(module.register_forward_hook(_store(stages, key)))
            elif isinstance(module, MoonViT):
                handles.append(module.register_forward_hook(_store_tower(stages)))
            elif isinstance(module, DecoderStack):
                handles += _hook_stack(module, stages)
        yield stages
    finally:
        for handle in handles:
            handle.remove()
