"""The latentdiff command: images with recipes, --from-png, info, schedules, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.generation.recipe import PNG_KEY, read_recipe


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_recipe(tiny, capsys, tmp_path):
    target = tmp_path / "apple.png"
    code, out, _ = run(capsys, "generate", "a red apple", "--preset", "tiny", "--seed", "42", "--steps", "3",
                       "--negative", "green", "--cfg", "5", "--size", "48x64", "--scheduler", "euler_a",
                       "-o", str(target), "--no-progress")  # fmt: skip
    assert code == 0 and out.strip() == str(target)
    recipe = read_recipe(target)
    assert recipe["prompt"] == "a red apple" and recipe["negative_prompt"] == "green"
    assert recipe["seed"] == 42 and recipe["num_inference_steps"] == 3 and recipe["guidance_scale"] == 5.0
    assert (recipe["width"], recipe["height"]) == (48, 64) and recipe["scheduler"] == "euler_a"
    assert recipe["model"] == {"preset": "tiny", "seed": 0} and recipe["model_hash"] == tiny.weight_hash()
    assert "latentdiff_version" in recipe
    # the file holds what the Python API makes for the same request
    api = tiny("a red apple", negative_prompt="green", seed=42, num_inference_steps=3, guidance_scale=5,
               width=48, height=64, scheduler="euler_a").images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(target)), np.asarray(api))


def test_from_png_makes_the_same_pixels(capsys, tmp_path, tiny_dir):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert run(capsys, "generate", "a castle", "--model", str(tiny_dir), "--steps", "3", "--scheduler", "dpmpp_sde_karras",
               "-o", str(first), "--no-progress")[0] == 0  # fmt: skip
    assert run(capsys, "generate", "--from-png", str(first), "-o", str(again), "--no-progress")[0] == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert first.read_bytes() == again.read_bytes()  # the recipe too


def test_several_images_into_a_folder(capsys, tmp_path):
    code, out, _ = run(capsys, "generate", "x", "--preset", "tiny", "-n", "3", "--seed", "7", "--steps", "1",
                       "-o", str(tmp_path / "out"), "--no-progress")  # fmt: skip
    paths = out.split()
    assert code == 0 and [p.rsplit("/", 1)[1] for p in paths] == ["0000-7.png", "0001-8.png", "0002-9.png"]
    assert [read_recipe(p)["seed"] for p in paths] == [7, 8, 9]
    # a second run into the same folder numbers on and replaces nothing
    before = {p: Path(p).read_bytes() for p in paths}
    code, out, _ = run(capsys, "generate", "y", "--preset", "tiny", "--seed", "7", "--steps", "1",
                       "-o", str(tmp_path / "out"), "--no-progress")  # fmt: skip
    assert code == 0 and out.split()[0].endswith("/0003-7.png")
    assert all(Path(p).read_bytes() == data for p, data in before.items())


def test_info(capsys, tiny, tiny_dir):
    code, out, _ = run(capsys, "info", str(tiny_dir))
    assert code == 0 and tiny.weight_hash() in out and "UNet2DConditionModel" in out and "PNDMScheduler" in out
    assert f"{sum(p.numel() for p in tiny.unet.parameters()):,}" in out
    code, out, _ = run(capsys, "info", "--preset", "tiny", "--json")
    assert json.loads(out)["weight_hash"] == tiny.weight_hash()


def test_schedules_plot(capsys, tmp_path):
    code, out, _ = run(capsys, "schedules", "--plot", str(tmp_path / "s.png"), "--timesteps", "200")
    assert code == 0 and "cosine + zero-terminal-SNR" in out
    assert Image.open(tmp_path / "s.png").format == "PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--preset", "tiny", "--size", "100x64"], "width must be a positive multiple of 8"),
        (["generate", "x", "--preset", "tiny", "--steps", "0"], "num_inference_steps must be a whole number of at least 1"),
        (["generate", "x", "--preset", "tiny", "--cfg", "-1"], "guidance_scale must be a finite number at least 0"),
        (["generate", "x", "--preset", "tiny", "--scheduler", "nope"], "invalid choice: 'nope'.*euler_a"),
        (["generate", "x", "--model", "/nonexistent/model"], "/nonexistent/model does not exist"),
        (["generate", "--preset", "tiny"], "give a prompt"),
        (["generate", "--from-png", "/nonexistent.png"], "/nonexistent.png does not exist"),
        (["generate", "x", "--preset", "tiny", "--size", "big"], "size must look like 512x512"),
        (["info"], "give a model folder or --preset"),
        (["info", "/some/dir", "--preset", "tiny"], "not allowed with argument"),
        (["generate", "x", "--preset", "tiny", "--device", "bogus"], "'bogus' is not a torch device"),
        (["generate", "x", "--preset", "tiny", "--steps", "2000", "--scheduler", "ddim"], "cannot run 2000 steps"),
        (["generate", "x", "--preset", "tiny", "-o", "picture.jpg"], "images are saved as PNG"),
        (["schedules", "--plot", "curves.xyz"], "give a .png, .pdf or .svg file name"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentdiff: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]


def test_unreadable_png_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    for path, message in ((bad, "cannot read"), (plain, "no latentdiff recipe")):
        code, _, err = run(capsys, "generate", "--from-png", str(path))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_no_traceback_from_the_installed_command(tmp_path):
    """The real console script (or python -m latentdiff), in its own process: one line, exit code 2."""
    import shutil

    command = [shutil.which("latentdiff")] if shutil.which("latentdiff") else [sys.executable, "-m", "latentdiff"]
    proc = subprocess.run(
        [*command, "generate", "x", "--preset", "tiny", "--size", "60x64"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "latentdiff: error: width must be a positive multiple of 8, got 60 (try 56 or 64)"
    ]


def test_png_recipe_chunk_is_json(tmp_path, tiny):
    path = tiny("x", seed=1, num_inference_steps=1).save(tmp_path / "x.png")[0]
    assert json.loads(Image.open(path).text[PNG_KEY])["seed"] == 1


def test_from_png_uses_the_recipes_dtype(capsys, tmp_path):
    first, again = tmp_path / "bf.png", tmp_path / "bf-again.png"
    assert run(capsys, "generate", "a cat", "--preset", "tiny", "--dtype", "bfloat16", "--steps", "2",
               "-o", str(first), "--no-progress")[0] == 0  # fmt: skip
    assert read_recipe(first)["dtype"] == "bfloat16"
    assert run(capsys, "generate", "--from-png", str(first), "-o", str(again), "--no-progress")[0] == 0
    assert first.read_bytes() == again.read_bytes()
    # and in float32 it is a (slightly) different image: the dtype really was applied
    assert run(capsys, "generate", "--from-png", str(first), "--dtype", "float32", "-o", str(tmp_path / "f32.png"),
               "--no-progress")[0] == 0  # fmt: skip
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "f32.png")))


def test_corrupt_model_folder_is_one_line(capsys, tiny_dir, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    code, out, err = run(capsys, "generate", "x", "--model", str(model))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unet/diffusion_pytorch_model.safetensors" in err and "corrupt" in err


def test_unwritable_output_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = run(capsys, "generate", "x", "--preset", "tiny", "-o", str(tmp_path / "file" / "a.png"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("latentdiff: error: ")


def test_recipe_without_model_says_so(capsys, tmp_path):
    from latentdiff.generation.recipe import save_png

    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "r.png", {"prompt": "x", "seed": 1})
    code, _, err = run(capsys, "generate", "--from-png", str(path))
    assert code == 2 and "names no model; pass --model or --preset" in err


def test_from_png_of_a_batch_image_is_within_one_level_and_warns(capsys, tmp_path):
    code, out, _ = run(capsys, "generate", "a harbour", "--preset", "tiny", "-n", "4", "--seed", "20", "--steps", "3",
                       "--scheduler", "euler_a", "-o", str(tmp_path / "b.png"), "--no-progress")  # fmt: skip
    third = Path(out.split()[2])
    assert read_recipe(third)["batch_size"] == 4 and read_recipe(third)["seed"] == 22
    code, _, err = run(capsys, "generate", "--from-png", str(third), "-o", str(tmp_path / "again.png"), "--no-progress")
    assert code == 0 and "made in a batch of 4" in err
    a = np.asarray(Image.open(third), dtype=int)
    b = np.asarray(Image.open(tmp_path / "again.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_clip_skip_flag_round_trips(capsys, tmp_path):
    first, again = tmp_path / "c.png", tmp_path / "c-again.png"
    assert run(capsys, "generate", "a (misty:1.3) forest", "--preset", "tiny", "--clip-skip", "1", "--steps", "2",
               "-o", str(first), "--no-progress")[0] == 0  # fmt: skip
    assert read_recipe(first)["clip_skip"] == 1 and read_recipe(first)["prompt"] == "a (misty:1.3) forest"
    assert run(capsys, "generate", "--from-png", str(first), "-o", str(again), "--no-progress")[0] == 0
    assert first.read_bytes() == again.read_bytes()


def test_image_to_image_from_the_command_line(capsys, tmp_path):
    source, first, again = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "again.png"
    Image.fromarray((np.indices((40, 56)).sum(0) % 256).astype(np.uint8)).convert("RGB").save(source)
    assert run(capsys, "generate", "a mosaic", "--preset", "tiny", "--image", str(source), "--strength", "0.5",
               "--steps", "4", "-o", str(first), "--no-progress")[0] == 0  # fmt: skip
    recipe = read_recipe(first)
    assert recipe["strength"] == 0.5 and recipe["image"] == str(source.resolve())
    assert Image.open(first).size == (56, 40)
    assert run(capsys, "generate", "--from-png", str(first), "-o", str(again), "--no-progress")[0] == 0
    assert first.read_bytes() == again.read_bytes()
    Image.new("RGB", (56, 40), "red").save(source)  # the input changes: the remake says so
    code, _, err = run(capsys, "generate", "--from-png", str(first), "-o", str(tmp_path / "x.png"), "--no-progress")
    assert code == 0 and "has changed since" in err


def test_hires_flag(capsys, tmp_path):
    out = tmp_path / "big.png"
    assert run(capsys, "generate", "a city", "--preset", "tiny", "--hires", "2x", "--steps", "2", "--size", "32x32",
               "-o", str(out), "--no-progress")[0] == 0  # fmt: skip
    assert Image.open(out).size == (64, 64) and read_recipe(out)["hires_scale"] == 2.0
    code, _, err = run(capsys, "generate", "x", "--preset", "tiny", "--hires", "big")
    assert code == 2 and "--hires takes a factor such as 2x" in err


def test_inpainting_from_the_command_line(capsys, tmp_path):
    source, hole, out, again = (tmp_path / n for n in ("in.png", "mask.png", "out.png", "again.png"))
    Image.fromarray((np.indices((48, 64)).sum(0) % 256).astype(np.uint8)).convert("RGB").save(source)
    m = np.zeros((48, 64), np.uint8)
    m[10:30, 20:40] = 255
    Image.fromarray(m).save(hole)
    assert run(capsys, "generate", "a hole", "--preset", "tiny", "--image", str(source), "--mask", str(hole),
               "--steps", "3", "-o", str(out), "--no-progress")[0] == 0  # fmt: skip
    assert read_recipe(out)["mask_image"] == str(hole.resolve())
    assert run(capsys, "generate", "--from-png", str(out), "-o", str(again), "--no-progress")[0] == 0
    assert out.read_bytes() == again.read_bytes()
