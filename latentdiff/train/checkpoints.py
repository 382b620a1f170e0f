"""Training checkpoints: written atomically, pruned to the last K, found again on resume.

A checkpoint is a folder ``checkpoint-00001000`` holding accelerate's state (trainable weights,
optimizer, grad scaler, every rank's RNG state, registered objects such as the LR schedule and the
EMA), ``trainer_state.json`` (step, epoch, position inside the epoch, data-order seed) and the
resolved ``config.toml``. All ranks write into ``.checkpoint-00001000.tmp``; only when every rank is
done does the main process fsync it and rename it into place, so a folder named ``checkpoint-*`` is
always complete and a crash mid-save leaves only a hidden temporary folder (removed on resume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from ..distributed import on_main
from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_write

PATTERN = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.toml"


def name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def resolve(resume: str, folder: Path) -> Optional[Path]:
    """``""`` = start fresh; ``"latest"`` = newest complete checkpoint in ``folder`` (fresh if none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = complete(folder)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise MissingFileError(f"checkpoint.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def remove_stale(folder: Path) -> list[Path]:
    """Delete temporary folders left by a save that crashed (main process only)."""
    stale = [p for p in folder.glob(".checkpoint-*.tmp") if p.is_dir()] if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save(accelerator, folder: Path, step: int, state: dict[str, Any], config_toml: str, keep: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint path.

    The main process's own parts (the temporary folder; the config, the state file, the rename and
    the pruning) run through ``on_main``: if one fails, every rank raises instead of waiting.
    """
    final = folder / name(step)
    tmp = folder / f".{name(step)}.tmp"
    on_main(_fresh_folder, tmp)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are in tmp before it is sealed
    on_main(_seal, tmp, final, state, config_toml, keep)
    return final


def _fresh_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _seal(tmp: Path, final: Path, state: dict[str, Any], config_toml: str, keep: int) -> None:
    """Main process: complete the checkpoint in ``tmp`` and move it into place as ``final``."""
    with atomic_write(tmp / CONFIG_FILE, "w") as f:
        f.write(config_toml)
    _fsync_tree(tmp)
    with atomic_write(tmp / STATE_FILE, "w") as f:  # written last: its presence marks a whole checkpoint
        json.dump(state, f, indent=2)
    if final.exists():  # the same step saved again (a resumed run's final save): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in complete(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load(accelerator, path: Path, strict: bool = True) -> dict[str, Any]:
    """Collective: restore accelerate's state from ``path`` and return its trainer state."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read {state_file}: {e}") from None
    accelerator.load_state(str(path), strict=strict)
    return state


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
