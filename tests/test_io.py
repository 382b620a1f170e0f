"""Model folders: save -> diffusers loads it -> same image; damaged folders are named precisely."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from latentdiff import InvalidInputError, LatentDiffusion, MissingFileError

KW = dict(num_inference_steps=3, height=64, width=56, scheduler="euler_a", output_type="np")


def test_saved_folder_loads_back_identical(tiny, tiny_dir):
    loaded = LatentDiffusion.from_pretrained(tiny_dir)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.weight_hash() == tiny.weight_hash()
    assert loaded.scheduler_config == tiny.scheduler_config
    assert loaded.source == {"path": str(tiny_dir.resolve())}


def test_diffusers_loads_our_folder_and_makes_the_same_image(tiny, reference):
    from diffusers import EulerAncestralDiscreteScheduler

    ours = tiny("a blue bird", seed=[5], **KW).images
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(tiny.scheduler_config)
    theirs = reference("a blue bird", num_inference_steps=3, height=64, width=56,
                       generator=[torch.Generator("cpu").manual_seed(5)], output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_we_load_a_folder_diffusers_wrote(tiny, reference, tmp_path):
    reference.save_pretrained(tmp_path / "by_diffusers")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "by_diffusers")
    # The model's own scheduler: diffusers writes every default into scheduler_config.json
    # (e.g. timestep_spacing="leading"), so *other* samplers built from that file legitimately
    # differ from ones built from the original, sparser file.
    kw = {**KW, "scheduler": None}
    np.testing.assert_allclose(loaded("x", seed=[2], **kw).images, tiny("x", seed=[2], **kw).images, atol=1e-6)


def test_weights_only_in_safetensors(tiny_dir):
    files = {p.name for p in tiny_dir.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in files and "model.safetensors" in files
    assert not any(f.endswith((".bin", ".ckpt", ".pt")) for f in files)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_dir / "tokenizer").iterdir()}


def test_save_over_an_earlier_model_replaces_it(tiny, tmp_path):
    target = tmp_path / "m"
    tiny.save_pretrained(target)
    (target / "stale.txt").write_text("old")
    tiny.save_pretrained(target)
    assert not (target / "stale.txt").exists() and (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # an ordinary folder, not mkdtemp's 0700
    # and ordinary files: diffusers' save_pretrained writes its weights through a 0600 temporary file
    for file in target.rglob("*"):
        expected = 0o777 & ~_umask() if file.is_dir() else 0o666 & ~_umask()
        assert file.stat().st_mode & 0o777 == expected, file


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_refuses_a_folder_that_is_not_a_model(tiny, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "precious.jpg").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="not a model folder.*new or empty folder"):
        tiny.save_pretrained(tmp_path / "photos")
    assert (tmp_path / "photos" / "precious.jpg").read_bytes() == b"x"
    (tmp_path / "empty").mkdir()
    tiny.save_pretrained(tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model_index.json").is_file()


def test_weight_hash_follows_in_place_changes(tiny_dir):
    pipe = LatentDiffusion.from_pretrained(tiny_dir)
    before = pipe.weight_hash()
    weight = next(pipe.unet.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # in place, as an optimizer step would
    assert pipe.weight_hash() != before
    with torch.no_grad():
        weight.copy_(saved)
    assert pipe.weight_hash() == before


def test_to_dtype_and_back(tiny_dir):
    pipe = LatentDiffusion.from_pretrained(tiny_dir)
    h32 = pipe.weight_hash()
    pipe.to(dtype=torch.float64)
    assert pipe.dtype == torch.float64 and pipe.text_encoder.dtype == torch.float64
    assert pipe.weight_hash() != h32
    assert pipe("x", seed=1, num_inference_steps=2, output_type="latent").images.dtype == torch.float64
    pipe.to("cpu", torch.float32)
    assert pipe.weight_hash() == h32


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "unet/diffusion_pytorch_model.safetensors"),
        (lambda d: (d / "vae" / "config.json").unlink(), "vae/config.json"),
        (lambda d: (d / "model_index.json").unlink(), "model_index.json"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("{not json"), "scheduler_config.json"),
        (lambda d: shutil.rmtree(d / "text_encoder"), "text_encoder/config.json"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "AutoencoderKL"}'),
         "scheduler_config.json does not describe a usable scheduler"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").write_text(
            '{"_class_name": "DDIMScheduler", "beta_schedule": "bogus"}'), "scheduler_config.json"),
        (lambda d: (d / "tokenizer" / "tokenizer.json").unlink() or (d / "tokenizer" / "merges.txt").unlink(),
         "tokenizer/merges.txt"),
    ],
)
def test_missing_or_unreadable_part_is_named(tiny_dir, tmp_path, damage, named):
    model = copy_model(tiny_dir, tmp_path / "m")
    damage(model)
    with pytest.raises((MissingFileError, InvalidInputError), match=named.replace(".", r"\.")):
        LatentDiffusion.from_pretrained(model)


def test_corrupt_weights_are_named(tiny_dir, tmp_path):
    model = copy_model(tiny_dir, tmp_path / "m")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(InvalidInputError, match=r"vae/diffusion_pytorch_model\.safetensors.*corrupt"):
        LatentDiffusion.from_pretrained(model)


def test_missing_folder_says_what_to_give(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist.*model_index.json"):
        LatentDiffusion.from_pretrained(tmp_path / "nowhere")


def test_a_build_without_the_default_model_says_what_to_give(tmp_path, monkeypatch):
    import latentdiff.generation.pipeline

    monkeypatch.setattr(latentdiff.generation.pipeline, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(MissingFileError, match="--preset tiny"):
        LatentDiffusion.from_pretrained()


def test_scheduler_config_is_saved_as_the_model_had_it(tiny, tiny_dir):
    assert json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text()) == tiny.scheduler_config


def test_a_half_precision_folder_loads_in_diffusers_with_default_arguments(tiny, tmp_path, no_network):
    """Stored in float16 (half the size), loaded by diffusers without torch_dtype: every part float32,
    and the first call runs on the CPU (it failed with "Half and Float" when the text encoder's config
    said float16). The same folder through `latentdiff convert --dtype float16` and save_pretrained."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from latentdiff.cli import main

    half = LatentDiffusion.from_preset("tiny").to(dtype=torch.float16)
    folders = [half.save_pretrained(tmp_path / "saved")]
    assert main(["convert", str(folders[0]), str(tmp_path / "converted"), "--dtype", "float16"]) == 0
    folders.append(tmp_path / "converted")
    for folder in folders:
        for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
            with safe_open(str(folder / weights), "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # the files stay small
        theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        theirs.set_progress_bar_config(disable=True)
        assert {m.dtype for m in (theirs.unet, theirs.vae, theirs.text_encoder)} == {torch.float32}
        ours = LatentDiffusion.from_pretrained(folder)
        a = ours("a cat", seed=3, num_inference_steps=2, output_type="np").images
        b = theirs("a cat", generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np").images
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


# -- what a crash leaves ------------------------------------------------------------------------------


def _dying_command(tmp_path, when: str, nth: int = 1):
    """A latentdiff command line that SIGKILLs itself instead of the ``nth`` rename (os.replace or
    os.link) whose target ends with ``when``."""
    import sys

    script = tmp_path / "die.py"
    script.write_text(
        "import os, signal, sys\n"
        "seen = []\n"
        "def dying(real):\n"
        "    def rename(src, dst, *a, **k):\n"
        f"        if str(dst).endswith({when!r}):\n"
        "            seen.append(dst)\n"
        f"            if len(seen) == {nth}:\n"
        "                os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return real(src, dst, *a, **k)\n"
        "    return rename\n"
        "os.replace, os.link = dying(os.replace), dying(os.link)\n"
        "from latentdiff.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return [sys.executable, str(script)]


def test_a_generate_killed_before_its_rename_leaves_nothing_for_long(tmp_path):
    import os
    import subprocess

    from latentdiff.cli import main

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*_dying_command(tmp_path, ".png"), "generate", "x", "--preset", "tiny", "--steps", "1", "--seed", "7",
                           "-o", str(out), "--no-progress"], env=env, capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".0000-7.png.") and left[0].endswith(".tmp")  # the hidden half-way PNG
    (out / ".other.png.ffffffff-1-abc.tmp").write_bytes(b"another machine's, being written")  # not ours to judge
    assert main(["generate", "x", "--preset", "tiny", "--steps", "1", "--seed", "7", "-o", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".other.png.ffffffff-1-abc.tmp", "0000-7.png"]


def test_a_convert_killed_between_its_renames_is_finished_by_the_next_run(tiny_dir, tmp_path):
    import os
    import subprocess

    from latentdiff.cli import main

    target = tmp_path / "model"
    assert main(["convert", str(tiny_dir), str(target)]) == 0  # an existing folder, to be replaced
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the 1st rename onto .../model moves the old folder aside, the 2nd moves the new one in: die instead of it
    proc = subprocess.run([*_dying_command(tmp_path, "/model", nth=2), "convert", str(tiny_dir), str(target)], env=env,
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9
    assert not target.exists()  # killed between moving the old folder aside and moving the new one in
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.name.startswith(".model.")) == [".new", ".old"]
    loaded = LatentDiffusion.from_pretrained(target)  # the next run finds the finished folder in place
    assert loaded.weight_hash() == LatentDiffusion.from_pretrained(tiny_dir).weight_hash()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert main(["convert", str(tiny_dir), str(target)]) == 0 and (target / "model_index.json").is_file()


def test_write_errors_name_the_target_not_the_temporary_file(tmp_path, capsys, monkeypatch):
    import errno

    from PIL import Image

    from latentdiff.cli import main

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    target = tmp_path / "picture.png"
    code = main(["generate", "x", "--preset", "tiny", "--steps", "1", "-o", str(target), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"latentdiff: error: {target}: No space left on device"]
    assert list(tmp_path.iterdir()) == []  # and the temporary file is gone
