"""Kimi-VL: MoonViT tower -> projector -> image features written into the `<|media_pad|>` rows of the
DeepSeek-V3 language model's input embeddings. Attribute names are the official key prefixes.

Legend: B batch, T tokens, N patches, F image features (= `<|media_pad|>` tokens), D text hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from kimivl_cli.errors import InputError
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.model.projector import Projector
from kimivl_cli.model.vision import MoonViT


class KimiVL(nn.Module):
    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = MoonViT(config.vision)
        self.multi_modal_projector = Projector(config.vision, config.text)
        self.language_model = LanguageModel(config.text)

    def encode_images(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, 14, 14], grid_hws [I, 2] -> features [F, D], one per placeholder, in order."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        merged = self.vision_tower(pixel_values.to(dtype), grid_hws)
        return self.multi_modal_projector(torch.cat(merged))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> embeddings [B, T, D] with the image features written, in order, over the
        `<|media_pad|>` rows. Counting the placeholders syncs with the device once per prompt.
        For chunked prefill, embed the whole prompt here and feed the language model slices."""
        embeds = self.language_model.embed(input_ids)
        is_pad = input_ids == self.config.media_placeholder_token_id
        n_pad = int(is_pad.sum())
        n_features = 0 if image_features is None else image_features.shape[0]
        if n_pad != n_features:
            raise InputError(
                f"the prompt has {n_pad} image placeholder tokens but the images give {n_features} features",
                "each image needs (h*w)/4 <|media_pad|> tokens for its patch grid; build prompts with the processor",
            )
        if n_features:
            embeds = embeds.masked_scatter(is_pad[..., None], image_features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_hws: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | int = 0,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (+ the images of their placeholders) -> fp32 logits [B, T, V].
        The golden stages are recorded by hooks (`kimivl_cli.testing.stages.record_stages`)."""
        features = None
        if pixel_values is not None:
            if grid_hws is None:
                raise InputError("pixel_values given without image_grid_hws")
            features = self.encode_images(pixel_values, grid_hws)
        embeds = self.embed(input_ids, features)
        hidden = self.language_model(embeds, positions, cache)
        return self.language_model.logits(hidden)
