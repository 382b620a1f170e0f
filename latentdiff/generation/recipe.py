"""Image recipes: what is needed to make an image again, stored inside its PNG.

A PNG written by latentdiff carries one ``tEXt`` chunk, key ``latentdiff``, whose value is the
JSON of the image's ``params`` (prompt, negative prompt, seed, steps, guidance, scheduler, size,
model source and weight hash, library version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_write

PNG_KEY = "latentdiff"


def save_png(image, path: str | Path, params: dict[str, Any], *, exclusive: bool = False) -> Path:
    """Write ``image`` (PIL) to ``path`` atomically, with ``params`` as its recipe.

    With ``exclusive``, raise ``FileExistsError`` rather than replace an existing file.
    """
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(params, sort_keys=True))
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe stored in a PNG that latentdiff wrote."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; give a PNG that latentdiff wrote")
    try:
        with Image.open(path) as im:  # text chunks before the pixels are read without decoding
            if im.format != "PNG":
                raise InvalidInputError(f"{path} is a {im.format} image, not a PNG that latentdiff wrote")
            text = im.info.get(PNG_KEY)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InvalidInputError(f"cannot read {path} as a PNG ({e}); give a PNG that latentdiff wrote") from None
    if text is None:
        raise InvalidInputError(f"{path} has no latentdiff recipe; only PNGs written by latentdiff can be remade")
    try:
        recipe = json.loads(text)
    except ValueError:
        raise InvalidInputError(f"the recipe in {path} is not valid JSON; the file was edited or damaged") from None
    if not isinstance(recipe, dict) or "prompt" not in recipe or "seed" not in recipe:
        raise InvalidInputError(f"the recipe in {path} lacks a prompt or seed; the file was edited or damaged")
    return recipe
