"""U-Net feature caching across denoising steps (DeepCache: Ma et al. 2023, "DeepCache: Accelerating
Diffusion Models for Free").

Neighbouring denoising steps change the U-Net's deep, low-resolution features little: they can be
computed once every N steps and reused in between, where only the shallow path runs (the first
layers of the first down block and the last layers of the last up block, at full resolution, fed
by the fresh skip connections). The paper's Sec. 3.2-3.3: a full call at steps 0, N, 2N, ... and
"partial inference" through a chosen skip branch at the others.

This is glue around diffusers' ``UNet2DConditionModel``, not a copy of it: for the length of one
denoising run, :class:`FeatureCache` replaces the ``forward`` of every module on the deep side of
the branch (whole blocks, or the layers of the branch's own block) by a function that runs the
module at full calls and remembers its output, and hands back that output at the others. The
U-Net's own ``forward`` is untouched, so every U-Net of the class works alike: SD 1.x / 2.x, and
SDXL's (whose first down block has no attention).

**Branches.** Up-block layers are counted from the output: branch ``b`` is layer ``b % L`` of up
block ``b // L`` counted from the last (``L`` = resnets per up block, 3 for SD 1.x / 2.x / SDXL),
which is DeepCache's ``cache_branch_id``. Branch 0, the shallowest, recomputes only ``conv_in``, the
last resnet (+ attention) of the last up block and ``conv_out``. A deeper branch keeps more of
the high-resolution path fresh: slower, closer to the uncached image.

**Which modules are skipped** at a cached call (the paper's Fig. 3 rule): the mid block; every
down and up block deeper than the branch's block; in the branch's down block, the layers from the
branch's layer on (and its downsampler); in its up block, the layers before the branch's layer.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch


def layers_per_up_block(unet) -> int:
    return len(unet.up_blocks[-1].resnets)


def branch_count(unet) -> int:
    """The number of skip branches of ``unet``: ``cache_branch`` is from 0 to this minus 1."""
    return len(unet.up_blocks) * layers_per_up_block(unet)


def deep_modules(unet, branch: int) -> list[torch.nn.Module]:
    """The modules a cached call does not run, for skip branch ``branch`` (see the module docstring)."""
    per_block = layers_per_up_block(unet)
    block, layer = divmod(branch, per_block)
    deep: list[torch.nn.Module] = [unet.mid_block]
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            deep.append(down)
        elif i == block:
            for j, resnet in enumerate(down.resnets):
                if j >= layer:
                    deep.append(resnet)
                    if getattr(down, "attentions", None) is not None:
                        deep.append(down.attentions[j])
            deep.extend(down.downsamplers or [])  # (the downsampler counts as the block's last layer)
    count = len(unet.up_blocks)
    for k, up in enumerate(unet.up_blocks):
        i = count - 1 - k  # counted from the output
        if i > block:
            deep.append(up)
        elif i == block:
            n = len(up.resnets)
            for j, resnet in enumerate(up.resnets):
                if n - 1 - j > layer:  # layers counted from the block's output
                    deep.append(resnet)
                    if getattr(up, "attentions", None) is not None:
                        deep.append(up.attentions[j])
    return deep


class FeatureCache:
    """``with FeatureCache(unet, interval, branch):`` — inside, U-Net call k (from 0) is a full call
    when k % interval == 0 and a cached call otherwise. Interval 1 makes every call a full one.

    One instance serves one denoising run (one batch shape): what it keeps is dropped on exit. The
    denoising loop calls the U-Net once per entry of its timesteps, so calls are steps (Heun's
    two evaluations per step count as two). A ``torch.compile``d U-Net runs eagerly inside: the
    features kept between calls would live in CUDA-graph memory that the next replay overwrites.
    """

    def __init__(self, unet, interval: int, branch: int = 0):
        if interval < 1 or not 0 <= branch < branch_count(unet):
            raise ValueError(f"interval must be at least 1 and branch from 0 to {branch_count(unet) - 1}")
        self.unet, self.interval, self.branch = unet, interval, branch
        self.calls = 0  # U-Net calls so far in this run
        self.full_calls = 0
        self._kept: dict[int, Any] = {}  # id(module) -> its output at the last full call
        self._replaced: list[tuple[torch.nn.Module, bool, Any]] = []  # (module, had an instance forward, it)

    @property
    def full(self) -> bool:
        """Whether the current U-Net call runs in full."""
        return (self.calls - 1) % self.interval == 0

    def __enter__(self) -> "FeatureCache":
        forward = self.unet.__dict__.get("forward")
        eager = getattr(forward, "eager", None)  # optimize.CompiledForward keeps the eager forward
        if eager is not None:
            warnings.warn("the U-Net is compiled (optimize()); with cache_interval it runs eagerly", stacklevel=4)
        self._replace(self.unet, self._counting(eager or self.unet.forward))
        if self.interval > 1:
            for module in deep_modules(self.unet, self.branch):
                self._replace(module, self._reusing(module, module.forward))
        return self

    def __exit__(self, *exc) -> None:
        for module, had, forward in reversed(self._replaced):
            if had:
                module.forward = forward
            else:
                del module.forward  # back to the class's forward
        self._replaced.clear()
        self._kept.clear()

    def _replace(self, module: torch.nn.Module, forward: Callable) -> None:
        had = "forward" in module.__dict__
        self._replaced.append((module, had, module.__dict__.get("forward")))
        module.forward = forward

    def _counting(self, forward: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls += 1
            self.full_calls += self.full
            return forward(*args, **kwargs)

        return counted

    def _reusing(self, module: torch.nn.Module, forward: Callable) -> Callable:
        key = id(module)

        def reused(*args, **kwargs):
            if self.full or key not in self._kept:
                self._kept[key] = forward(*args, **kwargs)
            return self._kept[key]

        return reused
