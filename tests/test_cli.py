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
        (["generate", "x", "--preset", "tiny", "--cfg", "-1"], "guidance_scale must be a finite number between 0.0 and 100.0"),
        (["generate", "x", "--preset", "tiny", "--scheduler", "nope"], "invalid choice: 'nope'.*euler_a"),
        (["generate", "x", "--model", "/nonexistent/model"], "/nonexistent/model does not exist"),
        (["generate", "--preset", "tiny"], "give a prompt"),
        (["generate", "--from-png", "/nonexistent.png"], "/nonexistent.png does not exist"),
        (["generate", "x", "--preset", "tiny", "--size", "big"], "size must look like 512x512"),
        (["info", "/some/dir", "--preset", "tiny"], "not allowed with argument"),
        (["generate", "x", "--preset", "tiny", "--device", "bogus"], "'bogus' is not a torch device"),
        (["generate", "x", "--preset", "tiny", "--steps", "1000", "--scheduler", "ddim"], "cannot run 1000 steps"),
        (["generate", "x", "--preset", "tiny", "--steps", "2000"], "num_inference_steps 2000 is above the limit steps=1000.*--limit steps=N"),
        (["generate", "x", "--preset", "tiny", "--device", "meta"], "--device meta: the meta device holds shapes, not values"),
        (["generate", "x", "--preset", "tiny", "--limit", "speed=3"], "--limit takes NAME=VALUE with NAME one of pixels, steps"),
        (["generate", "x", "--preset", "tiny", "--threads", "0"], "--threads must be at least 1"),
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


def _no_loading(monkeypatch):
    """Make loading any model fail loudly: what must be refused before the load never gets there."""
    from latentdiff import LatentDiffusion

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("from_pretrained", "from_preset", "from_single_file"):
        monkeypatch.setattr(LatentDiffusion, name, refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "num_inference_steps must be a whole number of at least 1"),
        (["--cfg", "-3"], "guidance_scale must be a finite number between 0.0 and 100.0"),
        (["--cfg", "1e30"], "guidance_scale must be a finite number between 0.0 and 100.0"),
        (["--eta", "1.5", "--scheduler", "ddim"], "eta must be a finite number between 0.0 and 1.0"),
        (["--size", "30x32"], "width must be a positive multiple of 4, got 30"),  # the default model's VAE: 4 pixels a cell
        (["--size", "16384x16384"], "16384x16384 .* is above the limit pixels"),
        (["--size", "100000x100000"], "is above the limit pixels"),
        (["--steps", "100000"], "above the limit steps=1000"),
        (["--steps", "1000000000"], "above the limit steps=1000"),
        (["-n", "100000"], "100000 images in one call is above the limit images=64"),
        (["--hires", "8", "--size", "512x512"], "the hires result 4096x4096 .* is above the limit pixels"),
        (["--preset", "tiny", "--preset-seed", str(2**70)], "--preset-seed must be a whole number from 0 to 2\\*\\*64-1"),
        (["--preset", "tiny", "--size", "100x64"], "width must be a positive multiple of 8, got 100"),
        (["--strength", "0.5"], "strength applies to image-to-image only"),
    ],
)
def test_arguments_are_checked_before_the_model_loads(capsys, monkeypatch, tmp_path, argv, message):
    import re

    _no_loading(monkeypatch)
    code, out, err = run(capsys, "generate", "x", *argv, "-o", str(tmp_path / "x.png"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), lines
    assert not (tmp_path / "x.png").exists()


def test_tampered_recipes_are_one_line_before_the_model_loads(capsys, monkeypatch, tmp_path):
    from latentdiff.generation.recipe import save_png

    base = {"prompt": "x", "seed": 1, "model": {"preset": "tiny", "seed": 0}, "num_inference_steps": 2}
    cases = [
        ({"seed": "one"}, "seed must be an int or a list of ints, got str"),
        ({"num_inference_steps": [3]}, "num_inference_steps must be a whole number of at least 1, got \\[3\\]"),
        ({"num_inference_steps": 10**9}, "above the limit steps"),
        ({"height": 100000, "width": 100000}, "above the limit pixels"),
        ({"hires_scale": 8.0, "height": 512, "width": 512}, "the hires result 4096x4096"),
        ({"guidance_scale": "high"}, "guidance_scale must be a finite number"),
        ({"prompt": 5}, "prompt must be a string or a list of strings"),
        ({"model": {"path": 5}}, "a model path that is not text"),
        ({"model": "tiny"}, "a model entry that is not an object"),
        ({"loras": "abc"}, "a loras entry that is not a list"),
        ({"dtype": ["float16"]}, "a dtype that is not text"),
        ({"batch_size": "4"}, "a batch_size that is not a whole number"),
        ({"scheduler": 3}, "scheduler must be a name"),
        ({"image": 5, "strength": 0.5}, "image must be a file path or a PIL image, got int"),
    ]
    _no_loading(monkeypatch)
    import re

    for change, message in cases:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "r.png", {**base, **change})
        code, _, err = run(capsys, "generate", "--from-png", str(path), "-o", str(tmp_path / "out.png"))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), (change, lines)


def test_more_one_line_errors(capsys, tmp_path):
    text = tmp_path / "x.ckpt"
    text.write_text("this is a text file, not a checkpoint\n")
    for argv, message in [
        (["generate", "x", "--model", str(text)], "x.ckpt is not a readable PyTorch checkpoint"),
        (["generate", "a \udcff prompt", "--preset", "tiny"], "prompt is not valid text: invalid UTF-8"),
        (["generate", "x", "--preset", "tiny", "--negative", "\ud800"], "negative_prompt is not valid text"),
    ]:
        code, out, err = run(capsys, *argv, "-o", str(tmp_path / "o.png"))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_info_without_a_model_describes_the_default_model(capsys):
    from latentdiff.generation.pipeline import DEFAULT_MODEL_DIR

    code, out, _ = run(capsys, "info", "--json")
    assert code == 0 and json.loads(out)["source"] == {"path": str(DEFAULT_MODEL_DIR.resolve())}


def test_other_libraries_are_quiet_unless_verbose(tmp_path):
    """The real command in its own process: without --verbose stderr holds nothing of transformers'
    (its "Loading weights" bar, its warnings); --verbose brings them back."""
    import os
    import shutil

    command = [shutil.which("latentdiff")] if shutil.which("latentdiff") else [sys.executable, "-m", "latentdiff"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    runs = {}
    for flag in ([], ["--verbose"]):
        proc = subprocess.run([*command, "generate", "red apple", "--steps", "1", "--seed", "1", "--no-progress",
                               "-o", str(tmp_path / f"a{len(flag)}.png"), *flag],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[bool(flag)] = proc.stderr
    assert runs[False].strip() == "", runs[False]
    assert "Loading weights" in runs[True]


def test_threads_default_to_the_free_cores(monkeypatch):
    import os

    import torch

    from latentdiff.commands import free_cores, set_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert free_cores() == 1  # 4 cores, about 3 busy
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert free_cores() == 1  # never fewer than one
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    assert free_cores() == 4
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads(None, "cpu")
        assert torch.get_num_threads() == 4
        set_threads(2, "cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        set_threads(None, "cpu")  # the user's own setting is left to torch
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_api_shows_progress_as_tqdm_would(tiny, capsys):
    kw = {"num_inference_steps": 2, "output_type": "latent", "seed": 1}
    tiny("x", **kw)  # stderr is not a terminal here, as in a notebook
    assert "denoising" in capsys.readouterr().err
    tiny("x", progress=False, **kw)
    assert "denoising" not in capsys.readouterr().err


def test_eval_shows_progress_unless_told_not_to(capsys, monkeypatch, tmp_path):
    import latentdiff.evaluate

    seen = []

    def capture(config):
        seen.append(config.progress)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(latentdiff.evaluate, "evaluate", capture)
    for extra in ([], ["--no-progress"]):
        assert run(capsys, "eval", "--data", str(tmp_path), *extra)[0] == 130
    assert seen == [True, False]
