"""Aspect-ratio buckets, the per-sample choices (crop, flip, caption) and deterministic batches.

Every random choice (which caption, dropped caption, crop offset, flip, batch order) is a pure
function of ``(seed, epoch, index)``, so a run resumed mid-epoch, or split across more processes
with the same global batch, sees exactly the same samples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidInputError
from .sources import DataConfig, Record


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) sizes, multiples of ``step``, each with at most ``resolution**2`` pixels."""
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            sizes.add((width, height))
        width += step
    sizes.add((resolution, resolution))
    return sorted(sizes)


def assign_buckets(records: Sequence[Record], config: DataConfig) -> tuple[list[tuple[int, int]], list[int]]:
    """The bucket list and each record's bucket: the one nearest in log aspect ratio."""
    if not config.buckets:
        return [(config.resolution, config.resolution)], [0] * len(records)
    buckets = make_buckets(config.resolution, config.bucket_step, config.max_aspect)
    logs = np.array([math.log(w / h) for w, h in buckets])
    chosen = [int(np.abs(logs - math.log(r.size[0] / r.size[1])).argmin()) for r in records]
    return buckets, chosen


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    # str seeds hash with SHA-512 in Python's random, so this is the same on every process and run
    return random.Random(f"{seed}/{epoch}/{index}")


@dataclass(frozen=True)
class View:
    """How one sample is cut from its image: the crop box in the resized image, and the flip."""

    resize: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


def choose_view(size: tuple[int, int], bucket: tuple[int, int], config: DataConfig, rng: random.Random) -> View:
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)  # cover the bucket, then crop the overflow
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if config.center_crop:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    flip = config.random_flip and rng.random() < 0.5
    return View((rw, rh), (left, top, left + bw, top + bh), flip)


def micro_conditioning(size: tuple[int, int], view: View, count: int) -> list[float]:
    """SDXL's micro-conditioning of a training sample (Podell et al. 2023, Sec. 2.2): the image's true
    original size (height, width), the top-left corner of the crop in the resized image as the model
    sees it (mirrored with the image when flipped), and the bucket as target size; ``count`` 5 (the
    refiner) puts an aesthetic score of 6 (its inference default) in place of the target size."""
    width, height = size
    left, top, right, bottom = view.box
    if view.flip:
        left = view.resize[0] - right
    values = [float(height), float(width), float(top), float(left)]
    return values + ([float(bottom - top), float(right - left)] if count == 6 else [6.0])


def render_view(image: Image.Image, view: View, unit: bool = False) -> torch.Tensor:
    """The crop as a (3, H, W) tensor in [-1, 1] (the VAE's input), or with ``unit`` in [0, 1] (a ControlNet's
    conditioning image, as diffusers' ControlNet pipelines give it). An image of another size than the one
    ``view`` was chosen for (a conditioning image at another resolution) is resized to the same ``view.resize``,
    so the crop box and flip cut the same part of the picture."""
    image = image.resize(view.resize, Image.Resampling.BICUBIC, reducing_gap=3.0).crop(view.box)
    if view.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    array = array / 255.0 if unit else array / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def choose_caption(captions: Sequence[str], dropout: float, rng: random.Random) -> str:
    caption = captions[rng.randrange(len(captions))] if len(captions) > 1 else captions[0]
    return "" if rng.random() < dropout else caption


# ---------------------------------------------------------------------------------------------------------
# Batches


class BucketBatches:
    """Deterministic batches, every one from a single bucket.

    Per epoch, each bucket's indices are shuffled and cut into *global* batches of
    ``batch_size * num_processes`` (a bucket's remainder waits for the next epoch's shuffle), the
    global batches are shuffled, and process ``rank`` takes its slice of each. One process with
    batch ``B*N`` therefore sees the same samples as ``N`` processes with batch ``B``.
    Items are ``(epoch, index)`` pairs, so the dataset can make that sample's random choices.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int, num_processes: int = 1, rank: int = 0):
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.rank = rank
        self.epoch = 0
        self.start = 0  # batches of this epoch already consumed (set on resume)
        if self.batches_per_epoch() == 0:
            sizes = np.bincount(self.bucket_of) if self.bucket_of else []
            raise InvalidInputError(
                f"no bucket holds a whole global batch of {batch_size * num_processes} images "
                f"(largest bucket: {max(sizes, default=0)} images); lower train.batch_size or add images"
            )

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{epoch}/order")
        per_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            per_bucket.setdefault(bucket, []).append(index)
        size = self.batch_size * self.num_processes
        batches = []
        for bucket in sorted(per_bucket):
            indices = per_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i : i + size] for i in range(0, len(indices) - size + 1, size)]
        rng.shuffle(batches)
        return batches

    def batches_per_epoch(self) -> int:
        counts = np.bincount(self.bucket_of) if self.bucket_of else np.zeros(0, int)
        return int(sum(int(c) // (self.batch_size * self.num_processes) for c in counts))

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        lo = self.rank * self.batch_size
        for batch in self.global_batches(self.epoch)[self.start :]:
            yield [(self.epoch, i) for i in batch[lo : lo + self.batch_size]]
