"""Pictures in and out: input images for image-to-image (read, convert to 8-bit RGB, hash) and grids."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InvalidInputError, MissingFileError

ImageInput = Union[str, Path, "PIL.Image.Image"]  # noqa: F821


def load_image(source: ImageInput, *, mask: bool = False, max_pixels: Optional[int] = None):
    """``source`` (a path or a PIL image) as an 8-bit RGB PIL image, upright (EXIF orientation).

    16-bit greyscale is scaled to 8 bits, palette and greyscale images are expanded, and an alpha
    channel is composited away with a warning: on white for pictures, on black for masks (so that
    strokes painted on a transparent layer are what gets repainted). A picture of more than
    ``max_pixels`` pixels is refused before it is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    what = "mask" if mask else "image"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"{what} {path} does not exist")
        try:
            with Image.open(path) as im:
                _check_pixels(im, max_pixels, f"{what} {path}")
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, InvalidInputError):
                raise
            raise InvalidInputError(f"cannot read {path} as an image ({type(e).__name__}); give a PNG, JPEG or WebP file") from None
    elif isinstance(source, Image.Image):
        image = source
        _check_pixels(image, max_pixels, f"the {what}")
    else:
        raise InvalidInputError(f"{what} must be a file path or a PIL image, got {type(source).__name__}")
    image = ImageOps.exif_transpose(image)
    if image.width < 8 or image.height < 8:
        raise InvalidInputError(f"the {'mask' if mask else 'image'} is {image.width}x{image.height}; it must be at least 8x8")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16- or 32-bit greyscale: scale to 8 bits
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if image.mode.startswith("I;16") or values.max() > 255 else 255
        image = Image.fromarray((values.clip(0, top) * 255 // top).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = (0, 0, 0, 255) if mask else (255, 255, 255, 255)
        warnings.warn(
            f"the {'mask' if mask else 'input image'} has transparency; it is composited on "
            f"{'black (transparent = keep)' if mask else 'white'}",
            stacklevel=3,
        )
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)
    return image.convert("RGB")


def _check_pixels(image, max_pixels: Optional[int], what: str) -> None:
    if max_pixels is not None and image.width * image.height > max_pixels:
        from ..checks import Limits

        raise Limits(input_pixels=max_pixels).exceeded(
            "input_pixels", f"{what} of {image.width}x{image.height} ({image.width * image.height:,} pixels)",
            "scale the picture down first",
        )


def image_hash(image) -> str:
    """First 16 hex digits of SHA-256 over an RGB image's size and pixels (or a latent tensor's
    shape and float32 values)."""
    if hasattr(image, "detach"):  # latents handed from another call
        values = image.detach().float().cpu().contiguous()
        h = hashlib.sha256(f"{tuple(values.shape)}".encode())
        h.update(values.numpy().tobytes())
        return h.hexdigest()[:16]
    h = hashlib.sha256(f"{image.size}".encode())
    h.update(np.asarray(image.convert("RGB")).tobytes())
    return h.hexdigest()[:16]


def load_inputs(image, num_prompts: int, what: str = "image", max_pixels: Optional[int] = None):
    """Image-to-image inputs as RGB PIL images, and their paths (None where not a file); each of at
    most ``max_pixels`` pixels."""
    if image is None:
        return None, None
    sources = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(sources) not in (1, num_prompts):
        raise InvalidInputError(
            f"got {len(sources)} {what}s for {num_prompts} prompts; give one {what}, or one per prompt"
        )
    names = [str(Path(s).resolve()) if isinstance(s, (str, Path)) else None for s in sources]
    loaded = [load_image(s, mask=what == "mask_image", max_pixels=max_pixels) for s in sources]
    if len({im.size for im in loaded}) > 1:
        warnings.warn(f"the {what}s differ in size; all are resized to the output size", stacklevel=3)
    return loaded, names


def grid(images, columns: int, *, row_labels=None, column_labels=None, title: Optional[str] = None, scale: int = 1):
    """Equal-sized images (PIL or uint8 (H, W, 3) arrays) pasted row by row into one PIL image.

    With ``row_labels`` (one text per row, e.g. its prompt; long ones wrap), ``column_labels`` (one
    per column, e.g. its seed) and ``title``, the sheet gets a label column on the left and a header
    band on top, so a grid says what it shows; without them it is the bare grid. ``scale`` enlarges
    every image by a whole factor (nearest neighbour, so 64-pixel images stay sharp on a page).
    """
    from PIL import Image, ImageDraw, ImageFont

    images = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    if not images or columns < 1 or scale < 1:
        raise InvalidInputError("grid needs at least one image, at least one column and a scale of at least 1")
    rows = -(-len(images) // columns)
    columns = min(columns, len(images))
    for labels, count, what in ((row_labels, rows, "row"), (column_labels, columns, "column")):
        if labels is not None and len(labels) != count:
            raise InvalidInputError(f"grid has {count} {what}s but {len(labels)} {what} labels")
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    font = ImageFont.load_default(size=max(11, min(18, h // 5)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    texts = [_wrap(probe, font, str(t), 320, max(1, h // line)) for t in (row_labels or [])]
    widest = max((int(probe.textlength(x, font=font)) for lines in texts for x in lines), default=0)
    left = widest + 12 if texts else 0
    top = line + 6 if (column_labels or title) else 0
    sheet = Image.new("RGB", (left + columns * w, top + rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        if scale > 1:
            image = image.resize((w, h), Image.Resampling.NEAREST)
        sheet.paste(image, (left + (i % columns) * w, top + (i // columns) * h))
    if title:
        draw.text((6, top // 2), title, fill=(0, 0, 0), font=font, anchor="lm")
    for c, text in enumerate(column_labels or []):
        draw.text((left + c * w + w // 2, top // 2), _fit(probe, font, str(text), w - 4), fill=(0, 0, 0), font=font, anchor="mm")
    for r, lines in enumerate(texts):
        first = top + r * h + (h - line * len(lines)) // 2  # the row's lines centred on its images
        for k, text in enumerate(lines):
            draw.text((6, first + k * line), text, fill=(0, 0, 0), font=font)
    return sheet


def _wrap(draw, font, text: str, width: int, max_lines: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` pixels, at most ``max_lines`` of them (the last cut with ...)."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, font, word, width))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, font, lines[-1] + " ...", width)
    return lines


def _fit(draw, font, text: str, width: int) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text
