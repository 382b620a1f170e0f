"""Built-in training data sets: ``latentdiff data NAME OUT_DIR``.

Every builder writes the ``datasets`` imagefolder layout, so
``datasets.load_dataset("imagefolder", data_dir=OUT_DIR)`` reads it with no loading script::

    OUT_DIR/
      train/metadata.jsonl   one JSON object a line: file_name, text (the caption), attributes
      train/000000.png ...
      test/metadata.jsonl    held-out examples, where the builder has them (shapes: combinations
      test/000000.png ...    of attributes that never occur in train/)
      dataset.json           builder name, options, counts, source and licence (read by ``latentdiff eval``)
      README.md              the same for people: where the images come from, their licence, the command
      LICENSE                licence / attribution of the images

The folder appears complete or not at all (written beside OUT_DIR, then renamed).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ...errors import InvalidInputError, LatentDiffusionError
from ...fileio import atomic_dir

DATASET_FILE = "dataset.json"
METADATA = "metadata.jsonl"


class MissingPackageError(LatentDiffusionError, ImportError):
    """A builder needs an optional package that is not installed."""


def require(module: str, package: str):
    """Import ``module`` or fail with one line saying how to install ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(
            f"this data set needs the Python package {package!r}; install it with "
            f"pip install {package} (or pip install 'latentdiff[data]')"
        ) from None


@dataclass(frozen=True)
class Example:
    """One image and its row in metadata.jsonl (``text`` plus any extra columns)."""

    image: Any  # PIL.Image, RGB
    text: str
    columns: dict[str, Any] = field(default_factory=dict)
    # column -> a second image of the row (a ControlNet's conditioning image): saved beside the
    # image as NNNNNN_<column>.png, and the column holds that file name
    images: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetCard:
    """What dataset.json and README.md say about a built data set."""

    builder: str
    options: dict[str, Any]
    source: str
    licence: str
    licence_text: str
    notes: str = ""


def write_dataset(
    out_dir: str | Path,
    card: DatasetCard,
    splits: dict[str, Iterable[Example]],
    *,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``splits`` (name -> examples) in the imagefolder layout; returns the count per split."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} is a file; give a folder to write the data set into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InvalidInputError(
                f"{out} is not empty; choose a new folder, or pass --overwrite to replace a data set"
            )
        if not (out / DATASET_FILE).is_file():
            raise InvalidInputError(f"{out} holds something other than a latentdiff data set; it is not replaced")
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for split, examples in splits.items():
            folder = tmp / split
            folder.mkdir()
            n = 0
            with open(folder / METADATA, "w", encoding="utf-8") as meta:
                for n, ex in enumerate(examples, 1):
                    name = f"{n - 1:06d}.png"
                    ex.image.save(folder / name, optimize=False)
                    extra = {}
                    for column, image in ex.images.items():
                        extra[column] = f"{n - 1:06d}_{column}.png"
                        image.save(folder / extra[column], optimize=False)
                    row = {"file_name": name, "text": ex.text, **ex.columns, **extra}
                    meta.write(json.dumps(row, ensure_ascii=False) + "\n")
            if n == 0:
                raise InvalidInputError(f"the {card.builder} builder produced no {split} images; check its options")
            counts[split] = n
        info = {**asdict(card), "counts": counts}
        del info["licence_text"]
        (tmp / DATASET_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "LICENSE").write_text(card.licence_text.strip() + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(card, counts), encoding="utf-8")
    return counts


def _readme(card: DatasetCard, counts: dict[str, int]) -> str:
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in card.options.items() if v is not None)
    splits = "\n".join(f"- `{name}/`: {n} images, captions in `{name}/{METADATA}`" for name, n in counts.items())
    return (
        f"# latentdiff data set: {card.builder}\n\n"
        f"Made by `latentdiff data {card.builder} OUT_DIR {options}`.\n\n"
        f"{splits}\n\n"
        f'Read it with `datasets.load_dataset("imagefolder", data_dir=...)`.\n\n'
        f"## Source\n\n{card.source}\n\n## Licence\n\n{card.licence} (see LICENSE).\n"
        + (f"\n## Notes\n\n{card.notes}\n" if card.notes else "")
    )


def read_dataset_info(data_dir: str | Path) -> dict[str, Any]:
    """dataset.json of a folder made by ``latentdiff data``."""
    from ...errors import MissingFileError

    path = Path(data_dir) / DATASET_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; make the data set with 'latentdiff data NAME {data_dir}'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{path} is not valid JSON; make the data set again with 'latentdiff data'") from None


def read_split(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The rows of ``split/metadata.jsonl`` with ``path`` (the image file) added; [] if there is no such split."""
    folder = Path(data_dir) / split
    if not (folder / METADATA).is_file():
        return []
    rows = []
    for line in (folder / METADATA).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({**row, "path": folder / row["file_name"]})
    return rows


def builders() -> dict[str, Callable[..., dict[str, int]]]:
    """Builder name -> ``build(out_dir, **options)``."""
    from . import emojis, shapes

    return {"emoji": emojis.build, "shapes": shapes.build}


def build(name: str, out_dir: str | Path, *, overwrite: bool = False, **options: Optional[Any]) -> dict[str, int]:
    """Build data set ``name`` into ``out_dir``; options left as None take the builder's defaults."""
    table = builders()
    if name not in table:
        raise InvalidInputError(f"unknown data set {name!r}; choose one of: {', '.join(table)}")
    return table[name](out_dir, overwrite=overwrite, **{k: v for k, v in options.items() if v is not None})


__all__ = [
    "DATASET_FILE",
    "DatasetCard",
    "Example",
    "MissingPackageError",
    "build",
    "builders",
    "read_dataset_info",
    "read_split",
    "require",
    "write_dataset",
]
