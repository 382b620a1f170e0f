"""Training data, found and checked: captioned images from an imagefolder, loose files with .txt
captions, a ``datasets`` folder or a table file; every image decoded once, unreadable ones skipped
and listed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
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


@dataclass
class Source:
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    tables: list[tuple[Any, str]] = field(default_factory=list)  # (datasets.Dataset, its undecoded image column)

    def image_bytes(self, record: Record) -> bytes:
        if record.path is not None:
            return Path(record.path).read_bytes()
        table, column = self.tables[record.table]
        return _cell_bytes(table[record.row][column])

    def image(self, record: Record) -> Image.Image:
        try:
            return decode_image(self.image_bytes(record))
        except Exception as e:  # noqa: BLE001 - checked at scan time, so the file changed under us
            raise InvalidInputError(f"training image {record.key} can no longer be read ({e}); restart the run") from None


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


def scan(config: DataConfig, progress: bool = True) -> Source:
    """Open the data at ``config.path`` and decode every image once; unreadable ones are skipped and listed."""
    paths = config.path if isinstance(config.path, list) else [config.path]
    if not paths or not all(paths):
        raise InvalidInputError("data.path is empty: point it at a folder of captioned images or a dataset on disk")
    repeats = config.repeats or [1] * len(paths)
    if len(repeats) != len(paths) or any(r < 1 for r in repeats):
        raise InvalidInputError(f"data.repeats needs one whole number >= 1 per data.path entry ({len(paths)}), got {repeats}")
    merged = Source([])
    for path, times in zip(paths, repeats):
        part = _scan_one(path, config, progress)
        for record in part.records:
            record.table += len(merged.tables)
        merged.records += part.records * times  # the same Record objects: one decode, one cache entry
        merged.skipped += part.skipped
        merged.tables += part.tables
    return merged


def _scan_one(path: str, config: DataConfig, progress: bool) -> Source:
    root = Path(path).expanduser()
    if not root.exists():
        raise MissingFileError(f"training data {root} does not exist (data.path)")
    if _is_built_data_set(root):  # the folder `latentdiff data` wrote: train on its train/ split
        root = root / "train"
    table = _open_table(root, config)
    if table is not None:
        return _scan_table(table, config, progress, str(root))
    return _scan_caption_files(root, config, progress)


def _is_built_data_set(root: Path) -> bool:
    """Whether ``root`` is a data set folder written by ``latentdiff data`` (dataset.json, train/, test/)
    rather than a folder of training images itself."""
    return (root.is_dir() and (root / "dataset.json").is_file() and not (root / "metadata.jsonl").is_file()
            and (root / "train" / "metadata.jsonl").is_file())  # fmt: skip


def _open_table(root: Path, config: DataConfig):
    """A ``datasets.Dataset`` for every layout except loose images with .txt captions (None then)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if root.is_file():
            kind = TABLE_SUFFIXES.get(root.suffix.lower())
            if kind is None:
                raise InvalidInputError(f"{root}: data.path must be a folder, or a {', '.join(TABLE_SUFFIXES)} file")
            if kind in ("json", "csv"):
                return _metadata_table(root, root.parent)
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
                return _metadata_table(root / name, root)
    except (datasets.exceptions.DatasetGenerationError, FileNotFoundError, ValueError) as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"could not read the dataset at {root}: {e}") from None
    return None


def _metadata_table(meta: Path, root: Path):
    """The imagefolder layout: ``metadata.jsonl`` / ``.csv`` rows with ``file_name`` plus caption columns.

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


def _scan_table(table, config: DataConfig, progress: bool, name: str) -> Source:
    import datasets

    image_col = "__path__" if "__path__" in table.column_names else config.image_column
    for column in (image_col, config.caption_column):
        if column not in table.column_names:
            raise InvalidInputError(
                f"the dataset has no column {column!r} (columns: {', '.join(table.column_names)}); "
                "set data.image_column / data.caption_column"
            )
    if isinstance(table.features[image_col], datasets.Image):
        table = table.cast_column(image_col, datasets.Image(decode=False))
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
        records.append(Record(key, size, captions, _digest(data), row=i))
    return Source(records, skipped, [(table, image_col)])


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
