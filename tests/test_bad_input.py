"""Bad arguments to the Python API: a ValueError that says what is wrong and what to do."""

from __future__ import annotations

import pytest

from helpers import png_header
from latentdiff import InvalidInputError

CASES = [
    (dict(height=100), "height must be a positive multiple of 8, got 100 \\(try 96 or 104\\)"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(num_inference_steps=0), "num_inference_steps must be a whole number of at least 1"),
    (dict(guidance_scale=-2.0), "guidance_scale must be a finite number between 0.0 and 100.0"),
    (dict(guidance_scale=1e30), "guidance_scale must be a finite number between 0.0 and 100.0"),
    (dict(eta=1.5, scheduler="ddim"), "eta must be a finite number between 0.0 and 1.0"),
    (dict(callback=5), "callback must be a function callback\\(step, timestep, latents\\) or None, got 5"),
    (dict(progress="yes"), "progress must be True, False or None"),
    (dict(clip_skip="2"), "clip_skip must be a whole number of at least 0"),
    (dict(height=16384, width=16384), "16384x16384 \\(268,435,456 pixels\\) is above the limit pixels=4194304.*--limit pixels=N"),
    (dict(height=100000, width=100000), "is above the limit pixels="),
    (dict(num_inference_steps=100000), "num_inference_steps 100000 is above the limit steps=1000"),
    (dict(num_inference_steps=10**9), "is above the limit steps=1000"),
    (dict(num_images_per_prompt=100000), "100000 images in one call is above the limit images=64"),
    (dict(height=1024, width=1024, hires_scale=8), "the hires result 8192x8192 .* is above the limit pixels"),
    (dict(num_inference_steps=1000, scheduler="pndm"), "scheduler pndm cannot run 1000 steps on a model trained with 1000"),
    (dict(scheduler=3), "scheduler must be a name"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be a finite number between 0.0 and 1.0"),
    (dict(scheduler="k_dpm_2"), "unknown scheduler 'k_dpm_2'; valid names: ddim, ddpm, pndm, lms, euler, euler_a"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
    (dict(seed=-1), "seed must be from 0 to 2\\*\\*64-1"),
    (dict(seed=2**64 - 1, num_images_per_prompt=2), "so that all 2 images .* fit"),
    (dict(seed=[1.5]), "seeds must be whole numbers"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(eta=float("nan")), "eta must be a finite number"),
    (dict(num_inference_steps=1000, scheduler="ddim"), "scheduler ddim cannot run 1000 steps"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a whole number of at least 1"),
    (dict(output_type="jpeg"), "output_type must be one of pil, np, pt, latent"),
    (dict(negative_prompt=["a", "b"]), "got 1 prompts but 2 negative prompts"),
]


@pytest.mark.parametrize("kwargs, message", CASES)
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny("a cat", **{"num_inference_steps": 1, **kwargs})
    assert isinstance(info.value, InvalidInputError)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "prompt is an empty list; give at least one prompt"),
        (None, "give prompt or prompt_embeds"),
        (3, "prompt must be a string or a list of strings, got int"),
        (["ok", 4], "prompt must be a string or a list of strings"),
        ("a \udcff cat", "prompt is not valid text: invalid UTF-8 \\(a lone surrogate"),  # what invalid UTF-8 argv gives
        (["fine", "bad \ud800"], "prompt is not valid text"),
        ("word " * 5000, "a prompt of 25,000 characters is above the limit prompt_chars=20000"),
    ],
)
def test_bad_prompts(tiny, prompt, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny(prompt, num_inference_steps=1)


def test_numpy_numbers_are_accepted(tiny):
    import numpy as np

    result = tiny("x", seed=np.int64(3), num_inference_steps=np.int32(1), guidance_scale=np.float32(2.0),
                  height=np.int64(64), output_type="latent")  # fmt: skip
    assert result.seeds == [3] and type(result.params[0]["height"]) is int
    import json

    json.dumps(result.params)  # the recipe stays plain JSON


def test_negative_prompt_without_guidance_warns(tiny):
    with pytest.warns(UserWarning, match="negative_prompt has no effect"):
        tiny("x", negative_prompt="y", guidance_scale=1.0, num_inference_steps=1, output_type="latent")


def test_lcm_distilled_unet_needs_the_lcm_sampler():
    from diffusers import UNet2DConditionModel

    from latentdiff import LatentDiffusion
    from latentdiff.models.architectures import PRESETS, build_components

    parts = build_components("tiny")
    parts["unet"] = UNet2DConditionModel(**PRESETS["tiny"].unet, time_cond_proj_dim=8)
    with pytest.raises(InvalidInputError, match="LCM-distilled .* scheduler='lcm'"):
        LatentDiffusion(**parts, source={})("x", num_inference_steps=1)


def test_eta_without_ddim_warns(tiny):
    with pytest.warns(UserWarning, match="eta=0.5 has no effect"):
        tiny("x", eta=0.5, scheduler="euler", num_inference_steps=1, output_type="latent")


def test_bad_clip_skip_and_embeds(tiny):
    import torch

    with pytest.raises(InvalidInputError, match="clip_skip must be a whole number from 0 to 1"):
        tiny("x", clip_skip=2, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="prompt_embeds has dimension 16, this model's text conditioning 32"):
        tiny(prompt_embeds=torch.zeros(1, 77, 16), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="give prompt or prompt_embeds"):
        tiny("x", prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="not a multiple of 77"):
        tiny(prompt_embeds=torch.zeros(1, 80, 32), num_inference_steps=1)


def test_input_pictures_are_bounded_before_they_are_decoded(tiny, tmp_path):
    from PIL import Image

    with pytest.raises(InvalidInputError, match="image .*10000x10000 \\(100,000,000 pixels\\) is above the limit input_pixels"):
        tiny("x", image=png_header(tmp_path / "huge.png", 10000, 10000), num_inference_steps=1)
    Image.new("RGB", (3840, 2160), "gray").save(tmp_path / "4k.png")
    # a 4k picture is readable, but the output would take its size: refused with what to do
    with pytest.raises(InvalidInputError, match="3840x2160 .* above the limit pixels.*unless height and width \\(--size\\)"):
        tiny("x", image=tmp_path / "4k.png", num_inference_steps=1)
    made = tiny("x", image=tmp_path / "4k.png", height=64, width=64, num_inference_steps=1, scheduler="euler", output_type="latent")
    assert made.images.shape == (1, 4, 8, 8)


def test_limits_can_be_raised(tiny):
    import copy

    from latentdiff.checks import Limits

    pipe = copy.copy(tiny)  # shares the weights; only the limits differ
    pipe.limits = Limits(steps=1200)
    assert pipe("x", num_inference_steps=1200, scheduler="euler", height=32, width=32, output_type="latent").images.shape[0] == 1
    assert Limits.parse(["steps=5", "pixels=64x32", "input-pixels=9"]) == Limits(steps=5, pixels=2048, input_pixels=9)
    for bad in ("steps", "steps=0", "speed=3", "pixels=big"):
        with pytest.raises(InvalidInputError, match="limit"):
            Limits.parse([bad])


def test_far_from_native_size_warns_once(tiny):
    import copy

    pipe = copy.copy(tiny)
    pipe.__dict__.pop("_warned_sizes", None)  # (a shallow copy would share the original's record)
    with pytest.warns(UserWarning, match="256x256 is far from this model's native 64x64"):
        pipe("x", height=256, width=256, num_inference_steps=1, output_type="latent")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call at that size says nothing
        pipe("x", height=256, width=256, num_inference_steps=1, output_type="latent")
        pipe("x", height=32, width=96, num_inference_steps=1, output_type="latent")  # within a factor of 2


def test_non_finite_results_are_errors_naming_the_cause(tiny):
    import copy

    import torch

    from latentdiff.errors import NonFiniteResultError

    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteResultError, match="hold NaN or infinite values, so no image was made; likely cause: the model's weights"):
        broken("x", num_inference_steps=2, seed=[1])
    with pytest.raises(InvalidInputError, match="prompt_embeds holds NaN"):
        tiny(prompt_embeds=torch.full((1, 77, 32), float("nan")), num_inference_steps=1)


def test_model_arguments(tiny_dir):
    import torch

    from latentdiff import LatentDiffusion

    with pytest.raises(InvalidInputError, match="from_pretrained takes a model folder path \\(str or Path\\) or None, got int"):
        LatentDiffusion.from_pretrained(5)
    with pytest.raises(InvalidInputError, match="dtype must be a torch.dtype or one of float32, float16, bfloat16"):
        LatentDiffusion.from_pretrained(tiny_dir, dtype="half-ish")
    with pytest.raises(InvalidInputError, match="preset seed must be a whole number from 0 to 2\\*\\*64-1"):
        LatentDiffusion.from_preset("tiny", seed=2**70)
    # a dtype by name applies to every part, so the first call runs (it failed with Half != float)
    half = LatentDiffusion.from_pretrained(tiny_dir, dtype="bfloat16")
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert half("x", num_inference_steps=1, seed=1, output_type="np").images.shape == (1, 64, 64, 3)
