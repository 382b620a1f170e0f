"""Training data, found and checked: captioned images from an imagefolder, loose files with .txt
captions, a ``datasets`` folder or a table file; every image decoded once, unreadable ones skipped
and listed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image, ImageOps

from ..errors import InvalidInputError, MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass
class DataConfig:
    # an imagefolder (metadata.jsonl/.csv), images with .txt captions, a save_to_disk folder or a table
    # file; or a list of those, trained on together
    path: Union[str, list[str]] = ""
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 512  # side of the square training size; buckets keep about this many pixels
    center_crop: bool = True  # false: random crop
    random_flip: bool = True
    buckets: bool = False  # aspect-ratio bucketing: every batch from one bucket
    bucket_step: int = 64  # bucket sides are multiples of this
    max_aspect: float = 2.0  # widest bucket is max_aspect:1
    caption_dropout: float = 0.1  # probability a caption becomes "" (teaches the unconditional prediction CFG needs)
    num_workers: int = 2
    max_samples: int = 0  # 0 = all
    # per data.path entry: how many times each of its images appears per epoch, e.g. [1, 4] to oversample
    # a small second set (kohya's folder repeats); [] = once each
    repeats: list[int] = field(default_factory=list)
    cache: bool = False  # pre-compute VAE latents (and text embeddings when the text encoder is frozen)
    cache_dir: str = ""  # "" = <output_dir>/cache


@dataclass
class Record:
    """One usable training image."""

    key: str  # where it came from: a relative path or "row N"
    size: tuple[int, int]  # (width, height) after EXIF orientation
    captions: list[str]
    digest: str  # SHA-256 of the image bytes: part of every cache key
    path: Optional[str] = None  # file on disk, or
    row: Optional[int] = None  # row of table ``Source.tables[table]``
    table: int = 0
    # ControlNet training: the conditioning image's file (an imagefolder's path column), or None where it is
    # an image cell of the same table row (read from there) or where the run has no conditioning column
    conditioning: str | None = None


@dataclass
class Source:
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    # (datasets.Dataset, its undecoded image column, its undecoded conditioning column or None)
    tables: list[tuple[Any, str, str | None]] = field(default_factory=list)

    def image_bytes(self, record: Record) -> bytes:
        if record.path is not None:
            return Path(record.path).read_bytes()
        table, column, _ = self.tables[record.table]
        return _cell_bytes(table[record.row][column])

    def image(self, record: Record) -> Image.Image:
        try:
            return decode_image(self.image_bytes(record))
        except Exception as e:  # noqa: BLE001 - checked at scan time, so the file changed under us
            raise InvalidInputError(f"training image {record.key} can no longer be read ({e}); restart the run") from None

    def conditioning_image(self, record: Record) -> Image.Image:
        """The ControlNet conditioning image of ``record`` (scanned with a conditioning column), read afresh:
        an edited file is what the next sample sees."""
        try:
            if record.conditioning is not None:
                return decode_image(Path(record.conditioning).read_bytes())
            table, _, column = self.tables[record.table]
            return decode_image(_cell_bytes(table[record.row][column]))
        except Exception as e:  # noqa: BLE001 - checked at scan time, so the file changed under us
            raise InvalidInputError(f"the conditioning image of {record.key} can no longer be read ({e}); "
                                    "restart the run") from None  # fmt: skip


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a truncated or corrupt file fails here, not half-way through a batch
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent areas become white
            im = Image.alpha_composite(canvas, im)
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Finding the data


def scan(config: DataConfig, progress: bool = True, conditioning: str | None = None) -> Source:
    """Open the data at ``config.path`` and decode every image once; unreadable ones are skipped and listed.

    ``conditioning``: the column of each row's ControlNet conditioning image (a path relative to an
    imagefolder, like ``file_name``, or an image column of a table); a row whose conditioning image is
    missing, unreadable or of another aspect ratio than its image is skipped too."""
    paths = config.path if isinstance(config.path, list) else [config.path]
    if not paths or not all(paths):
        raise InvalidInputError("data.path is empty: point it at a folder of captioned images or a dataset on disk")
    repeats = config.repeats or [1] * len(paths)
    if len(repeats) != len(paths) or any(r < 1 for r in repeats):
        raise InvalidInputError(f"data.repeats needs one whole number >= 1 per data.path entry ({len(paths)}), got {repeats}")
    merged = Source([])
    for path, times in zip(paths, repeats):
        part = _scan_one(path, config, progress, conditioning)
        for record in part.records:
            record.table += len(merged.tables)
        merged.records += part.records * times  # the same Record objects: one decode, one cache entry
        merged.skipped += part.skipped
        merged.tables += part.tables
    return merged


def _scan_one(path: str, config: DataConfig, progress: bool, conditioning: str | None) -> Source:
    root = Path(path).expanduser()
    if not root.exists():
        raise MissingFileError(f"training data {root} does not exist (data.path)")
    if _is_built_data_set(root):  # the folder `latentdiff data` wrote: train on its train/ split
        root = root / "train"
    table = _open_table(root, config, conditioning)
    if table is not None:
        return _scan_table(table, config, progress, str(root), conditioning)
    if conditioning:
        raise InvalidInputError(
            f"{root} holds images with .txt captions, which have no {conditioning!r} column "
            "(controlnet.conditioning_column): write a metadata.jsonl with file_name, text and "
            f"{conditioning} (the conditioning image's path) for each image"
        )
    return _scan_caption_files(root, config, progress)


def _is_built_data_set(root: Path) -> bool:
    """Whether ``root`` is a data set folder written by ``latentdiff data`` (dataset.json, train/, test/)
    rather than a folder of training images itself."""
    return (root.is_dir() and (root / "dataset.json").is_file() and not (root / "metadata.jsonl").is_file()
            and (root / "train" / "metadata.jsonl").is_file())  # fmt: skip


def _open_table(root: Path, config: DataConfig, conditioning: str | None = None):
    """A ``datasets.Dataset`` for every layout except loose images with .txt captions (None then)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if root.is_file():
            kind = TABLE_SUFFIXES.get(root.suffix.lower())
            if kind is None:
                raise InvalidInputError(f"{root}: data.path must be a folder, or a {', '.join(TABLE_SUFFIXES)} file")
            if kind in ("json", "csv"):
                return _metadata_table(root, root.parent, conditioning)
            return datasets.load_dataset(kind, data_files=str(root), split="train")
        if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise InvalidInputError(f"{root} holds splits {list(loaded)} but no 'train' split")
                loaded = loaded["train"]
            return loaded
        for name in ("metadata.jsonl", "metadata.csv"):
            if (root / name).is_file():
                return _metadata_table(root / name, root, conditioning)
    except (datasets.exceptions.DatasetGenerationError, FileNotFoundError, ValueError) as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"could not read the dataset at {root}: {e}") from None
    return None


def _metadata_table(meta: Path, root: Path, conditioning: str | None = None):
    """The imagefolder layout: ``metadata.jsonl`` / ``.csv`` rows with ``file_name`` plus caption columns
    (and a ``conditioning`` column of paths relative to the folder, like ``file_name``).

    Read here rather than through ``load_dataset("imagefolder")`` so a missing or corrupt file is one
    skipped row instead of a failed build, and nothing is copied into the datasets cache.
    """
    import datasets

    rows = []
    try:
        with open(meta, encoding="utf-8-sig", newline="") as f:
            if meta.suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise InvalidInputError(f"{meta} line {number} is not JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{meta} is not UTF-8 text") from None
    for row in rows:
        if "file_name" not in row:
            raise InvalidInputError(f"{meta}: every row needs a file_name column (got {sorted(row)})")
        row["__path__"] = str(root / row.pop("file_name"))
    if conditioning and any(conditioning in row for row in rows):
        for row in rows:  # (every row gets the column: from_list keeps only the first row's columns)
            value = row.get(conditioning)
            row[conditioning] = str(root / value) if isinstance(value, str) and value.strip() else None
    return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"__path__": []})


def _cell_bytes(cell) -> bytes:
    if isinstance(cell, str):
        return Path(cell).read_bytes()
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise ValueError(f"no image data in {type(cell).__name__}")


def _scan_table(table, config: DataConfig, progress: bool, name: str, conditioning: str | None = None) -> Source:
    import datasets

    image_col = "__path__" if "__path__" in table.column_names else config.image_column
    for column in (image_col, config.caption_column):
        if column not in table.column_names:
            raise InvalidInputError(
                f"the dataset has no column {column!r} (columns: {', '.join(table.column_names)}); "
                "set data.image_column / data.caption_column"
            )
    if conditioning and conditioning not in table.column_names:
        columns = ", ".join(c if c != "__path__" else "file_name" for c in table.column_names)
        raise InvalidInputError(
            f"{name} has no conditioning image column {conditioning!r} (columns: {columns}); "
            "set controlnet.conditioning_column"
        )
    for column in (image_col, conditioning):
        if column and isinstance(table.features[column], datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
    records, skipped = [], []
    limit = config.max_samples or len(table)
    for i in _progress(range(min(limit, len(table))), progress, "checking images"):
        row = table[i]
        key = row[image_col] if isinstance(row[image_col], str) else f"{name} row {i}"
        captions = _captions(row[config.caption_column])
        if captions is None:
            skipped.append((key, f"caption is not text: {row[config.caption_column]!r}"))
            continue
        try:
            data = _cell_bytes(row[image_col])
            size = decode_image(data).size
        except Exception as e:  # noqa: BLE001 - any image that cannot be read safely is skipped and counted
            skipped.append((key, _unreadable(e)))
            continue
        record = Record(key, size, captions, _digest(data), row=i)
        if conditioning:
            problem = _check_conditioning(row[conditioning], size, conditioning)
            if problem:
                skipped.append((key, problem))
                continue
            record.conditioning = row[conditioning] if isinstance(row[conditioning], str) else None
        records.append(record)
    return Source(records, skipped, [(table, image_col, conditioning or None)])


def _check_conditioning(cell, size: tuple[int, int], column: str) -> str | None:
    """Why the conditioning image in ``cell`` cannot serve an image of ``size``, or None if it can. It takes
    the image's resize and crop, so it must have the image's aspect ratio (any resolution)."""
    if cell is None or (isinstance(cell, dict) and not (cell.get("bytes") or cell.get("path"))):
        return f"no conditioning image (column {column!r} is empty)"
    try:
        width, height = decode_image(_cell_bytes(cell)).size
    except Exception as e:  # noqa: BLE001 - any image that cannot be read safely is skipped and counted
        return f"conditioning image: {_unreadable(e)}"
    if abs(math.log((width / height) / (size[0] / size[1]))) > 0.02:
        return (f"conditioning image is {width}x{height}, the image {size[0]}x{size[1]}: it must have the image's "
                "aspect ratio (it takes the same resize, crop and flip)")  # fmt: skip
    return None


def _scan_caption_files(root: Path, config: DataConfig, progress: bool) -> Source:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InvalidInputError(
            f"{root} has no metadata.jsonl / metadata.csv, no saved dataset and no images: "
            "see training/README.md for the layouts latentdiff reads"
        )
    if config.max_samples:
        images = images[: config.max_samples]
    records, skipped = [], []
    for path in _progress(images, progress, "checking images"):
        key = str(path.relative_to(root))
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            skipped.append((key, f"no caption file {text_file.name}"))
            continue
        try:
            data = path.read_bytes()
            size = decode_image(data).size
            captions = _captions(text_file.read_text(encoding="utf-8-sig").splitlines())
        except Exception as e:  # noqa: BLE001 - any image that cannot be read safely is skipped and counted
            skipped.append((key, _unreadable(e)))
            continue
        records.append(Record(key, size, captions or [""], _digest(data), path=str(path)))
    return Source(records, skipped)


def _unreadable(e: BaseException) -> str:
    """Why an image was skipped: PIL's refusal of a decompression bomb (more than twice
    ``Image.MAX_IMAGE_PIXELS``), a truncated or corrupt file, an unreadable caption, ..."""
    if isinstance(e, MemoryError):
        raise e  # not the image's fault
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _captions(value) -> Optional[list[str]]:
    """A caption cell as a list of alternatives: a string, or a list of strings (one picked per sample)."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        kept = [v.strip() for v in value if v.strip()]
        return kept or [""]
    return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _progress(items, enabled: bool, what: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, unit="img", leave=False)


def skipped_report(skipped: Sequence[tuple[str, str]], limit: int = 20) -> str:
    lines = [f"skipped {len(skipped)} unreadable image(s):"]
    lines += [f"  {key}: {reason}" for key, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all listed in skipped.jsonl)")
    return "\n".join(lines)
