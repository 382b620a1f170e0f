"""Prompts files: rows read and checked, and the images they ask for (items) with their seeds.

A row's values are checked with the pipeline call's own rules (``generation.request``) before any
model is loaded; a row that cannot be read or checked becomes an error record and the run goes on
without it. Image *i* of a row gets the row's ``seed`` + *i*, else 64 bits of SHA-256 of (base
seed, row id, *i*): it depends on nothing but the row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..checks import Limits, whole_number
from ..errors import InvalidInputError, MissingFileError

_EXTRA = "\0extra"  # csv.DictReader's key for fields beyond the header

MAX_IMAGES_PER_ROW = 10_000  # a row's images are made over many calls; each call is bounded by the pipeline's Limits
ROW_KEYS = ("prompt", "negative_prompt", "seed", "n", "steps", "guidance", "width", "height", "scheduler", "id",
            "control_image")  # fmt: skip


@dataclass(frozen=True)
class Defaults:
    """Values for the columns a row leaves out (the CLI options)."""

    negative_prompt: str = ""
    n: int = 1
    steps: int = 50
    guidance: float = 7.5
    width: Optional[int] = None  # None: the model's own size
    height: Optional[int] = None
    scheduler: Optional[str] = None  # None: the model's own scheduler
    control_image: tuple[str, ...] = ()  # one per ControlNet, for rows without their own (absolute paths)


@dataclass(frozen=True)
class Row:
    id: str
    line: int  # line number in the prompts file, for error reports
    prompt: str
    negative_prompt: str
    seed: Optional[int]
    n: int
    steps: int
    guidance: float
    width: Optional[int]
    height: Optional[int]
    scheduler: Optional[str]
    control_image: tuple[str, ...] = ()  # the control image of each ControlNet, in order (absolute paths)


@dataclass(frozen=True)
class Item:
    """One image to make: image ``index`` of ``row``."""

    row: Row
    index: int
    seed: int

    @property
    def file(self) -> str:
        return f"{file_stem(self.row.id)}-{self.index}.png"

    def request(self) -> dict[str, Any]:
        """The pipeline arguments shared with the other images it may be batched with."""
        r = self.row
        return {
            "num_inference_steps": r.steps,
            "guidance_scale": r.guidance,
            "width": r.width,
            "height": r.height,
            "scheduler": r.scheduler,
        }


@dataclass
class RowError:
    id: Optional[str]
    line: int
    reason: str


# ---------------------------------------------------------------------------------------------
# reading prompts files


def read_rows(path: Path, defaults: Defaults, limits: Optional[Limits] = None,
              controls: int = 0) -> tuple[list[Row], list[RowError]]:  # fmt: skip
    """Rows of a .txt / .jsonl / .csv prompts file (UTF-8, with or without a BOM), and the rows
    that could not be read (bad values, ids taken by an earlier row, ids whose file names would
    be an earlier row's, control images that are missing or not one per ControlNet; ``controls``
    ControlNets are loaded). A row's ``control_image`` is a file, relative to the prompts file's
    folder, or in .jsonl a list of files, one per ControlNet."""
    limits = limits or Limits()
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InvalidInputError(f"prompts file {path}: use .txt (a prompt a line), .jsonl or .csv")
    try:
        raw = _read_raw(path, suffix)
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    rows, errors = [], []
    seen: dict[str, tuple[int, Any]] = {}  # row id -> (line, the id as written)
    files: dict[str, tuple[int, str]] = {}  # file stem, lower case (case-insensitive file systems) -> (line, id)
    for line_no, obj in raw:
        if isinstance(obj, str):
            errors.append(RowError(None, line_no, obj))
            continue
        own_id = obj.get("id")
        row_id = str(line_no if own_id is None else own_id)
        try:
            if own_id is not None and (isinstance(own_id, bool) or not isinstance(own_id, (str, int))):
                raise InvalidInputError(f"id must be a string or a whole number, got {own_id!r}")
            which = "its own id" if own_id is not None else "its line number, as no id is given"
            if row_id in seen:
                line, written = seen[row_id]
                same = "" if written == (own_id if own_id is not None else line) else f" (ids are compared as text: {written!r} there)"
                raise InvalidInputError(f"id {row_id!r} ({which}) is taken by the row on line {line}{same}; ids must be unique")
            stem = file_stem(row_id).lower()
            if stem in files:  # distinct ids whose files would be the same (not expected: the stems are unique)
                line, other = files[stem]
                raise InvalidInputError(f"id {row_id!r} would write the same files as id {other!r} on line {line}; "
                                        "change one of the ids")  # fmt: skip
            row = _row(obj, row_id, line_no, defaults, from_text=suffix == ".csv", limits=limits)
            row = _with_control_images(row, obj.get("control_image"), path.parent, defaults, controls)
        except InvalidInputError as e:
            errors.append(RowError(row_id, line_no, str(e)))
            continue
        seen[row_id] = (line_no, own_id if own_id is not None else line_no)
        files[stem] = (line_no, row_id)
        rows.append(row)
    return rows, errors


def _read_raw(path: Path, suffix: str) -> list[tuple[int, Any]]:
    """(line number, dict of the row's values, or the reason it cannot be read) per row."""
    raw: list[tuple[int, Any]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drop a BOM (Excel, Notepad)
        if suffix == ".txt":
            for line_no, line in enumerate(f, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    raw.append((line_no, {"prompt": text}))
        elif suffix == ".jsonl":
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raw.append((line_no, f"not valid JSON: {e}"))
                    continue
                if isinstance(obj, dict):  # an explicit null means "not given"
                    raw.append((line_no, {k: v for k, v in obj.items() if v is not None}))
                else:
                    raw.append((line_no, "a line must be a JSON object"))
        else:
            reader = csv.DictReader(f, restkey=_EXTRA)
            columns = reader.fieldnames or []
            unknown = [c for c in columns if c not in ROW_KEYS]
            if unknown or "prompt" not in columns:
                raise InvalidInputError(
                    f"{path}: the header must name a 'prompt' column and only these: {', '.join(ROW_KEYS)}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )
            for record in reader:
                if _EXTRA in record:  # more fields than the header names: a comma inside an unquoted prompt?
                    extra = record[_EXTRA]
                    raw.append((reader.line_num, f"{len(columns) + len(extra)} fields but the header names {len(columns)} "
                                                 f"(extra: {', '.join(map(repr, extra))}); put a prompt with commas in \"quotes\""))
                    continue
                raw.append((reader.line_num, {k: v for k, v in record.items() if k and v not in (None, "")}))
    return raw


def _row(obj: dict, row_id: str, line: int, defaults: Defaults, from_text: bool, limits: Limits) -> Row:
    from ..generation.request import check_prompt_text

    unknown = sorted(set(obj) - set(ROW_KEYS))
    if unknown:
        raise InvalidInputError(f"unknown key {unknown[0]!r}; rows may have: {', '.join(ROW_KEYS)}")
    if not isinstance(obj.get("prompt"), str):
        raise InvalidInputError("missing prompt (a string)")

    def number(key: str, kind: type, default):
        if key not in obj:
            return default
        value = obj[key]
        if from_text:  # csv cells are strings
            try:
                value = kind(value)
            except ValueError:
                raise InvalidInputError(f"{key} must be a {'whole number' if kind is int else 'number'}, got {value!r}") from None
        if kind is int and whole_number(value) is None:
            raise InvalidInputError(f"{key} must be a whole number, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidInputError(f"{key} must be a number, got {value!r}")
        return kind(value)

    negative = obj.get("negative_prompt", defaults.negative_prompt)
    scheduler = obj.get("scheduler", defaults.scheduler)
    if not isinstance(negative, str) or not (scheduler is None or isinstance(scheduler, str)):
        raise InvalidInputError("negative_prompt and scheduler must be strings")
    check_prompt_text(obj["prompt"], "prompt", limits)
    check_prompt_text(negative, "negative_prompt", limits)
    row = Row(
        id=row_id,
        line=line,
        prompt=obj["prompt"],
        negative_prompt=negative,
        seed=number("seed", int, None),
        n=number("n", int, defaults.n),
        steps=number("steps", int, defaults.steps),
        guidance=number("guidance", float, defaults.guidance),
        width=number("width", int, defaults.width),
        height=number("height", int, defaults.height),
        scheduler=scheduler,
    )
    check_values(row.n, row.steps, row.guidance, row.width, row.height, row.scheduler, row.seed, limits=limits)
    return row


def _with_control_images(row: Row, value, base: Path, defaults: Defaults, controls: int) -> Row:
    """``row`` with its control images (its own, relative to ``base``, else the defaults), checked."""
    from dataclasses import replace

    if value is None:
        files = defaults.control_image
    else:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            raise InvalidInputError(f"control_image must be a file name or a list of them, got {value!r}")
        files = tuple(str((base / Path(v).expanduser()).resolve()) for v in items)
    if files and not controls:
        raise InvalidInputError("control_image needs a ControlNet: run with --controlnet PATH")
    if controls and len(files) != controls:
        raise InvalidInputError(f"{controls} ControlNet(s) are loaded: give control_image with one file per ControlNet "
                                f"(or --control-image), got {len(files)}")  # fmt: skip
    for file in files:
        if not Path(file).is_file():
            raise InvalidInputError(f"control_image {file} does not exist")
    return replace(row, control_image=files)


def check_values(n, steps, guidance, width, height, scheduler, seed=None, limits: Optional[Limits] = None) -> None:
    """The checks a row (or the CLI defaults) must pass before any model is loaded: the pipeline
    call's own rules (``generation.request``) and ``limits`` under the row's column names, plus the
    most one row may ask for."""
    from ..generation import request as rules

    limits = limits or Limits()
    if rules.check_count(n, "n") > MAX_IMAGES_PER_ROW:
        raise InvalidInputError(f"n must be at most {MAX_IMAGES_PER_ROW} images per row, got {n}")
    rules.check_steps(steps, "steps", limits)
    rules.check_guidance(guidance, "guidance")
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            rules.check_side(value, name, 1)  # (the model's multiple is checked at the call)
    # (a side left to the model is counted as 8 pixels here; the call checks the real size again)
    w, h = width or 8, height or 8
    if w * h > limits.pixels:
        raise limits.exceeded("pixels", f"{width or 'default'}x{height or 'default'} (at least {w * h:,} pixels)")
    if scheduler is not None:
        rules.check_scheduler(scheduler)
    if seed is not None:
        rules.expand_seeds(seed, n)  # seed, seed + 1, ..., seed + n - 1 must all be seeds


# ---------------------------------------------------------------------------------------------
# rows -> images, with seeds that depend on nothing but the row


def image_seed(row: Row, index: int, base_seed: int) -> int:
    """The row's own seed + index, else 64 bits of SHA-256 of (base seed, row id, index)."""
    if row.seed is not None:
        return row.seed + index
    digest = hashlib.sha256(f"{base_seed}/{row.id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def expand(rows: Iterable[Row], base_seed: int) -> list[Item]:
    return [Item(row, i, image_seed(row, i, base_seed)) for row in rows for i in range(row.n)]


_HASHED = re.compile(r"_[0-9a-f]{8}$")  # what file_stem appends


def file_stem(row_id: str) -> str:
    """A file-name-safe form of a row id (ids from the user may hold any character), distinct for
    distinct ids, also on case-insensitive file systems.

    An id that is safe as it is stays as it is; any other (changed characters, capitals, more than
    80 characters, or an ending that looks like the hash suffix) gets ``_`` + 8 hex digits of its
    SHA-256. So a plain stem never ends like a hashed one, and ``"x y"`` and ``"x_y_887fcea6"``
    (which is ``"x y"``'s hashed stem) get different files.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row_id)[:80]
    if safe != row_id or row_id != row_id.lower() or _HASHED.search(row_id):
        safe += "_" + hashlib.sha256(row_id.encode()).hexdigest()[:8]
    return safe
