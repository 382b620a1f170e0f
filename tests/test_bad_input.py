"""Bad arguments to the Python API: a ValueError that says what is wrong and what to do."""

from __future__ import annotations

import pytest

from latentdiff import InvalidInputError

CASES = [
    (dict(height=100), "height must be a positive multiple of 8, got 100 \\(try 96 or 104\\)"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(num_inference_steps=0), "num_inference_steps must be a whole number of at least 1"),
    (dict(guidance_scale=-2.0), "guidance_scale must be a finite number at least 0"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be a finite number between 0.0 and 1.0"),
    (dict(scheduler="k_dpm_2"), "unknown scheduler 'k_dpm_2'; valid names: ddim, ddpm, pndm, lms, euler, euler_a"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
    (dict(seed=-1), "seed must be from 0 to 2\\*\\*64-1"),
    (dict(seed=2**64 - 1, num_images_per_prompt=2), "so that all 2 images .* fit"),
    (dict(seed=[1.5]), "seeds must be whole numbers"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(eta=float("nan")), "eta must be a finite number"),
    (dict(num_inference_steps=2000, scheduler="ddim"), "scheduler ddim cannot run 2000 steps"),
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


def test_lcm_distilled_unet_is_refused_clearly():
    from diffusers import UNet2DConditionModel

    from latentdiff import LatentDiffusion
    from latentdiff.models.architectures import PRESETS, build_components

    parts = build_components("tiny")
    parts["unet"] = UNet2DConditionModel(**PRESETS["tiny"].unet, time_cond_proj_dim=8)
    with pytest.raises(InvalidInputError, match="LCM-distilled"):
        LatentDiffusion(**parts, source={})("x", num_inference_steps=1)


def test_eta_without_ddim_warns(tiny):
    with pytest.warns(UserWarning, match="eta=0.5 has no effect"):
        tiny("x", eta=0.5, scheduler="euler", num_inference_steps=1, output_type="latent")


def test_bad_clip_skip_and_embeds(tiny):
    import torch

    with pytest.raises(InvalidInputError, match="clip_skip must be a whole number from 0 to 1"):
        tiny("x", clip_skip=2, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="prompt_embeds has dimension 16, this model's text encoder 32"):
        tiny(prompt_embeds=torch.zeros(1, 77, 16), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="give prompt or prompt_embeds"):
        tiny("x", prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="not a multiple of 77"):
        tiny(prompt_embeds=torch.zeros(1, 80, 32), num_inference_steps=1)
