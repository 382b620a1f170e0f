"""The training samples: one ``(epoch, index)`` key -> pixels (or cached latents) and a caption
(or its cached embedding)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .buckets import View, choose_caption, choose_view, render_view, sample_rng
from .sources import DataConfig, Source


class TrainDataset(torch.utils.data.Dataset):
    """Serves one sample for an ``(epoch, index)`` key: pixels (or cached latents) and a caption (or its embedding)."""

    def __init__(self, source: Source, buckets, bucket_of, config: DataConfig, seed: int, tokenizer=None, cache=None):
        self.source = source
        self.buckets = buckets
        self.bucket_of = bucket_of
        self.config = config
        self.seed = seed
        self.tokenizer = tokenizer
        self.cache = cache  # a LatentCache with every entry present, or None

    def __len__(self) -> int:
        return len(self.source.records)

    def choices(self, epoch: int, index: int) -> tuple[View, str]:
        record = self.source.records[index]
        rng = sample_rng(self.seed, epoch, index)
        view = choose_view(record.size, self.buckets[self.bucket_of[index]], self.config, rng)
        caption = choose_caption(record.captions, self.config.caption_dropout, rng)
        return view, caption

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        record = self.source.records[index]
        view, caption = self.choices(epoch, index)
        item: dict[str, Any] = {"index": index}
        if self.cache is not None and self.cache.has_latents:
            item["latent_dist"] = self.cache.load_latent(record, view)  # (2C, h, w): mean, std
        else:
            item["pixels"] = render_view(self.source.image(record), view)  # (3, H, W)
        if self.cache is not None and self.cache.has_text:
            item["text_embeds"] = self.cache.load_text(caption)  # (77, D)
        elif self.tokenizer is not None:
            item["input_ids"] = tokenize(self.tokenizer, [caption])[0]  # (77,)
        return item


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(B, 77) token ids; training captions are cut at the encoder's context length."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
