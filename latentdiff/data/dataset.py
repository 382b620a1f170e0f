"""The training samples: one ``(epoch, index)`` key -> pixels (or cached latents) and a caption
(or its cached embedding)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .buckets import View, choose_caption, choose_view, micro_conditioning, render_view, sample_rng
from .sources import DataConfig, Source


class TrainDataset(torch.utils.data.Dataset):
    """Serves one sample for an ``(epoch, index)`` key: pixels (or cached latents) and a caption (or its embedding)."""

    def __init__(self, source: Source, buckets, bucket_of, config: DataConfig, seed: int, tokenizer=None, cache=None,
                 tokenizer_2=None, time_ids: Optional[int] = None, conditioning: bool = False):  # fmt: skip
        self.source = source
        self.buckets = buckets
        self.bucket_of = bucket_of
        self.config = config
        self.seed = seed
        self.tokenizers = {"input_ids": tokenizer, "input_ids_2": tokenizer_2}  # SDXL: two (the refiner: the second)
        self.cache = cache  # a LatentCache with every entry present, or None
        self.time_ids = time_ids  # SDXL: how many micro-conditioning values its U-Net reads (6, or 5); else None
        self.conditioning = conditioning  # ControlNet training: serve each record's conditioning image too

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
            item.update(self.cache.load_latent(record, view))  # latent_dist (2C, h, w): mean, std; SDXL: time_ids
        else:
            item["pixels"] = render_view(self.source.image(record), view)  # (3, H, W)
            if self.time_ids:
                item["time_ids"] = torch.tensor(micro_conditioning(record.size, view, self.time_ids))  # (6,) or (5,)
        if self.conditioning:  # the same crop and flip as the image; rendered from the source, never cached stale
            conditioning = self.source.conditioning_image(record)
            item["conditioning_pixels"] = render_view(conditioning, view, unit=True)  # (3, H, W) in [0, 1]
        if self.cache is not None and self.cache.has_text:
            item.update(self.cache.load_text(caption))  # text_embeds (77, D); SDXL: pooled (D',)
        else:
            for key, tokenizer in self.tokenizers.items():
                if tokenizer is not None:
                    item[key] = tokenize(tokenizer, [caption])[0]  # (77,)
        return item


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(B, 77) token ids; training captions are cut at the encoder's context length."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_captions(encoders: list, ids: list[torch.Tensor], sdxl: bool):
    """Training's text conditioning: (cond (B, 77, D), pooled (B, D') or None) from token ids (B, 77)
    through each text encoder. SD 1.x / 2.x: the last layer's states. SDXL: each encoder's penultimate
    states, concatenated, and the projected pooled embedding of the last encoder, as its pipelines
    condition (and diffusers' SDXL trainer)."""
    if not sdxl:
        return encoders[0](ids[0].to(encoders[0].device))[0], None
    states, pooled = [], None
    for encoder, own in zip(encoders, ids):
        output = encoder(own.to(encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = getattr(output, "text_embeds", None)
    return torch.cat(states, dim=-1), pooled
