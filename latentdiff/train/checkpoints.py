"""Training checkpoints: written atomically, pruned to the last K, found again on resume.

A checkpoint is a folder ``checkpoint-00001000`` holding accelerate's state (trainable weights,
optimizer, grad scaler, every rank's RNG state), the state of the run's other objects (the LR
schedule, the EMA) as ``NAME.json`` plus ``NAME.safetensors``, ``trainer_state.json`` (step, epoch,
position inside the epoch, data-order seed) and the resolved ``config.toml``. All ranks write into
``.checkpoint-00001000.tmp``; only when every rank is done does the main process fsync it and
rename it into place, so a folder named ``checkpoint-*`` is always complete and a crash mid-save
leaves only a hidden temporary folder (removed on resume).

Resuming runs no code from the folder, whoever put files there (the shipped configs resume from
the newest checkpoint on their own): accelerate's own pickles (optimizer, scaler, RNG states) are
read with ``torch.load(weights_only=True)`` and accelerate's allow-list of numpy types, and the
objects that accelerate would unpickle with ``weights_only=False`` (``custom_checkpoint_N.pkl``) are
not registered with it at all. Before anything is restored every file is checked, so a damaged or
hostile one is one line naming it, with the previous checkpoint to resume from instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

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


def save(accelerator, folder: Path, step: int, state: dict[str, Any], config_toml: str, keep: int,
         objects: Optional[dict[str, Any]] = None) -> Path:  # fmt: skip
    """Collective: every rank must call it. Returns the final checkpoint path.

    ``objects``: name -> anything with ``state_dict`` / ``load_state_dict`` (the LR schedule, the EMA),
    saved as ``NAME.json`` + ``NAME.safetensors`` by the main process. The main process's own parts
    (the temporary folder; the objects, the config, the state file, the rename and the pruning) run
    through ``on_main``: if one fails, every rank raises instead of waiting.
    """
    final = folder / name(step)
    tmp = folder / f".{name(step)}.tmp"
    on_main(_fresh_folder, tmp)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are in tmp before it is sealed
    on_main(_seal, tmp, final, state, config_toml, keep, objects or {})
    return final


def _fresh_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _seal(tmp: Path, final: Path, state: dict[str, Any], config_toml: str, keep: int, objects: dict[str, Any]) -> None:
    """Main process: complete the checkpoint in ``tmp`` and move it into place as ``final``."""
    for key, obj in objects.items():
        if obj is not None:
            _write_state(tmp, key, obj.state_dict())
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


def load(accelerator, path: Path, strict: bool = True, objects: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Collective: restore accelerate's state and ``objects`` (as :func:`save` wrote them) from ``path``
    and return its trainer state. Every file is checked first (:func:`verify`)."""
    verify(path)
    state = json.loads((path / STATE_FILE).read_text())
    try:
        with _accelerate_view(path) as view:
            accelerator.load_state(str(view), strict=strict)
        for index, (key, obj) in enumerate((objects or {}).items()):
            if obj is not None:
                obj.load_state_dict(_read_state(path, key, index))
    except InvalidInputError:
        raise
    except Exception as e:  # noqa: BLE001 - shapes or keys that do not fit this run's model
        raise InvalidInputError(
            f"could not restore {path} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); it was written "
            f"by another configuration of the run (model, LoRA, EMA, precision). {_instead(path)}"
        ) from None
    return state


@contextlib.contextmanager
def _accelerate_view(path: Path) -> Iterator[Path]:
    """``path`` as accelerate's ``load_state`` should see it: without ``custom_checkpoint_N.pkl`` files
    (older checkpoints have them; we read them ourselves, and accelerate refuses files it has no
    registered object for). A temporary folder of links, or ``path`` itself when there are none."""
    hidden = list(path.glob("custom_checkpoint_*.pkl"))
    if not hidden:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="latentdiff-resume-") as tmp:
        view = Path(tmp) / path.name
        view.mkdir()
        for item in path.iterdir():
            if item not in hidden:
                try:
                    (view / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
                except OSError:  # no symlinks here (Windows without the right): copy
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, view / item.name)
        yield view


def verify(path: Path) -> None:
    """Read every file of checkpoint ``path`` the way resuming will, without restoring anything: a
    truncated, damaged or code-running file is an ``InvalidInputError`` naming it and the previous
    checkpoint. Pickles are opened memory-mapped, so this costs little beyond their headers."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS
    from safetensors import safe_open

    from ..models.safe_load import PICKLES, load_pickle

    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:  # checks the header against the file's length
                    f.keys()
            elif file.suffix in PICKLES + (".pkl",):
                load_pickle(file, allow=tuple(TORCH_SAFE_GLOBALS), mmap=True, label=f"checkpoint file {file}",
                            fix=_instead(path), code_fix=f"a training checkpoint never needs that; {_instead(path)}")  # fmt: skip
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except InvalidInputError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise InvalidInputError(
                f"checkpoint file {file} is damaged ({type(e).__name__}: {str(e).strip()[:160]}); {_instead(path)}"
            ) from None


def _instead(path: Path) -> str:
    """What to do about a checkpoint that cannot be resumed: the previous complete one, if any."""
    earlier = [p for p in complete(path.parent) if int(PATTERN.match(p.name).group(1)) < _step_of(path)]
    if earlier:
        return (f"resume from the previous checkpoint (--set checkpoint.resume={earlier[-1]}), or delete {path.name} "
                "so that resume = \"latest\" takes it")  # fmt: skip
    return f"delete {path} to start the run afresh"


def _step_of(path: Path) -> int:
    m = PATTERN.match(path.name)
    return int(m.group(1)) if m else 1 << 62


# -- objects' state as JSON + safetensors: nothing in it can run code ------------------------------------


def _write_state(folder: Path, key: str, state: Any) -> None:
    """``state`` (nested dicts / lists of numbers, strings, None and tensors) as ``KEY.json`` with every
    tensor replaced by ``{"__tensor__": N}`` and stored under ``N`` in ``KEY.safetensors``."""
    import torch

    from ..models.safe_load import write_tensor_file

    tensors: dict[str, torch.Tensor] = {}

    def plain(value):
        if isinstance(value, torch.Tensor):
            tensors[str(len(tensors))] = value.detach().cpu().contiguous()
            return {"__tensor__": str(len(tensors) - 1)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{key} state holds a {type(value).__name__}, which a checkpoint does not store")

    text = json.dumps(plain(state))
    write_tensor_file(folder / f"{key}.safetensors", tensors)
    with atomic_write(folder / f"{key}.json", "w") as f:
        f.write(text)


def _read_state(path: Path, key: str, index: int) -> Any:
    """What :func:`_write_state` wrote; a checkpoint from before has accelerate's
    ``custom_checkpoint_INDEX.pkl`` instead, read with ``weights_only=True``."""
    from ..models.safe_load import load_pickle, read_tensor_file

    if not (path / f"{key}.json").is_file():
        legacy = path / f"custom_checkpoint_{index}.pkl"
        if legacy.is_file():
            return load_pickle(legacy, fix=_instead(path))
        raise MissingFileError(f"checkpoint {path} has no {key}.json; {_instead(path)}")
    tensors, _ = read_tensor_file(path / f"{key}.safetensors")

    def restore(value):
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    state = restore(json.loads((path / f"{key}.json").read_text(encoding="utf-8")))
    # (JSON turns integer keys, such as torch schedulers' per-group entries, into strings: give them back)
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in state.items()}


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
