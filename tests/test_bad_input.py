"""Bad arguments to the Python API: a ValueError that says what is wrong and what to do."""

from __future__ import annotations

import pytest

from latentdiff import InvalidInputError

CASES = [
    (dict(height=100), "height must be a positive multiple of 8, got 100 \\(try 96 or 104\\)"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(num_inference_steps=0), "num_inference_steps must be a whole number of at least 1"),
    (dict(guidance_scale=-2.0), "guidance_scale must be a number at least 0"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be a number between 0.0 and 1.0"),
    (dict(scheduler="k_dpm_2"), "unknown scheduler 'k_dpm_2'; valid names: ddim, ddpm, pndm, lms, euler, euler_a"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
    (dict(seed=-1), "seeds must be whole numbers from 0"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a whole number of at least 1"),
    (dict(output_type="jpeg"), "output_type must be one of pil, np, pt, latent"),
    (dict(negative_prompt=["a", "b"]), "got 1 prompts but 2 negative prompts"),
]


@pytest.mark.parametrize("kwargs, message", CASES)
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny("a cat", **{"num_inference_steps": 1, **kwargs})
    assert isinstance(info.value, InvalidInputError)


@pytest.mark.parametrize("prompt", [[], None, 3, ["ok", 4]])
def test_bad_prompts(tiny, prompt):
    with pytest.raises(ValueError, match="prompt"):
        tiny(prompt, num_inference_steps=1)


def test_eta_without_ddim_warns(tiny):
    with pytest.warns(UserWarning, match="eta=0.5 has no effect"):
        tiny("x", eta=0.5, scheduler="euler", num_inference_steps=1, output_type="latent")


def test_too_long_prompt_warns(tiny):
    with pytest.warns(UserWarning, match="only the first 75"):
        tiny("word " * 100, num_inference_steps=1, output_type="latent")
