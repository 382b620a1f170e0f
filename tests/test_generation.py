"""Generation against diffusers' own StableDiffusionPipeline on the same weights, and the seed contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from helpers import REFERENCE_SCHEDULERS
from latentdiff import LatentDiffusion
from latentdiff.generation.sampling import initial_latents, make_generators
from latentdiff.models.architectures import build_components
from latentdiff.models.tokenizer import load_clip_tokenizer

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SEEDS = [3, 11]


def reference_images(reference, folder, name, *, seeds, height, width, steps=3, **kwargs):
    cls, options = REFERENCE_SCHEDULERS[name]
    reference.scheduler = cls.from_pretrained(folder, subfolder="scheduler", **options)
    out = reference(
        [PROMPT] * len(seeds),
        negative_prompt=[NEGATIVE] * len(seeds),
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize("name", list(REFERENCE_SCHEDULERS))
def test_same_images_as_diffusers(tiny, tiny_dir, reference, name):
    """Two seeds, a negative prompt, a non-square size: equal to diffusers' images to 1e-4."""
    ours = tiny(
        PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=3,
        height=64, width=48, seed=SEEDS, scheduler=name, output_type="np",
    ).images  # fmt: skip
    theirs = reference_images(reference, tiny_dir, name, seeds=SEEDS, height=64, width=48)
    assert ours.shape == theirs.shape == (2, 64, 48, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # the comparison means something only if the two images differ from each other
    assert np.abs(ours[0] - ours[1]).max() > 1e-2


def test_default_scheduler_and_guidance_rescale_match_diffusers(tiny, tiny_dir, reference):
    ours = tiny(
        PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=4,
        height=48, width=64, seed=SEEDS, guidance_rescale=0.7, guidance_scale=5.0, output_type="np",
    ).images  # fmt: skip
    theirs = reference_images(
        reference, tiny_dir, "pndm", seeds=SEEDS, height=48, width=64, steps=4, guidance_rescale=0.7, guidance_scale=5.0
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_ddim_eta_matches_diffusers(tiny, tiny_dir, reference):
    ours = tiny(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=3,
                height=64, width=64, seed=SEEDS, scheduler="ddim", eta=1.0, output_type="np").images  # fmt: skip
    theirs = reference_images(reference, tiny_dir, "ddim", seeds=SEEDS, height=64, width=64, eta=1.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    eta0 = tiny(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, height=64, width=64, seed=SEEDS[0],
                scheduler="ddim", output_type="np").images  # fmt: skip
    assert np.abs(eta0[0] - ours[0]).max() > 1e-3  # eta really adds noise


def test_v_prediction_sd2_style_model_matches_diffusers(tmp_path):
    """An SD 2.x-style model: v-prediction, "!" padding, linear attention projections."""
    parts = build_components("tiny", seed=5)
    parts["tokenizer"] = load_clip_tokenizer(pad_token="!")
    parts["scheduler_config"] = {**parts["scheduler_config"], "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    pipe = LatentDiffusion(**parts, source={"test": "v"})
    folder = pipe.save_pretrained(tmp_path / "v")
    loaded = LatentDiffusion.from_pretrained(folder)
    assert loaded.tokenizer.pad_token == "!" and loaded.scheduler_config["prediction_type"] == "v_prediction"
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, height=64, width=64,
                       generator=[torch.Generator("cpu").manual_seed(9)], output_type="np").images  # fmt: skip
    ours = loaded(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, height=64, width=64, seed=9,
                  output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_seed_7_alone_equals_seed_7_at_position_2_of_3(tiny):
    shape = (4, 8, 8)
    alone = initial_latents(make_generators([7]), shape)
    batch = initial_latents(make_generators([1, 2, 7]), shape)
    assert torch.equal(alone[0], batch[2])  # the same noise, bit for bit
    # and the first draw of the generator is the starting latent, as the contract says
    assert torch.equal(alone, torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(7)))

    kwargs = dict(num_inference_steps=3, scheduler="euler_a", output_type="np")  # ancestral: noise every step
    one = tiny("a red apple", seed=7, **kwargs).images
    three = tiny(["a cat", "a dog", "a red apple"], seed=[1, 2, 7], **kwargs).images
    np.testing.assert_allclose(one[0], three[2], atol=1e-5, rtol=0)
    assert np.abs(three[0] - three[2]).max() > 1e-2


def test_seeds_and_params(tiny):
    result = tiny(["a", "b"], num_images_per_prompt=2, seed=100, num_inference_steps=1, output_type="latent")
    assert result.seeds == [100, 101, 102, 103]
    assert [p["prompt"] for p in result.params] == ["a", "a", "b", "b"]
    assert [p["seed"] for p in result.params] == result.seeds
    assert result.images.shape == (4, 4, 8, 8)
    random_seeds = tiny("a", num_images_per_prompt=3, num_inference_steps=1, output_type="latent").seeds
    assert len(set(random_seeds)) == 3


def test_params_remake_the_image(tiny):
    from latentdiff import call_kwargs

    first = tiny("a lighthouse", negative_prompt="fog", seed=[4, 8], num_images_per_prompt=2,
                 num_inference_steps=3, scheduler="dpmpp_2m", guidance_scale=4.0, output_type="np")  # fmt: skip
    again = tiny(**call_kwargs(first.params[1]), output_type="np")
    np.testing.assert_allclose(again.images[0], first.images[1], atol=1e-5, rtol=0)


def test_no_unconditional_pass_without_guidance(tiny):
    batch_sizes = []
    hook = tiny.unet.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    try:
        tiny(["a", "b"], seed=1, num_inference_steps=2, scheduler="euler", guidance_scale=1.0, output_type="latent")
        assert batch_sizes == [2, 2]
        batch_sizes.clear()
        tiny(["a", "b"], seed=1, num_inference_steps=2, scheduler="euler", guidance_scale=3.0, output_type="latent")
        assert batch_sizes == [4, 4]  # cond and uncond in one call
    finally:
        hook.remove()


def test_output_types_agree(tiny):
    kwargs = dict(seed=2, num_inference_steps=2)
    pil = tiny("x", **kwargs).images[0]
    pt = tiny("x", output_type="pt", **kwargs).images
    arr = np.asarray(pil)
    assert pil.size == (64, 64) and pt.shape == (1, 3, 64, 64)
    expected = (pt[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(arr, expected)


def test_callback_sees_every_step(tiny):
    seen = []
    tiny("x", seed=1, num_inference_steps=4, scheduler="euler", output_type="latent",
         callback=lambda i, t, z: seen.append((i, t, tuple(z.shape))))  # fmt: skip
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert all(s[2] == (1, 4, 8, 8) for s in seen)
    assert seen[0][1] > seen[-1][1]  # timesteps run from noisy to clean


def test_empty_prompt_is_an_unconditional_image(tiny):
    result = tiny("", seed=1, num_inference_steps=2)
    assert result.params[0]["prompt"] == "" and len(result.images) == 1


def test_global_rng_is_left_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny("x", seed=1, num_inference_steps=2, scheduler="euler_a", output_type="latent")
    assert torch.equal(torch.rand(3), expected)


def test_one_negative_prompt_for_all_prompts(tiny):
    kwargs = dict(seed=[1, 2], num_inference_steps=2, scheduler="euler", output_type="latent")
    shared = tiny(["a", "b"], negative_prompt="dark", **kwargs)
    listed = tiny(["a", "b"], negative_prompt=["dark", "dark"], **kwargs)
    assert torch.equal(shared.images, listed.images)
    assert [p["negative_prompt"] for p in shared.params] == ["dark", "dark"]
    assert not torch.equal(tiny(["a", "b"], **kwargs).images, shared.images)  # the negative prompt matters
