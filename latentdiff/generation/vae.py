"""The VAE's two directions with the safety nets a large or half-precision decode needs.

- **Tiling.** Above ``VaeOptions.tile_above`` pixels per image, images are encoded / decoded in
  overlapping tiles (diffusers' ``AutoencoderKL`` tiling, with its linear blend of the overlaps),
  so activation memory stays that of one tile whatever the size: a 2048x2048 decode holds
  512x512-tile activations (~1 GB in fp16 for the SD VAE) instead of ~16x that. A tiled result is
  close to, not equal to, the untiled one (GroupNorm statistics and the mid-block attention are
  per tile), so sizes up to 1024x1024 are decoded whole, exactly as diffusers' pipeline does.
  A batch holding more than ``tile_above`` pixels in all is decoded one image at a time.
- **fp32 fallback.** The SD VAE decoder can overflow in float16 (activations above 65504 give
  inf, then NaN): images whose decode is not finite are decoded again in float32, with a
  warning, so a half-precision run never returns a black image.

These are inference helpers (no gradients); training encodes through the VAE itself.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError
from ..models.architectures import downscale_factor

HALF = (torch.float16, torch.bfloat16)


@dataclass
class VaeOptions:
    """How the pipeline runs its VAE (``pipe.vae_options``).

    ``tiling``: ``"auto"`` (tile above ``tile_above`` pixels per image), ``True`` (always, when the
    image is larger than one tile) or ``False`` (never). ``tile_size`` is the tile side in pixels
    (a multiple of the VAE's scale factor, 8) and ``tile_overlap`` the overlapped fraction of it.
    """

    tiling: object = "auto"
    tile_above: int = 1024 * 1024  # pixels per image: 1024x1024 and smaller are decoded whole
    tile_size: int = 512  # the SD VAE's training resolution; 64x64 latents per tile
    tile_overlap: float = 0.25  # diffusers' default: 128-pixel blends between 512-pixel tiles
    fp32_fallback: bool = True

    def check(self, scale_factor: int) -> None:
        if self.tiling not in ("auto", True, False):
            raise InvalidInputError(f"vae tiling must be 'auto', True or False, got {self.tiling!r}")
        if not isinstance(self.tile_size, int) or self.tile_size < 2 * scale_factor or self.tile_size % scale_factor:
            raise InvalidInputError(
                f"vae tile_size must be a multiple of {scale_factor} of at least {2 * scale_factor} pixels, "
                f"got {self.tile_size!r}; 512 suits Stable Diffusion"
            )
        if not 0.0 < self.tile_overlap < 0.5:
            raise InvalidInputError(f"vae tile_overlap must be between 0 and 0.5, got {self.tile_overlap!r}; 0.25 is usual")


def wants_tiling(options: VaeOptions, height: int, width: int) -> bool:
    """Whether an image of ``height`` x ``width`` pixels is encoded / decoded in tiles."""
    larger_than_a_tile = max(height, width) > options.tile_size
    if options.tiling == "auto":
        return height * width > options.tile_above and larger_than_a_tile
    return bool(options.tiling) and larger_than_a_tile


@contextlib.contextmanager
def tiled(vae, options: VaeOptions, on: bool) -> Iterator[None]:
    """Switch diffusers' tiling on ``vae`` with our tile size for the duration, then restore it."""
    if not on:
        yield
        return
    f = downscale_factor(vae)
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    saved = {name: getattr(vae, name) for name in names}
    vae.use_tiling = True
    vae.tile_sample_min_size = options.tile_size
    vae.tile_latent_min_size = options.tile_size // f
    vae.tile_overlap_factor = options.tile_overlap
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, options: VaeOptions | None = None) -> torch.Tensor:
    """Scaled latents z_0 (B, C, h, w) -> pixels (B, 3, H, W) in about [-1, 1].

    z is divided by the VAE's ``scaling_factor`` (and shifted by ``shift_factor`` where the VAE has
    one) before decoding, as diffusers' pipelines do.
    """
    config = vae.config
    z = latents / config.scaling_factor
    if getattr(config, "shift_factor", None):
        z = z + config.shift_factor
    return decode_unscaled(vae, z, options)


@torch.no_grad()
def decode_unscaled(vae, z: torch.Tensor, options: VaeOptions | None = None) -> torch.Tensor:
    """Latents as the VAE makes them (not multiplied by ``scaling_factor``) -> pixels (B, 3, H, W)."""
    options = options or VaeOptions()
    f = downscale_factor(vae)
    options.check(f)
    exact = z.to(vae.device)  # kept for a float32 retry: the latents before rounding to half precision
    z = exact.to(vae.dtype)
    height, width = z.shape[-2] * f, z.shape[-1] * f
    tile = wants_tiling(options, height, width)
    one_by_one = len(z) > 1 and len(z) * height * width > options.tile_above
    parts = z.split(1) if one_by_one else [z]
    with tiled(vae, options, tile):
        pixels = torch.cat([vae.decode(part, return_dict=False)[0] for part in parts])  # (B, 3, H, W)
        if options.fp32_fallback and vae.dtype in HALF:
            pixels = _redo_nonfinite_in_fp32(vae, exact, pixels)
    return pixels


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, options: VaeOptions | None = None):
    """Pixels (B, 3, H, W) in [-1, 1] -> the posterior (diffusers' ``DiagonalGaussianDistribution``,
    unscaled), tiled above the size threshold; a non-finite half-precision result is redone in fp32."""
    options = options or VaeOptions()
    options.check(downscale_factor(vae))
    x = pixels.to(vae.device, vae.dtype)
    with tiled(vae, options, wants_tiling(options, x.shape[-2], x.shape[-1])):
        posterior = vae.encode(x).latent_dist
        if options.fp32_fallback and vae.dtype in HALF and not bool(torch.isfinite(posterior.parameters).all()):
            warnings.warn(_FALLBACK_WARNING.format(what="encoder", dtype=_name(vae.dtype)), stacklevel=3)
            with _upcast(vae):
                posterior = vae.encode(x.float()).latent_dist
    return posterior


_FALLBACK_WARNING = (
    "the VAE {what} overflowed in {dtype} (NaN/inf values); that part was redone in float32. "
    "For a faster run, load a VAE fixed for half precision or run the VAE in float32"
)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _redo_nonfinite_in_fp32(vae, z: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Decode again in float32 the images of ``pixels`` that hold NaN or inf; returns float32 pixels
    if any were redone (one device->host read of a (B,) flag, after the decode)."""
    bad = ~torch.isfinite(pixels).flatten(1).all(dim=1)  # (B,)
    if not bool(bad.any()):
        return pixels
    warnings.warn(_FALLBACK_WARNING.format(what="decoder", dtype=_name(vae.dtype)), stacklevel=4)
    index = bad.nonzero().flatten()
    with _upcast(vae):
        redone = torch.cat([vae.decode(z[i : i + 1].float(), return_dict=False)[0] for i in index.tolist()])
    pixels = pixels.float()
    pixels[index] = redone
    return pixels


@contextlib.contextmanager
def _upcast(vae) -> Iterator[None]:
    """The VAE's weights in float32 for the duration (a lossless round trip from fp16 / bf16)."""
    dtype = vae.dtype
    torch.nn.Module.to(vae, dtype=torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(vae, dtype=dtype)
