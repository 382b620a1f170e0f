"""On-disk cache of VAE latents and text embeddings for training.

A latent entry is keyed by SHA-256 of (image bytes, resize, crop box, flip, VAE weights); a text
entry by (caption, text-encoder weights). For SDXL a latent entry also holds the sample's
micro-conditioning (original size, crop corner, target size) and a text entry the pooled embedding. An edited image or a changed model therefore misses the
cache and is encoded again, and an unchanged one never is. Entries are single safetensors files,
written atomically, so a crash mid-fill leaves no half entry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save

from ..fileio import atomic_write
from .buckets import View, choose_view, micro_conditioning, render_view
from .dataset import encode_captions, tokenize
from .sources import DataConfig, Record, Source

ENCODE_BATCH = 16


@dataclass
class CacheStats:
    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0

    def line(self) -> str:
        return (
            f"cache: {self.latents_encoded} latents encoded, {self.latents_reused} reused; "
            f"{self.texts_encoded} captions encoded, {self.texts_reused} reused"
        )


class LatentCache:
    def __init__(self, root: Path, vae_hash: Optional[str], text_hash: Optional[str], time_ids: Optional[int] = None):
        self.root = Path(root)
        self.vae_hash = vae_hash  # None: latents are not cached
        self.text_hash = text_hash  # None: text embeddings are not cached (text encoder trains)
        self.time_ids = time_ids  # SDXL: micro-conditioning values per sample (6 or 5), stored with the latents

    @property
    def has_latents(self) -> bool:
        return self.vae_hash is not None

    @property
    def has_text(self) -> bool:
        return self.text_hash is not None

    def _file(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def latent_file(self, record: Record, view: View) -> Path:
        extra = (self.time_ids,) if self.time_ids else ()  # (SD 1.x / 2.x keys stay as they were)
        key = _sha(record.digest, view.resize, view.box, view.flip, self.vae_hash, *extra)
        return self._file("latents", key)

    def text_file(self, caption: str) -> Path:
        return self._file("text", _sha(caption, self.text_hash))

    def load_latent(self, record: Record, view: View) -> dict[str, torch.Tensor]:
        """``latent_dist`` (2C, h, w): the posterior mean stacked on its standard deviation; SDXL:
        ``time_ids`` (6,) or (5,)."""
        return load_file(self.latent_file(record, view))

    def load_text(self, caption: str) -> dict[str, torch.Tensor]:
        """``text_embeds`` (77, D); SDXL: ``pooled`` (D',)."""
        entry = load_file(self.text_file(caption))
        return {"text_embeds": entry["embeds"], **({"pooled": entry["pooled"]} if "pooled" in entry else {})}

    def fill(
        self,
        source: Source,
        buckets: Sequence[tuple[int, int]],
        bucket_of: Sequence[int],
        config: DataConfig,
        *,
        vae=None,
        text_encoders: Sequence = (),
        tokenizers: Sequence = (),
        sdxl: bool = False,
        rank: int = 0,
        world: int = 1,
        progress: bool = False,
    ) -> CacheStats:
        """Encode every missing entry; process ``rank`` of ``world`` owns every ``world``-th entry of
        the full list and encodes those of its own that are missing.

        The shares are cut from the full list, not from the list of missing entries: another rank
        may already be writing when this one looks, and shares cut from two different views of the
        cache would leave entries that no rank encodes. Caching needs every view of an image known
        in advance, so it takes centre crops (the only random choice left is the flip, and both
        flips are cached).
        """
        stats = CacheStats()
        if self.has_latents:
            views = [(record, view) for index, record in enumerate(source.records)
                     for view in possible_views(record, buckets[bucket_of[index]], config)]  # fmt: skip
            present = [self.latent_file(record, view).is_file() for record, view in views]
            stats.latents_reused = sum(present)
            stats.latents_encoded = len(views) - stats.latents_reused
            mine = [job for i, job in enumerate(views) if i % world == rank and not present[i]]
            self._encode_latents(source, mine, vae, progress)
        if self.has_text:
            captions = sorted({c for r in source.records for c in r.captions} | {""})
            present = [self.text_file(c).is_file() for c in captions]
            stats.texts_reused = sum(present)
            stats.texts_encoded = len(captions) - stats.texts_reused
            mine = [c for i, c in enumerate(captions) if i % world == rank and not present[i]]
            self._encode_texts(mine, text_encoders, tokenizers, sdxl, progress)
        return stats

    @torch.no_grad()
    def _encode_latents(self, source: Source, jobs, vae, progress: bool) -> None:
        by_shape: dict[tuple, list] = {}
        for record, view in jobs:  # one VAE call per group of equal-sized crops
            width, height = view.box[2] - view.box[0], view.box[3] - view.box[1]
            by_shape.setdefault((width, height), []).append((record, view))
        bar = _bar(len(jobs), progress, "caching latents")
        for group in by_shape.values():
            for start in range(0, len(group), ENCODE_BATCH):
                chunk = group[start : start + ENCODE_BATCH]
                pixels = torch.stack([render_view(source.image(r), v) for r, v in chunk])  # (B, 3, H, W)
                dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
                stacked = torch.cat([dist.mean, dist.std], dim=1).float().cpu()  # (B, 2C, h, w)
                for (record, view), value in zip(chunk, stacked):
                    entry = {"latent_dist": value.contiguous()}
                    if self.time_ids:
                        entry["time_ids"] = torch.tensor(micro_conditioning(record.size, view, self.time_ids))
                    _write(self.latent_file(record, view), entry)
                bar.update(len(chunk))
        bar.close()

    @torch.no_grad()
    def _encode_texts(self, captions: Sequence[str], text_encoders, tokenizers, sdxl: bool, progress: bool) -> None:
        bar = _bar(len(captions), progress, "caching captions")
        for start in range(0, len(captions), ENCODE_BATCH):
            chunk = captions[start : start + ENCODE_BATCH]
            embeds, pooled = encode_captions(text_encoders, [tokenize(tok, chunk) for tok in tokenizers], sdxl)  # (B, 77, D)
            for i, caption in enumerate(chunk):
                entry = {"embeds": embeds[i].float().cpu().contiguous()}
                if pooled is not None:
                    entry["pooled"] = pooled[i].float().cpu().contiguous()
                _write(self.text_file(caption), entry)
            bar.update(len(chunk))
        bar.close()


def possible_views(record: Record, bucket: tuple[int, int], config: DataConfig) -> list[View]:
    """Every view a centre-cropped sample of ``record`` can take (flipped or not)."""

    class _Fixed:  # choose_view asks for a coin only for the flip
        def __init__(self, flip: bool):
            self.flip = flip

        def random(self) -> float:
            return 0.0 if self.flip else 1.0

    flips = (False, True) if config.random_flip else (False,)
    return [choose_view(record.size, bucket, config, _Fixed(f)) for f in flips]


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(save(tensors))


def _sha(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _bar(total: int, enabled: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="item", disable=not enabled or total == 0, leave=False)
