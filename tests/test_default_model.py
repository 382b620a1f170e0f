"""The embedded default model: shipped in the package, small, loaded when no model is named, and the
same model to diffusers' own pipeline."""

from __future__ import annotations

import json

import numpy as np
import torch

from latentdiff import LatentDiffusion
from latentdiff.cli import main as cli
from latentdiff.generation.pipeline import DEFAULT_MODEL_DIR
from latentdiff.generation.recipe import read_recipe


def test_the_folder_is_complete_small_and_documented():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    for needed in ("CC-BY 4.0", "CC0", "training/train.py --config training/configs/default-model.toml",
                   "latentdiff eval", "PSNR"):  # fmt: skip
        assert needed in card, needed
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_no_path_loads_it_in_float32():
    pipe = LatentDiffusion.from_pretrained()
    assert pipe.source["path"] == str(DEFAULT_MODEL_DIR.resolve())
    # the files hold float16; every part must come out float32 (diffusers and transformers differ here)
    for loaded in (pipe, LatentDiffusion.from_pretrained(DEFAULT_MODEL_DIR)):
        assert {p.dtype for m in (loaded.unet, loaded.vae, loaded.text_encoder) for p in m.parameters()} == {torch.float32}
    half = LatentDiffusion.from_pretrained(dtype=torch.float16)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.float16}


def test_diffusers_makes_the_same_image_from_the_same_seed():
    from diffusers import StableDiffusionPipeline

    ours = LatentDiffusion.from_pretrained()
    theirs = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32, local_files_only=True,
                                                     safety_checker=None, requires_safety_checker=False)  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4, "guidance_scale": 5.0}
    a = ours("red apple", seed=11, output_type="np", **kwargs).images[0]
    b = theirs("red apple", generator=torch.Generator().manual_seed(11), output_type="np", **kwargs).images[0]
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() < 1e-4


def test_cli_without_a_model_uses_it(tmp_path):
    out = tmp_path / "apple.png"
    assert cli(["generate", "red apple", "--steps", "2", "--seed", "1", "-o", str(out), "--no-progress"]) == 0
    recipe = read_recipe(out)
    assert recipe["prompt"] == "red apple" and recipe["model"]["path"] == str(DEFAULT_MODEL_DIR.resolve())


def test_the_default_controlnet_puts_the_shape_where_its_silhouette_is():
    """`--controlnet default`: shipped beside the model, small, documented; silhouettes drawn here
    (the shapes builder's geometry, new drawings) decide where the shape goes, and the prompt its
    colours, as read back from the pixels."""
    from latentdiff.data.builders.shapes import Combo, draw
    from latentdiff.evaluate import placed_fraction, read_shape
    from latentdiff.generation.control import DEFAULT_CONTROLNET

    files = [p for p in DEFAULT_CONTROLNET.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 8 * 1024 * 1024
    assert "latentdiff eval" in (DEFAULT_CONTROLNET / "README.md").read_text()
    combos = [Combo("red", "square", "top left", "white"), Combo("blue", "circle", "bottom right", "yellow"),
              Combo("white", "star", "right", "black")]  # fmt: skip
    rng = np.random.default_rng(5)
    silhouettes = [draw(c, 64, rng, control="silhouette")[1] for c in combos]
    pipe = LatentDiffusion.from_pretrained()
    pipe.load_controlnet("default")
    images = pipe([c.caption for c in combos], control_image=silhouettes, seed=[0, 1, 2], num_inference_steps=25,
                  guidance_scale=5.0, progress=False).images  # fmt: skip
    assert placed_fraction(images, silhouettes) == 1.0
    assert [(read_shape(im)["colour"], read_shape(im)["background"]) for im in images] == [
        (c.colour, c.background) for c in combos
    ]
