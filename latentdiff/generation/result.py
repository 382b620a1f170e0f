"""What a call returns, and how its images are written: PNG files with their recipes, numbered so
that no earlier image is replaced."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import InvalidInputError
from ..fileio import remove_stale
from .recipe import save_png

_NUMBERED = re.compile(r"^(\d{4,})-\d+\.png$")  # NNNN-SEED.png


@dataclass
class GenerationResult:
    """What a pipeline call returns: one entry per image in each field."""

    images: Any  # list of PIL images, or a (B, 3, H, W) / (B, H, W, 3) array, or (B, C, h, w) latents
    seeds: list[int]
    params: list[dict[str, Any]]  # everything needed to make image i again: pipe(**call_kwargs(p))

    def save(self, target: Union[str, Path]) -> list[Path]:
        """Write the images as PNGs with their recipes and return the paths.

        ``target`` ending in ``.png`` names the file (``name-1.png``, ``name-2.png``, ... when there
        are several images). Anything else is a folder, created if needed, that gets ``NNNN-SEED.png``
        files numbered on from the highest number already there, so earlier images are never replaced.
        """
        if not isinstance(self.images, list):
            raise InvalidInputError("only output_type='pil' results can be saved as PNG files")
        target = prepare_output(target)
        if target.suffix.lower() == ".png":
            if len(self.images) == 1:
                return [save_png(self.images[0], target, self.params[0])]
            names = [target.with_name(f"{target.stem}-{i + 1}.png") for i in range(len(self.images))]
            return [save_png(im, name, p) for im, name, p in zip(self.images, names, self.params)]
        taken = [int(m.group(1)) for p in target.iterdir() if (m := _NUMBERED.match(p.name))]
        number = max(taken, default=-1) + 1
        paths = []
        for image, seed, params in zip(self.images, self.seeds, self.params):
            while True:  # claim the next free number; another process may be saving here too
                try:
                    paths.append(save_png(image, target / f"{number:04d}-{seed}.png", params, exclusive=True))
                    break
                except FileExistsError:
                    number += 1
            number += 1
        return paths


def prepare_output(target: Union[str, Path]) -> Path:
    """Check an output target (``FILE.png`` or a folder) and create the folder it needs; remove the
    hidden temporary PNGs that runs killed between writing and renaming left there.

    Called before generating, so a bad target fails in a second, not after the images are made.
    """
    target = Path(target)
    if target.suffix.lower() == ".png":
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent, ".png")  # what a run killed mid-write left
        return target
    if target.suffix and not target.is_dir():
        raise InvalidInputError(
            f"cannot write {target}: images are saved as PNG (the recipe lives in a PNG text chunk); "
            "give a .png file name or a folder"
        )
    target.mkdir(parents=True, exist_ok=True)
    remove_stale(target, ".png")
    return target
