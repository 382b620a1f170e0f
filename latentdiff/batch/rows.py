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

from ..checks import whole_number
from ..errors import InvalidInputError, MissingFileError

MAX_IMAGES_PER_ROW, MAX_STEPS, MAX_SIDE = 10_000, 10_000, 16_384
ROW_KEYS = ("prompt", "negative_prompt", "seed", "n", "steps", "guidance", "width", "height", "scheduler", "id")


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


@dataclass(frozen=True)
class Item:
    """One image to make: image ``index`` of ``row``."""

    row: Row
    index: int
    seed: int

    @property
    def file(self) -> str:
        return f"{_safe(self.row.id)}-{self.index}.png"

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


def read_rows(path: Path, defaults: Defaults) -> tuple[list[Row], list[RowError]]:
    """Rows of a .txt / .jsonl / .csv prompts file (UTF-8, with or without a BOM), and the rows
    that could not be read."""
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
    rows, errors, seen = [], [], set()
    for line_no, obj in raw:
        if isinstance(obj, str):
            errors.append(RowError(None, line_no, obj))
            continue
        own_id = obj.get("id")
        row_id = str(line_no if own_id is None else own_id)
        try:
            if own_id is not None and (isinstance(own_id, bool) or not isinstance(own_id, (str, int))):
                raise InvalidInputError(f"id must be a string or a whole number, got {own_id!r}")
            if row_id in seen:
                which = "its own id" if own_id is not None else "its line number, as no id is given"
                raise InvalidInputError(f"id {row_id!r} ({which}) is taken by an earlier row; ids must be unique")
            row = _row(obj, row_id, line_no, defaults, from_text=suffix == ".csv")
        except InvalidInputError as e:
            errors.append(RowError(row_id, line_no, str(e)))
            continue
        seen.add(row_id)
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
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            unknown = [c for c in columns if c not in ROW_KEYS]
            if unknown or "prompt" not in columns:
                raise InvalidInputError(
                    f"{path}: the header must name a 'prompt' column and only these: {', '.join(ROW_KEYS)}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )
            for record in reader:
                raw.append((reader.line_num, {k: v for k, v in record.items() if k and v not in (None, "")}))
    return raw


def _row(obj: dict, row_id: str, line: int, defaults: Defaults, from_text: bool) -> Row:
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
    check_values(row.n, row.steps, row.guidance, row.width, row.height, row.scheduler, row.seed)
    return row


def check_values(n, steps, guidance, width, height, scheduler, seed=None) -> None:
    """The checks a row (or the CLI defaults) must pass before any model is loaded: the pipeline
    call's own rules (``generation.request``) under the row's column names, plus the most one row
    may ask for."""
    from ..generation import request as rules

    if rules.check_count(n, "n") > MAX_IMAGES_PER_ROW:
        raise InvalidInputError(f"n must be at most {MAX_IMAGES_PER_ROW} images per row, got {n}")
    if rules.check_steps(steps, "steps") > MAX_STEPS:
        raise InvalidInputError(f"steps must be at most {MAX_STEPS}, got {steps}")
    rules.check_guidance(guidance, "guidance")
    for name, value in (("width", width), ("height", height)):
        if value is not None and rules.check_side(value, name, 8) > MAX_SIDE:
            raise InvalidInputError(f"{name} must be at most {MAX_SIDE}, got {value}")
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


def _safe(row_id: str) -> str:
    """A file-name-safe form of a row id (ids from the user may hold any character)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row_id)[:80]
    # keep distinct ids distinct, also on case-insensitive file systems ("A" and "a")
    if safe != row_id or row_id != row_id.lower():
        safe += "_" + hashlib.sha256(row_id.encode()).hexdigest()[:8]
    return safe
