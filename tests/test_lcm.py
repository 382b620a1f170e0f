"""Few-step generation with LCM-distilled models: w-conditioned U-Nets and LCM-LoRAs, against
diffusers' own LCM pipelines on the same tiny random weights; the default model's LCM-LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusion, MissingFileError, call_kwargs
from latentdiff.models.architectures import PRESETS, build_components

SEEDS = [3, 11]
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    """A tiny model whose U-Net takes a guidance embedding (time_cond_proj_dim), random weights."""
    from diffusers import UNet2DConditionModel

    parts = build_components("tiny", seed=2)
    torch.manual_seed(4)
    parts["unet"] = UNet2DConditionModel(**PRESETS["tiny"].unet, time_cond_proj_dim=16)
    parts["scheduler_config"] = {**parts["scheduler_config"], "_class_name": "LCMScheduler"}
    return LatentDiffusion(**parts, source={"test": "lcm"}).save_pretrained(tmp_path_factory.mktemp("lcm") / "model")


def generators():
    return [torch.Generator("cpu").manual_seed(s) for s in SEEDS]


@pytest.mark.parametrize("reference", ["LatentConsistencyModelPipeline", "StableDiffusionPipeline"])
def test_w_conditioned_unet_equals_diffusers(lcm_dir, reference):
    import diffusers

    ours = LatentDiffusion.from_pretrained(lcm_dir)
    kwargs = {"num_inference_steps": 4, "guidance_scale": 6.0, "height": 64, "width": 48, "output_type": "np"}
    a = ours(PROMPT, num_images_per_prompt=2, seed=SEEDS, progress=False, **kwargs)
    theirs = getattr(diffusers, reference).from_pretrained(lcm_dir, local_files_only=True, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "LCMScheduler"  # the folder names its scheduler
    b = theirs([PROMPT] * 2, generator=generators(), **kwargs).images
    np.testing.assert_allclose(a.images, b, atol=1e-4, rtol=0)
    assert np.abs(a.images[0] - a.images[1]).max() > 1e-2  # two different images
    # the guidance scale goes in as an embedding: another scale, another image, still one pass
    other = ours(PROMPT, seed=SEEDS[0], progress=False, **{**kwargs, "guidance_scale": 1.5}).images
    assert np.abs(other[0] - a.images[0]).max() > 1e-3
    assert a.params[0]["guidance_embedding"] is True and a.params[0]["scheduler_class"] == "LCMScheduler"
    again = ours(**call_kwargs(a.params[1]), output_type="np", progress=False).images[0]  # the recipe remakes it
    np.testing.assert_allclose(again, a.images[1], atol=1e-5)


def test_w_conditioned_unet_makes_one_unet_pass_per_step(lcm_dir):
    ours = LatentDiffusion.from_pretrained(lcm_dir)
    batches = []
    ours.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    with pytest.warns(UserWarning, match="negative_prompt has no effect: an LCM-distilled U-Net"):
        ours(PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=8.0, output_type="latent")
    assert batches == [1, 1, 1]  # no unconditional pass


def test_lcm_lora_equals_diffusers(tiny, tiny_dir, tmp_path):
    """An LCM-LoRA is a LoRA run with the lcm sampler and no guidance: equal to diffusers'
    StableDiffusionPipeline with LCMScheduler and load_lora_weights."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    from latentdiff.models.lora import add_lora_adapter, save_lora

    unet = LatentDiffusion.from_preset("tiny").unet
    add_lora_adapter(unet, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    torch.manual_seed(0)
    for name, weight in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.3)
    path = save_lora(tmp_path / "lcm.safetensors", unet_state=get_peft_model_state_dict(unet), rank=4, alpha=4, layout="peft")

    ours = LatentDiffusion.from_pretrained(tiny_dir)
    ours.load_lora(path)
    kwargs = {"num_inference_steps": 4, "guidance_scale": 1.0, "height": 64, "width": 64, "output_type": "np"}
    a = ours(PROMPT, num_images_per_prompt=2, seed=SEEDS, scheduler="lcm", progress=False, **kwargs)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True, safety_checker=None)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(str(path))
    theirs.set_progress_bar_config(disable=True)
    b = theirs([PROMPT] * 2, generator=generators(), **kwargs).images
    np.testing.assert_allclose(a.images, b, atol=1e-4, rtol=0)
    plain = tiny(PROMPT, seed=SEEDS[0], scheduler="lcm", progress=False, **kwargs).images[0]
    assert np.abs(plain - a.images[0]).max() > 1e-3  # the LoRA mattered
    assert a.params[0]["loras"][0]["path"] == str(path) and a.params[0]["scheduler"] == "lcm"


def test_missing_default_lcm_lora_is_one_line(monkeypatch, tmp_path):
    from latentdiff.generation import pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_LCM_LORA", tmp_path / "absent" / "lora.safetensors")
    with pytest.raises(MissingFileError, match="LCM-LoRA is not shipped yet") as caught:
        LatentDiffusion.from_pretrained(lcm=True)
    assert "\n" not in str(caught.value)


def test_generate_lcm_uses_the_default_models_lcm_lora(monkeypatch, tmp_path, capsys):
    """`latentdiff generate "red apple" --lcm`: the default model, its LCM-LoRA, the lcm sampler, 4
    steps and no guidance; the PNG's recipe remakes the image (here with a stand-in LoRA of the right shape)."""
    from peft import get_peft_model_state_dict
    from PIL import Image

    from latentdiff.cli import main
    from latentdiff.generation import pipeline
    from latentdiff.generation.recipe import read_recipe
    from latentdiff.models.lora import add_lora_adapter, save_lora

    unet = LatentDiffusion.from_pretrained().unet
    add_lora_adapter(unet, rank=2, alpha=2, targets=["to_q", "to_v"])
    lora = save_lora(tmp_path / "lora.safetensors", unet_state=get_peft_model_state_dict(unet), rank=2, alpha=2)
    monkeypatch.setattr(pipeline, "DEFAULT_LCM_LORA", lora)
    assert main(["generate", "red apple", "--lcm", "--seed", "1", "--no-progress", "-o", str(tmp_path / "a.png")]) == 0
    recipe = read_recipe(tmp_path / "a.png")
    assert (recipe["scheduler"], recipe["num_inference_steps"], recipe["guidance_scale"]) == ("lcm", 4, 1.0)
    assert [(e["name"], e["path"]) for e in recipe["loras"]] == [("lcm", str(lora))]
    assert main(["generate", "--from-png", str(tmp_path / "a.png"), "--no-progress", "-o", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    capsys.readouterr()
    assert main(["generate", "red apple", "--lcm", "--preset", "tiny", "-o", str(tmp_path)]) == 2
    assert "--lcm uses the default model's LCM-LoRA" in capsys.readouterr().err


def test_the_shipped_lcm_lora_draws_the_prompts_colours_in_four_steps():
    """The default model's LCM-LoRA is shipped, small, and in 4 steps without a guidance pass draws
    what the caption asks for as the pixels read back say it (shape and background colour)."""
    from latentdiff.evaluate import read_shape
    from latentdiff.generation.pipeline import DEFAULT_LCM_LORA, LCM_CALL

    assert DEFAULT_LCM_LORA.is_file() and DEFAULT_LCM_LORA.stat().st_size < 1024 * 1024
    assert "benchmarks/lcm.py" in (DEFAULT_LCM_LORA.parent / "README.md").read_text()
    pipe = LatentDiffusion.from_pretrained(lcm=True)
    asked = [("red", "orange"), ("white", "black"), ("yellow", "blue"), ("green", "white")]
    prompts = [f"a {c} circle in the center on a {b} background" for c, b in asked]
    images = pipe(prompts, seed=[0, 1, 2, 3], progress=False, **LCM_CALL).images
    seen = [read_shape(image) for image in images]
    assert [(s["colour"], s["background"]) for s in seen] == asked, seen
