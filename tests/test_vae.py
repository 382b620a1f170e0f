"""latentdiff.generation.vae: tiling above a size threshold, and the float32 retry of a non-finite half decode."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.generation.vae import VaeOptions, decode, encode, wants_tiling
from latentdiff.models.architectures import PRESETS


def fresh_vae() -> AutoencoderKL:
    return LatentDiffusion.from_preset("tiny", seed=0).vae


def latents(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_threshold():
    auto = VaeOptions()
    assert not wants_tiling(auto, 1024, 1024)  # the usual sizes are decoded whole, as diffusers does
    assert wants_tiling(auto, 1024, 1032) and wants_tiling(auto, 2048, 2048)
    assert not wants_tiling(VaeOptions(tiling=False), 4096, 4096)
    assert wants_tiling(VaeOptions(tiling=True), 520, 64) and not wants_tiling(VaeOptions(tiling=True), 512, 512)
    with pytest.raises(InvalidInputError, match="tile_size"):
        decode(fresh_vae(), latents(1, 4, 8, 8), VaeOptions(tile_size=12))
    with pytest.raises(InvalidInputError, match="tiling"):
        decode(fresh_vae(), latents(1, 4, 8, 8), VaeOptions(tiling="yes"))


def test_tiled_paths_are_diffusers_tiling():
    """Above the threshold decode / encode are exactly diffusers' own tiled ones with our tile
    settings (the independent reference), and odd sizes come back whole."""
    ours, theirs = fresh_vae(), fresh_vae()
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size, theirs.tile_overlap_factor = 32, 4, 0.25
    options = VaeOptions(tile_above=32 * 32, tile_size=32)
    z = latents(2, 4, 8, 12)
    sf = ours.config.scaling_factor
    got = decode(ours, z * sf, options)  # decoded one image at a time (the batch is above the threshold)
    assert got.shape == (2, 3, 64, 96)
    expected = torch.cat([theirs.decode(one * sf / sf).sample for one in z.split(1)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not ours.use_tiling and ours.tile_sample_min_size == 64  # settings restored

    x = latents(1, 3, 64, 96, seed=1).clamp(-1, 1)
    torch.testing.assert_close(encode(ours, x, options).mean, theirs.encode(x).latent_dist.mean, rtol=0, atol=0)
    # below the threshold: the plain, untiled decode
    plain = fresh_vae()
    torch.testing.assert_close(decode(ours, z * sf), plain.decode(z * sf / sf).sample, rtol=0, atol=0)


def test_tiled_decode_agrees_with_untiled():
    """Tiled and untiled decodes differ where a tile's zero padding reaches into the blended
    overlap, and through per-tile GroupNorm statistics and mid-block attention. With the last two
    switched off (norms -> identity, no attention) only the padding is left: its effect must be
    small next to the image and shrink as tiles grow (measured on this 128-pixel image: mean |diff|
    22% of the image's std at 32-pixel tiles, 7% at 64; at 256 pixels 8% and 2% at 64 / 128).
    A misplaced or unblended tile gives errors of the order of the std."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**PRESETS["tiny"].vae, "mid_block_add_attention": False}).eval()
    for module in list(vae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    z = latents(1, 4, 16, 16, seed=2) * vae.config.scaling_factor
    whole = decode(vae, z, VaeOptions(tiling=False))
    errors = []
    for tile in (32, 64):
        tiled = decode(vae, z, VaeOptions(tiling=True, tile_size=tile))
        assert tiled.shape == whole.shape
        errors.append(float((tiled - whole).abs().mean()))
    std = float(whole.std())
    assert errors[1] < errors[0] / 2, errors
    assert errors[1] < 0.1 * std, (errors, std)


def test_automatic_tiling_in_the_pipeline_matches_diffusers(tiny, reference):
    """End to end: a pipeline whose threshold is below its image size decodes in tiles, exactly as
    diffusers' pipeline does with tiling enabled at the same tile size."""
    pipe = LatentDiffusion.from_preset("tiny", seed=0)
    pipe.vae_options = VaeOptions(tile_above=32 * 32, tile_size=32)
    vae = reference.vae
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    try:
        gens = [torch.Generator("cpu").manual_seed(3)]
        expected = reference("a boat", generator=gens, num_inference_steps=2, output_type="np").images
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    got = pipe("a boat", seed=3, num_inference_steps=2, output_type="np", progress=False).images
    untiled = tiny("a boat", seed=3, num_inference_steps=2, output_type="np", progress=False).images
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(got - untiled).max() > 1e-3  # it really tiled


def _nan_in_half(vae: AutoencoderKL, only_first: bool) -> None:
    """Make the decoder overflow in float16 the way the SD VAE does: NaN out (first image only)."""
    plain = vae.decoder.forward

    def forward(z, *args, **kwargs):
        out = plain(z, *args, **kwargs)
        if out.dtype == torch.float16:
            out = out.clone()
            out[: 1 if only_first else len(out)] = float("nan")
        return out

    vae.decoder.forward = forward


def test_half_decode_with_nan_is_redone_in_float32():
    vae = fresh_vae().half()
    fp32 = copy.deepcopy(vae).float()  # the same (fp16-rounded) weights in float32: the reference
    half_copy = copy.deepcopy(vae)
    _nan_in_half(vae, only_first=True)
    z = latents(2, 4, 8, 8, seed=4)
    with pytest.warns(UserWarning, match="overflowed in float16.*float32"):
        pixels = decode(vae, z)
    assert torch.isfinite(pixels).all()
    assert vae.dtype == torch.float16  # back to half afterwards
    sf = vae.config.scaling_factor
    expected0 = fp32.decode((z[:1] / sf).float()).sample
    torch.testing.assert_close(pixels[:1], expected0, rtol=0, atol=0)  # image 0: redone in float32
    expected1 = half_copy.decode((z / sf).half()).sample[1:]
    torch.testing.assert_close(pixels[1:], expected1.float(), rtol=0, atol=0)  # image 1: kept as decoded


def test_pipeline_never_returns_a_black_image():
    pipe = LatentDiffusion.from_preset("tiny", seed=0)
    pipe.vae.half()
    _nan_in_half(pipe.vae, only_first=False)
    with pytest.warns(UserWarning, match="float32"):
        image = pipe("a cat", seed=1, num_inference_steps=2, output_type="np", progress=False).images
    assert np.isfinite(image).all() and image.std() > 0.01


def test_finite_half_decode_is_not_redone():
    vae = fresh_vae().half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = decode(vae, latents(1, 4, 8, 8))
    assert pixels.dtype == torch.float16 and torch.isfinite(pixels).all()
