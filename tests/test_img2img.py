"""Image-to-image against diffusers' StableDiffusionImg2ImgPipeline on the same weights; input files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REFERENCE_SCHEDULERS, picture
from latentdiff import InvalidInputError, MissingFileError

PROMPT, NEGATIVE = "a watercolour of a harbour", "blurry"


@pytest.fixture
def img2img_reference(reference):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_same_images_as_diffusers_img2img(tiny, tiny_dir, img2img_reference, scheduler):
    cls, options = REFERENCE_SCHEDULERS[scheduler]
    img2img_reference.scheduler = cls.from_pretrained(tiny_dir, subfolder="scheduler", **options)
    image, seeds = picture(), [5, 9]
    ours = tiny(PROMPT, negative_prompt=NEGATIVE, image=image, strength=0.7, num_images_per_prompt=2,
                num_inference_steps=5, seed=seeds, scheduler=scheduler, output_type="np").images  # fmt: skip
    theirs = img2img_reference(
        [PROMPT] * 2, image=image, strength=0.7, negative_prompt=[NEGATIVE] * 2, num_inference_steps=5,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np",
    ).images  # fmt: skip
    assert ours.shape == theirs.shape == (2, 48, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2


def test_img2img_batch_invariance(tiny):
    kwargs = dict(strength=0.5, num_inference_steps=4, scheduler="euler_a", output_type="np")
    alone = tiny("a boat", image=picture(seed=2), seed=7, **kwargs).images
    batch = tiny(["a car", "a boat"], image=[picture(seed=1), picture(seed=2)], seed=[3, 7], **kwargs).images
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5, rtol=0)


def test_strength_zero_gives_back_the_vae_round_trip(tiny):
    image = picture()
    out = tiny("x", image=image, strength=0.0, seed=1, num_inference_steps=4, output_type="pt").images
    # the VAE round trip of the (sampled) latent, written out with diffusers' own processor
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    posterior = tiny.vae.encode(proc.preprocess(image, height=48, width=64)).latent_dist
    eps = torch.randn((1, 4, 6, 8), generator=torch.Generator("cpu").manual_seed(1))
    decoded = tiny.vae.decode(posterior.mean + posterior.std * eps).sample
    assert torch.allclose(out, proc.postprocess(decoded, output_type="pt"), atol=1e-5)


def test_recipe_records_image_and_strength(tiny, tmp_path):
    from latentdiff import call_kwargs

    path = tmp_path / "in.png"
    picture().save(path)
    first = tiny("a fox", image=path, strength=0.8, seed=4, num_inference_steps=3, output_type="np")
    params = first.params[0]
    assert params["image"] == str(path.resolve()) and params["strength"] == 0.8 and len(params["image_hash"]) == 16
    again = tiny(**call_kwargs(params), output_type="np")
    np.testing.assert_allclose(again.images, first.images, atol=1e-6)


def test_input_files_are_converted_or_refused(tiny, tmp_path):
    rgb = picture()
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(sixteen)  # 16-bit greyscale
    palette = tmp_path / "palette.png"
    rgb.convert("P").save(palette)
    kw = dict(seed=1, num_inference_steps=2, output_type="latent")
    for path in (sixteen, palette):
        assert tiny("x", image=path, **kw).images.shape == (1, 4, 6, 8)
    # the 16-bit file reads as its 8-bit greyscale twin
    grey = tmp_path / "grey.png"
    rgb.convert("L").save(grey)
    assert torch.equal(tiny("x", image=sixteen, **kw).images, tiny("x", image=grey, **kw).images)
    truncated = tmp_path / "truncated.png"
    full = tmp_path / "full.png"
    rgb.save(full)
    truncated.write_bytes(full.read_bytes()[:200])  # a download cut short
    with pytest.raises(InvalidInputError, match="cannot read .*truncated.png as an image"):
        tiny("x", image=truncated, **kw)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InvalidInputError, match="cannot read .*notes.txt as an image"):
        tiny("x", image=text, **kw)
    with pytest.raises(MissingFileError, match="does not exist"):
        tiny("x", image=tmp_path / "missing.png", **kw)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidInputError, match="strength must be a finite number between 0.0 and 1.0"):
            tiny("x", image=rgb, strength=bad, **kw)
    with pytest.raises(InvalidInputError, match="strength applies to image-to-image only"):
        tiny("x", strength=0.5, **kw)
    with pytest.raises(InvalidInputError, match="got 2 images for 3 prompts"):
        tiny(["a", "b", "c"], image=[rgb, rgb], seed=[1, 2, 3], num_inference_steps=1)


def test_hires_pixel_mode_is_txt2img_then_img2img_with_the_generator_going_on(tiny, tiny_dir, reference):
    """Independent reference: diffusers' txt2img, a Lanczos resize, then diffusers' img2img whose
    generator has already made the base image's one draw (Euler draws nothing else)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    sched = EulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    reference.scheduler = sched
    img2img = StableDiffusionImg2ImgPipeline(**{**reference.components, "scheduler": sched})
    img2img.set_progress_bar_config(disable=True)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=4)
    gen = torch.Generator("cpu").manual_seed(21)
    base = reference(PROMPT, height=48, width=64, generator=[gen], output_type="pil", **common).images[0]
    theirs = img2img(PROMPT, image=base.resize((128, 96), Image.LANCZOS), strength=0.5, generator=[gen],
                     output_type="np", **common).images  # fmt: skip
    ours = tiny(PROMPT, height=48, width=64, seed=21, scheduler="euler", hires_scale=2.0, hires_upscale="pixel",
                hires_strength=0.5, output_type="np", **common).images  # fmt: skip
    assert ours.shape == theirs.shape == (1, 96, 128, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_hires_latent_mode(tiny):
    from latentdiff import call_kwargs

    kwargs = dict(seed=[3, 4], num_inference_steps=3, scheduler="euler_a", output_type="np")
    result = tiny(["a", "b"], hires_scale=1.5, **kwargs)
    assert result.images.shape == (2, 96, 96, 3)
    params = result.params[1]
    assert (params["hires_scale"], params["hires_upscale"], params["height"]) == (1.5, "latent", 64)
    again = tiny(**call_kwargs(params), output_type="np")
    np.testing.assert_allclose(again.images[0], result.images[1], atol=1e-5)
    for bad, message in ((dict(hires_scale=0.5), "hires_scale must be a finite number between 1.0 and 8.0"),
                         (dict(hires_scale=2, hires_upscale="esrgan"), "hires_upscale must be one of latent, pixel")):
        with pytest.raises(InvalidInputError, match=message):
            tiny("x", num_inference_steps=1, **bad)


def test_recipes_that_cannot_remake_say_so(tiny):
    from latentdiff import call_kwargs
    from latentdiff.generation.prompts import encode_prompts

    from_pil = tiny("x", image=picture(), seed=1, num_inference_steps=1, output_type="latent").params[0]
    with pytest.raises(InvalidInputError, match="image was given as an image object"):
        call_kwargs(from_pil)
    embeds = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["x"])
    from_embeds = tiny(prompt_embeds=embeds, seed=1, num_inference_steps=1, output_type="latent").params[0]
    with pytest.raises(InvalidInputError, match="made from prompt_embeds"):
        call_kwargs(from_embeds)
    with pytest.raises(InvalidInputError, match="shorten it, or pass negative_prompt_embeds"):
        tiny(prompt_embeds=embeds, negative_prompt="word " * 100, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="need hires_scale"):
        tiny("x", hires_strength=0.3, num_inference_steps=1)


def test_pndm_image_to_image_warns(tiny):
    with pytest.warns(UserWarning, match="cannot start part-way"):
        tiny("x", image=picture(), strength=0.5, seed=1, num_inference_steps=2, output_type="latent")
