"""A1111 infotext: our PNGs carry a ``parameters`` chunk that A1111's rules read, and
``latentdiff generate --from-png`` remakes a PNG that carries only A1111 infotext.

The reader below is written from A1111's documented format ("PNG Info": the prompt lines, a
``Negative prompt:`` line, then one line of ``Key: value`` pairs; that last line counts only if it
holds at least three pairs; values with a comma, colon or newline are JSON strings; ``Size: WxH``),
independently of latentdiff's parser.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latentdiff.cli import main
from latentdiff.generation.infotext import format_infotext, parse_infotext
from latentdiff.generation.recipe import read_recipe
from latentdiff.generation.samplers import SAMPLERS, from_a1111, to_a1111


def a1111_read(text: str) -> dict[str, str]:
    """A1111's documented rules, by hand: a character scanner for the parameter line."""

    def pairs(line: str) -> list[tuple[str, str]]:
        out, i = [], 0
        while i < len(line):
            colon = line.find(":", i)
            if colon < 0:
                break
            key = line[i:colon].strip()
            j = colon + 1
            while j < len(line) and line[j] == " ":
                j += 1
            if j < len(line) and line[j] == '"':  # a JSON string, up to its closing quote
                k = j + 1
                while line[k] != '"':
                    k += 2 if line[k] == "\\" else 1
                value, end = json.loads(line[j : k + 1]), line.find(",", k + 1)
            else:
                end = line.find(",", j)
                value = line[j : end if end >= 0 else len(line)].strip()
            if not key or not (key[0].isalnum() or key[0] == "_"):
                return []
            out.append((key, value))
            i = end + 1 if end >= 0 else len(line)
        return out

    lines = text.strip().split("\n")
    found = pairs(lines[-1])
    if len(found) >= 3:
        lines = lines[:-1]
    else:
        found = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :]
        (negative if in_negative else prompt).append(line.strip())
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in found:
        if key == "Size":
            fields["Size-1"], fields["Size-2"] = value.split("x")
        else:
            fields[key] = value
    return fields


A1111_EXAMPLE = (  # the example in A1111's own documentation of the format, with small numbers
    "girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)\n"
    "Negative prompt: ugly, fat, (((deformed))), [blurry], bad anatomy\n"
    "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 965400086, Size: 32x48, Model hash: 45dee52b, "
    "Face restoration: CodeFormer, ENSD: 31337"
)


def test_the_documented_example_reads_the_same_both_ways():
    ours, theirs = parse_infotext(A1111_EXAMPLE), a1111_read(A1111_EXAMPLE)
    assert ours == theirs
    assert theirs["Negative prompt"] == "ugly, fat, (((deformed))), [blurry], bad anatomy"
    assert theirs["Sampler"] == "DPM++ 2M Karras" and theirs["Size-1"] == "32" and theirs["Size-2"] == "48"


def test_a_short_last_line_is_part_of_the_prompt():
    text = "a cat\nSteps: 20, Sampler: Euler"  # two pairs: not a parameter line
    assert parse_infotext(text) == a1111_read(text) == {"Prompt": "a cat\nSteps: 20, Sampler: Euler", "Negative prompt": ""}


def test_values_with_commas_and_colons_are_json_strings():
    params = {"prompt": "line one,\nline: two", "negative_prompt": "", "num_inference_steps": 4, "scheduler": "euler_a",
              "guidance_scale": 7.5, "seed": 3, "width": 64, "height": 32, "model_hash": "0123456789abcdef",
              "model": {"path": "/models/my, model: v2"}, "clip_skip": 1}  # fmt: skip
    text = format_infotext(params)
    assert 'Model: "my, model: v2"' in text and "Negative prompt" not in text
    fields = a1111_read(text)
    assert fields["Prompt"] == "line one,\nline: two" and fields["Model"] == "my, model: v2"
    assert fields["Steps"] == "4" and fields["Sampler"] == "Euler a" and fields["CFG scale"] == "7.5"
    assert fields["Clip skip"] == "2"  # A1111 counts the last layer as 1
    assert parse_infotext(text) == fields


def test_our_pngs_carry_infotext_that_a1111_rules_read(tiny, tmp_path):
    result = tiny("a red, round apple: shiny", negative_prompt="blurry, dark", seed=9, num_inference_steps=2,
                  guidance_scale=5, height=32, width=48, scheduler="dpmpp_2m_karras")  # fmt: skip
    (path,) = result.save(tmp_path / "apple.png")
    with Image.open(path) as image:
        fields = a1111_read(image.info["parameters"])
    assert fields["Prompt"] == "a red, round apple: shiny" and fields["Negative prompt"] == "blurry, dark"
    assert fields["Steps"] == "2" and fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"
    assert fields["CFG scale"] == "5" and fields["Seed"] == "9" and (fields["Size-1"], fields["Size-2"]) == ("48", "32")
    assert fields["Model hash"] == tiny.weight_hash()[:10] and fields["Model"] == "preset-tiny"
    assert read_recipe(path)["seed"] == 9  # the recipe is still there


def only_infotext(source, target) -> None:
    """Copy a PNG's pixels and its A1111 infotext, without our recipe (as another tool would)."""
    with Image.open(source) as image:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", image.info["parameters"])
        image.save(target, pnginfo=info)


def test_from_png_remakes_a_png_that_carries_only_infotext(tiny, tmp_path, capsys):
    original = tmp_path / "ours.png"
    assert main(["generate", "a blue square", "--negative", "red", "--preset", "tiny", "--seed", "77", "--steps",
                 "3", "--cfg", "6", "--size", "32x40", "--scheduler", "dpmpp_2m_karras", "--clip-skip", "1",
                 "--no-progress", "-o", str(original)]) == 0  # fmt: skip
    foreign = tmp_path / "foreign.png"
    only_infotext(original, foreign)
    again = tmp_path / "again.png"
    capsys.readouterr()
    assert main(["generate", "--from-png", str(foreign), "--preset", "tiny", "--no-progress", "-o", str(again)]) == 0
    err = capsys.readouterr().err
    assert "A1111 infotext" in err
    recipe = read_recipe(again)
    assert (recipe["prompt"], recipe["negative_prompt"], recipe["seed"]) == ("a blue square", "red", 77)
    assert recipe["scheduler"] == "dpmpp_2m_karras" and recipe["clip_skip"] == 1 and recipe["guidance_scale"] == 6
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(original)))


def test_from_png_maps_a1111_names_and_says_what_it_cannot_map(tmp_path, capsys):
    foreign = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_EXAMPLE)
    Image.new("RGB", (32, 48)).save(foreign, pnginfo=info)
    out = tmp_path / "out.png"
    assert main(["generate", "--from-png", str(foreign), "--preset", "tiny", "--no-progress", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Face restoration: CodeFormer" in err and "ENSD: 31337" in err and "not mapped" in err
    assert "45dee52b" in err  # the model it was made with is named
    recipe = read_recipe(out)
    assert recipe["scheduler"] == "dpmpp_2m_karras" and recipe["seed"] == 965400086
    assert (recipe["width"], recipe["height"], recipe["num_inference_steps"]) == (32, 48, 3)
    assert recipe["prompt"].startswith("girl with an artist's beret") and recipe["negative_prompt"].startswith("ugly")


def test_a_sampler_without_equivalent_is_an_error_unless_one_is_chosen(tmp_path, capsys):
    foreign = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_EXAMPLE.replace("DPM++ 2M Karras", "DPM++ SDE Karras"))
    Image.new("RGB", (32, 48)).save(foreign, pnginfo=info)
    assert main(["generate", "--from-png", str(foreign), "--preset", "tiny", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "'DPM++ SDE Karras' has no latentdiff equivalent" in err and "--scheduler" in err
    assert main(["generate", "--from-png", str(foreign), "--preset", "tiny", "--scheduler", "euler", "--no-progress",
                 "-o", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert read_recipe(tmp_path / "x.png")["scheduler"] == "euler"


def test_a_png_without_recipe_or_infotext_is_refused(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png"), "--preset", "tiny"]) == 2
    assert "no latentdiff recipe and no A1111 infotext" in capsys.readouterr().err


@pytest.mark.parametrize("a1111, schedule, ours", [
    ("Euler a", None, "euler_a"), ("Euler", "Automatic", "euler"), ("DPM++ 2M", None, "dpmpp_2m_karras"),
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("DPM++ 2M SDE Karras", None, "dpmpp_sde_karras"),
    ("k_dpmpp_2m_ka", None, "dpmpp_2m_karras"), ("PLMS", None, "pndm"), ("DDIM", None, "ddim"),
    ("UniPC", None, "unipc"), ("LMS", None, "lms"), ("Heun", None, "heun"), ("LCM", None, "lcm"),
    ("dpmpp_2m", None, "dpmpp_2m"),
])  # fmt: skip
def test_a1111_sampler_names_map_to_ours(a1111, schedule, ours):
    assert from_a1111(a1111, schedule) == ours


def test_every_sampler_of_ours_has_an_a1111_name_that_maps_back():
    for name in SAMPLERS:
        assert from_a1111(*to_a1111(name)) == name
    assert to_a1111(None, "PNDMScheduler") == ("PLMS", "Automatic")
