"""Input images for image-to-image: read any common file, convert it to 8-bit RGB, say what was done."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Union

import numpy as np

from .errors import InvalidInputError, MissingFileError

ImageInput = Union[str, Path, "PIL.Image.Image"]  # noqa: F821


def load_image(source: ImageInput):
    """``source`` (a path or a PIL image) as an 8-bit RGB PIL image.

    16-bit greyscale is scaled to 8 bits, palette and greyscale images are expanded, and an alpha
    channel is dropped (composited on white) with a warning, so every input behaves the same.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InvalidInputError(f"cannot read {path} as an image ({type(e).__name__}); give a PNG, JPEG or WebP file") from None
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise InvalidInputError(f"image must be a file path or a PIL image, got {type(source).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        warnings.warn("the input image has transparency; it is composited on white", stacklevel=3)
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def image_hash(image) -> str:
    """First 16 hex digits of SHA-256 over an RGB image's size and pixels."""
    h = hashlib.sha256(f"{image.size}".encode())
    h.update(np.asarray(image.convert("RGB")).tobytes())
    return h.hexdigest()[:16]
