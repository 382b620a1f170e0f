"""Scripted batch inference: a prompts file in, a folder of PNGs plus a manifest out.

One code path for ``latentdiff batch`` and ``accelerate launch inference/batch.py``:

1. read the prompts file (.txt / .jsonl / .csv) into rows; rows that cannot be read become
   errors, and the run goes on without them;
2. expand rows into images (*items*), each with a seed that depends only on the row (its own
   ``seed`` + image index, else a hash of the base seed, the row id and the index), so the images
   are the same whatever the batch size, the number of processes or which process makes them;
3. split the items across processes (item k goes to rank k mod world size), skip those whose PNG
   already exists (resume), batch compatible requests and generate;
4. write each PNG atomically (temporary name, then rename) and only then append its manifest line,
   so a run killed at any moment leaves no truncated PNG and no manifest line without its file;
5. merge the per-process manifest and error parts into ``manifest.jsonl`` / ``errors.jsonl``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import InvalidInputError, LatentDiffusionError, MissingFileError
from .fileio import atomic_write
from .validation import MAX_SEED, whole_number

ROW_KEYS = ("prompt", "negative_prompt", "seed", "n", "steps", "guidance", "width", "height", "scheduler", "id")
RUN_FILE, MANIFEST, ERRORS = "run.json", "manifest.jsonl", "errors.jsonl"


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


@dataclass
class BatchConfig:
    prompts: Path
    out: Path
    model: Optional[str] = None
    preset: Optional[str] = None
    preset_seed: int = 0
    batch_size: int = 4
    base_seed: int = 0
    device: Optional[str] = None
    dtype: str = "float32"
    overwrite: bool = False
    progress: bool = True
    defaults: Defaults = field(default_factory=Defaults)


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
# 1. reading prompts files


def read_rows(path: Path, defaults: Defaults) -> tuple[list[Row], list[RowError]]:
    """Rows of a .txt / .jsonl / .csv prompts file, and the rows that could not be read."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InvalidInputError(f"prompts file {path}: use .txt (a prompt a line), .jsonl or .csv")
    raw: list[tuple[int, Any]] = []  # (line number, dict or error text)
    with open(path, encoding="utf-8", newline="") as f:
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
                raw.append((line_no, obj if isinstance(obj, dict) else "a line must be a JSON object"))
        else:
            reader = csv.DictReader(f)
            unknown = [c for c in reader.fieldnames or [] if c not in ROW_KEYS]
            if unknown or "prompt" not in (reader.fieldnames or []):
                raise InvalidInputError(
                    f"{path}: the header must name a 'prompt' column and only these: {', '.join(ROW_KEYS)}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )
            for record in reader:
                raw.append((reader.line_num, {k: v for k, v in record.items() if v not in (None, "")}))
    rows, errors, seen = [], [], set()
    for line_no, obj in raw:
        if isinstance(obj, str):
            errors.append(RowError(None, line_no, obj))
            continue
        row_id = str(obj.get("id", line_no))
        try:
            if row_id in seen:
                raise InvalidInputError(f"id {row_id!r} is used by an earlier row; ids must be unique")
            row = _row(obj, row_id, line_no, defaults, from_text=suffix == ".csv")
        except InvalidInputError as e:
            errors.append(RowError(row_id, line_no, str(e)))
            continue
        seen.add(row_id)
        rows.append(row)
    return rows, errors


def _row(obj: dict, row_id: str, line: int, defaults: Defaults, from_text: bool) -> Row:
    unknown = sorted(set(obj) - set(ROW_KEYS))
    if unknown:
        raise InvalidInputError(f"unknown key {unknown[0]!r}; rows may have: {', '.join(ROW_KEYS)}")
    if not isinstance(obj.get("prompt"), str):
        raise InvalidInputError("missing prompt (a string)")

    def number(key: str, kind: type, default):
        value = obj.get(key, default)
        if value is None or value is default:
            return value
        if from_text:  # csv cells are strings
            try:
                value = kind(value)
            except ValueError:
                raise InvalidInputError(f"{key} must be a {kind.__name__}, got {value!r}") from None
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
    if row.n < 1:
        raise InvalidInputError(f"n must be at least 1, got {row.n}")
    if row.seed is not None and not 0 <= row.seed <= MAX_SEED - (row.n - 1):
        raise InvalidInputError(f"seed must be from 0 to 2**64-{row.n}, got {row.seed}")
    return row


# ---------------------------------------------------------------------------------------------
# 2. rows -> images, with seeds that depend on nothing but the row


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
    if safe != row_id:  # keep distinct ids distinct
        safe += "_" + hashlib.sha256(row_id.encode()).hexdigest()[:8]
    return safe


# ---------------------------------------------------------------------------------------------
# 3.-5. running


def run_batch(config: BatchConfig) -> int:
    """Make every image of the prompts file that the output folder does not hold yet.

    Returns the exit code: 0 when every row was made, 1 when any row failed (see errors.jsonl).
    Runs under ``accelerate launch`` / ``torchrun`` as it does alone.
    """
    import torch
    from accelerate import PartialState

    from .pipeline import LatentDiffusion

    if whole_number(config.batch_size) is None or config.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {config.batch_size}")
    rows, parse_errors = read_rows(config.prompts, config.defaults)
    if not rows and not parse_errors:
        raise InvalidInputError(f"prompts file {config.prompts} holds no prompts")

    state = PartialState(cpu=(config.device or "").startswith("cpu") or not torch.cuda.is_available())
    device = config.device or str(state.device)
    out = Path(config.out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    pipe = (
        LatentDiffusion.from_preset(config.preset, seed=config.preset_seed)
        if config.preset
        else LatentDiffusion.from_pretrained(config.model)
    ).to(device, getattr(torch, config.dtype))
    run_info = {
        "model": pipe.source,
        "model_hash": pipe.weight_hash(),
        "dtype": config.dtype,
        "base_seed": config.base_seed,
        "defaults": asdict(config.defaults),
    }
    conflict = None
    if state.is_main_process:
        conflict = _claim_folder(out, run_info, config.overwrite)
    state.wait_for_everyone()
    if conflict is None and not state.is_main_process:
        conflict = _check_run_file(out, run_info)
    if conflict:
        raise InvalidInputError(conflict)

    items = expand(rows, config.base_seed)
    rank, world = state.process_index, state.num_processes
    mine = items[rank::world]
    part = out / f"manifest.part-{rank}.jsonl"
    # Every process checks every finished image, so all of them reach the same verdict (an error
    # raised by one process alone would leave the others waiting at the next barrier).
    unlisted, conflicts = _check_finished(out, [it for it in items if (out / it.file).exists()], pipe.default_size)
    if conflicts and not config.overwrite:
        raise InvalidInputError(
            f"{out / conflicts[0].file} was not made from what row {conflicts[0].row.id!r} asks for now; "
            "use another --out folder, or --overwrite to replace it"
        )
    own = {id(it) for it in mine}
    for item in conflicts:
        if id(item) in own:
            (out / item.file).unlink(missing_ok=True)
    for item, recipe in unlisted:
        if id(item) in own:
            _append(part, _manifest_line(item, recipe, None))
    pending = [it for it in mine if not (out / it.file).exists()]
    errors = [asdict(e) for e in parse_errors] if state.is_main_process else []

    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), unit="img", desc="images", disable=not (config.progress and state.is_main_process))
    for key, group in groupby(sorted(pending, key=_batch_key), key=_batch_key):
        group = list(group)
        for start in range(0, len(group), config.batch_size):
            chunk = group[start : start + config.batch_size]
            errors += _make(pipe, chunk, out, part)
            bar.update(len(chunk))
    bar.close()
    with open(out / f"errors.part-{state.process_index}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in errors)

    state.wait_for_everyone()
    if state.is_main_process:
        _merge(out, items, state.num_processes)
    state.wait_for_everyone()
    failed_rows = {e["id"] for e in errors} | {e.id for e in parse_errors}
    return 1 if failed_rows else 0


def _batch_key(item: Item):
    """Items that may share one pipeline call (same size, steps, scheduler, guidance)."""
    r = item.row
    return (r.width or 0, r.height or 0, r.steps, r.scheduler or "", r.guidance)


def _make(pipe, chunk: list[Item], out: Path, part: Path) -> list[dict]:
    """Generate one batch and write its images; returns the error records (empty on success).

    A failed batch never stops the run: bad values in the rows (size, scheduler, ...) are recorded
    for each of its rows; any other failure (out of memory, say) is retried one image at a time
    before the images that still fail are recorded.
    """
    start = time.perf_counter()
    try:
        result = pipe(
            [it.row.prompt for it in chunk],
            negative_prompt=[it.row.negative_prompt for it in chunk],
            seed=[it.seed for it in chunk],
            progress=False,
            **chunk[0].request(),
        )
    except LatentDiffusionError as e:
        return [_error(it, str(e)) for it in chunk]
    except Exception as e:  # noqa: BLE001 - one failed batch must not end a run of thousands
        if len(chunk) > 1:
            return [err for it in chunk for err in _make(pipe, [it], out, part)]
        return [_error(chunk[0], f"{type(e).__name__}: {e}")]
    seconds = (time.perf_counter() - start) / len(chunk)
    from .metadata import save_png

    for item, image, params in zip(chunk, result.images, result.params):
        save_png(image, out / item.file, params)  # atomic: complete or absent
        _append(part, _manifest_line(item, params, seconds))  # only after the file is in place
    return []


def _error(item: Item, reason: str) -> dict:
    return {"id": item.row.id, "line": item.row.line, "index": item.index, "reason": reason}


def _manifest_line(item: Item, params: dict, seconds: Optional[float]) -> dict:
    return {"id": item.row.id, "index": item.index, "file": item.file, "seed": item.seed,
            "seconds": None if seconds is None else round(seconds, 4), "params": params}  # fmt: skip


def _append(path: Path, record: dict) -> None:
    """Append one JSON line durably. A line cut short by a crash is closed off first, so it
    costs only itself (it is dropped when read; resume restores it from the PNG's recipe)."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _recorded(out: Path) -> dict[str, dict]:
    """Manifest lines already written (merged manifest and every part), by file name."""
    lines = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.part-*.jsonl"))]:
        for record in _read_jsonl(path):
            if isinstance(record, dict) and "file" in record:
                lines[record["file"]] = record
    return lines


def _check_finished(out: Path, done: list[Item], default_size: int) -> tuple[list[tuple[Item, dict]], list[Item]]:
    """Resume: each finished image must be the one this run would make, and have a manifest line.

    Returns the images without a manifest line (killed between rename and append; the line is
    rebuilt from the recipe inside the PNG) and the conflicts: images made from other parameters,
    which are never mixed into this run.
    """
    from .metadata import read_recipe

    recorded = _recorded(out)
    unlisted, conflicts = [], []
    for item in done:
        row = item.row
        try:
            recipe = read_recipe(out / item.file)
        except LatentDiffusionError:
            recipe = {}
        expected = {
            "prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": item.seed,
            "num_inference_steps": row.steps, "guidance_scale": row.guidance, "scheduler": row.scheduler,
            "width": row.width or default_size, "height": row.height or default_size,
        }  # fmt: skip
        if any(recipe.get(k) != v for k, v in expected.items()):
            conflicts.append(item)
        elif item.file not in recorded:
            unlisted.append((item, recipe))
    return unlisted, conflicts


def _merge(out: Path, items: list[Item], world: int) -> None:
    """Join the per-process parts into manifest.jsonl (file order) and errors.jsonl."""
    recorded = _recorded(out)
    order = {it.file: n for n, it in enumerate(items)}
    lines = [r for f, r in recorded.items() if (out / f).exists()]
    lines.sort(key=lambda r: (order.get(r["file"], len(order)), r["file"]))
    with atomic_write(out / MANIFEST, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in lines)
    errors = [e for path in sorted(out.glob("errors.part-*.jsonl")) for e in _read_jsonl(path)]
    with atomic_write(out / ERRORS, "w") as f:
        f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in errors)
    for path in [*out.glob("manifest.part-*.jsonl"), *out.glob("errors.part-*.jsonl")]:
        path.unlink()


def _check_run_file(out: Path, run_info: dict) -> Optional[str]:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return f"{path} is damaged; use another --out folder, or --overwrite"
    current = json.loads(json.dumps(run_info))  # as it reads back from JSON (tuples become lists)
    if previous != current:
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        return (
            f"{out} holds another run (different {', '.join(changed)}); use another --out folder, "
            "or --overwrite to replace it"
        )
    return None


def _claim_folder(out: Path, run_info: dict, overwrite: bool) -> Optional[str]:
    """Main process: make ``out`` this run's folder, or say why not."""
    conflict = _check_run_file(out, run_info)
    if conflict and not overwrite:
        return conflict
    if overwrite:  # remove what earlier runs wrote, and nothing else
        for name in _recorded(out):
            (out / name).unlink(missing_ok=True)
        for path in [out / MANIFEST, out / ERRORS, *out.glob("manifest.part-*"), *out.glob("errors.part-*")]:
            path.unlink(missing_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a killed run; never complete, never listed
        stale.unlink(missing_ok=True)
    with atomic_write(out / RUN_FILE, "w") as f:
        json.dump(run_info, f, indent=2, sort_keys=True)
    return None
