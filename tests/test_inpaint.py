"""Inpainting against diffusers' StableDiffusionInpaintPipeline, 9- and 4-channel U-Nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image

from helpers import REFERENCE_SCHEDULERS, picture
from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.models.architectures import PRESETS, build_components

PROMPT, NEGATIVE = "a red door", "blurry"


def mask(width=64, height=48) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[8:32, 16:48] = 255  # white = repaint
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def inpainter(tmp_path_factory):
    """A tiny model with a 9-channel inpainting U-Net, saved so diffusers can load the scheduler."""
    parts = build_components("tiny", seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        parts["unet"] = UNet2DConditionModel(**{**PRESETS["tiny"].unet, "in_channels": 9}).eval()
    pipe = LatentDiffusion(**parts, source={"test": "inpaint"})
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp("inpaint") / "m")


def reference_for(pipe, folder, scheduler):
    cls, options = REFERENCE_SCHEDULERS[scheduler]
    ref = StableDiffusionInpaintPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=cls.from_pretrained(folder, subfolder="scheduler", **options),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ref


def both(pipe, folder, scheduler, strength, output_type):
    seeds = [4, 12]
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, image=picture(), mask_image=mask(), strength=strength,
                num_images_per_prompt=2, num_inference_steps=4, seed=seeds, scheduler=scheduler,
                output_type=output_type).images  # fmt: skip
    # diffusers encodes a single input image with the first generator only and shares that sample
    # across the batch; given one copy per image, every image draws from its own generator, which
    # is what our seed contract does in any case.
    theirs = reference_for(pipe, folder, scheduler)(
        [PROMPT] * 2, image=[picture()] * 2, mask_image=[mask()] * 2, strength=strength, negative_prompt=[NEGATIVE] * 2,
        num_inference_steps=4, height=48, width=64, output_type=output_type,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    ).images  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize("scheduler, strength", [("euler_a", 1.0), ("ddim", 0.7), ("dpmpp_2m_karras", 1.0)])
def test_nine_channel_unet_matches_diffusers(inpainter, scheduler, strength):
    pipe, folder = inpainter
    # latents: the same computation on both sides
    ours, theirs = both(pipe, folder, scheduler, strength, "latent")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # latents are O(10): relative too
    # images: equal inside the mask; outside it ours deliberately shows the input after a VAE
    # round trip (diffusers leaves the decoder's reconstruction there)
    ours, theirs = both(pipe, folder, scheduler, strength, "np")
    inside = np.asarray(mask().resize((64, 48))) > 127
    np.testing.assert_allclose(ours[:, inside], theirs[:, inside], atol=1e-4, rtol=0)


def test_four_channel_unet_matches_diffusers_and_keeps_the_unmasked_region(tiny, tiny_dir):
    ours, theirs = both(tiny, tiny_dir, "euler_a", 1.0, "latent")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # latents are O(10): relative too
    out = tiny(PROMPT, image=picture(), mask_image=mask(), seed=4, num_inference_steps=4, output_type="pt").images
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    round_trip = proc.postprocess(tiny.vae.decode(tiny.vae.encode(proc.preprocess(picture())).latent_dist.mean).sample,
                                  output_type="pt")  # fmt: skip
    outside = torch.from_numpy(np.asarray(mask()) < 128)
    assert torch.equal(out[0][:, outside], round_trip[0][:, outside])  # pixel for pixel
    assert (out[0][:, ~outside] - round_trip[0][:, ~outside]).abs().max() > 1e-2  # the hole is new


def test_inpainting_batch_invariance(inpainter):
    pipe, _ = inpainter
    kwargs = dict(num_inference_steps=3, scheduler="euler_a", output_type="np")
    alone = pipe("a door", image=picture(seed=2), mask_image=mask(), seed=9, **kwargs).images
    batch = pipe(["a window", "a door"], image=[picture(seed=1), picture(seed=2)], mask_image=mask(), seed=[1, 9],
                 **kwargs).images  # fmt: skip
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5, rtol=0)


def test_inpainting_inputs(tiny, inpainter):
    with pytest.warns(UserWarning, match="mask is resized to the image"):
        out = tiny("x", image=picture(), mask_image=mask(32, 24), seed=1, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 48, 64, 3)
    with pytest.raises(InvalidInputError, match="mask_image needs image="):
        tiny("x", mask_image=mask(), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="9 input channels .* give image= and mask_image="):
        inpainter[0]("x", num_inference_steps=1)
    result = tiny("x", image=picture(), mask_image=mask(), seed=1, num_inference_steps=1, output_type="latent")
    assert result.params[0]["strength"] == 1.0 and len(result.params[0]["mask_hash"]) == 16


def test_masks_with_transparency_and_empty_masks(tiny):
    strokes = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (16, 8, 48, 32))  # white strokes on a transparent layer
    with pytest.warns(UserWarning, match="composited on black"):
        with_alpha = tiny("x", image=picture(), mask_image=strokes, seed=2, num_inference_steps=2, output_type="np")
    plain = tiny("x", image=picture(), mask_image=mask(), seed=2, num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(with_alpha.images, plain.images)  # the strokes are the mask
    with pytest.warns(UserWarning, match="no white at all"):
        tiny("x", image=picture(), mask_image=Image.new("L", (64, 48)), seed=2, num_inference_steps=1, output_type="latent")


def test_hires_and_inpainting_do_not_combine_yet(tiny):
    with pytest.raises(InvalidInputError, match="hires does not combine with inpainting"):
        tiny("x", image=picture(), mask_image=mask(), hires_scale=2, num_inference_steps=1)
