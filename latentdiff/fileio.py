"""Crash-safe writes: a file or folder appears under its final name only once it is complete.

Temporary files and folders are hidden siblings of their target named after it and after the
process that writes them: ``.NAME.<host>-<pid>-<random>.tmp``. So what a killed writer leaves can be
told apart from what a live one is writing, and is removed by the next write beside it
(:func:`remove_stale`); a folder replaced by :func:`atomic_dir` and killed between its renames is
put back together by the next :func:`atomic_dir` on it, or the next load (:func:`recover_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

# .NAME.HOST-PID-RANDOM.KIND: tmp = being written, new = a complete folder about to replace NAME,
# old = NAME moved aside while it is replaced
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^.]*\.(?P<kind>tmp|new|old)$")
STALE_AFTER = 24 * 3600  # seconds: a temporary entry of another machine (or of unknown origin) is abandoned by then


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner() -> str:
    """This process, as temporary names record it: 8 hex digits of the host name, and the pid."""
    return f"{hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]}-{os.getpid()}"


def writer() -> str:
    """This process as temporary names record it (``HOST-PID``), for the names of per-writer files."""
    return _owner()


def _prefix(path: Path) -> str:
    return f".{path.name}.{_owner()}-"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, exclusive: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and move it into place.

    On any exception the temporary file is removed and ``path`` is left as it was; an ``OSError``
    (a full disk, no permission) names ``path``, not the temporary file. With ``exclusive`` the file
    is linked into place only if ``path`` does not exist yet, else ``FileExistsError`` (two writers
    can never replace each other's file).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file reads like any other
        if exclusive:
            os.link(tmp, path)  # fails if path exists
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError) and e.filename in (None, tmp):
            e.filename = str(path)  # the user knows the target, not our temporary name
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``.

    The finished folder is first renamed ``.NAME.*.new``, then an existing ``path`` is moved aside
    and the new one moved in, and only then is the old one deleted. A crash between those renames
    leaves no folder under the name, but :func:`recover_dir` (run by the next ``atomic_dir`` on it,
    and by the next load) finishes the swap; a crash while writing leaves the old folder.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _public(tmp)
        new = tmp.with_name(tmp.name.removesuffix(".tmp") + ".new")
        os.replace(tmp, new)  # complete: from here on a crash is finished by recover_dir, not undone
        tmp = new
        _swap_in(new, path)
    except BaseException:
        if tmp.name.endswith(".tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    recover_dir(path)  # (removes the old folder)


def _public(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions of a plain new file or folder (the
    umask's): mkdtemp makes 0700, and libraries that write through their own temporary files
    (diffusers' save_pretrained) leave 0600 weights that no one else on a shared machine could read."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, (0o666 & ~umask) | (os.stat(file).st_mode & 0o111 & ~umask))


def _swap_in(new: Path, path: Path) -> None:
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(new, path)


def recover_dir(path: str | Path) -> None:
    """Put ``path`` back together after a crash in :func:`atomic_dir`, and clear its leftovers.

    A complete new version (``.NAME.*.new``) is moved into place (the interrupted save is
    finished); otherwise, if ``path`` is gone, the version moved aside (``.NAME.*.old/NAME``) comes
    back. Then the moved-aside versions and abandoned temporary folders are deleted.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    leftovers = [(p, m) for p in path.parent.iterdir() if (m := _TEMP.match(p.name)) and m["name"] == path.name]
    if not leftovers:
        return
    complete = sorted((p for p, m in leftovers if m["kind"] == "new" and p.is_dir()), key=lambda p: p.stat().st_mtime)
    if complete:
        _swap_in(complete[-1], path)
    elif not path.exists():
        for p, m in leftovers:
            if m["kind"] == "old" and (p / path.name).is_dir():
                os.replace(p / path.name, path)
                break
    for p, m in leftovers:
        if p.exists() and (m["kind"] in ("new", "old") or _abandoned(p, m)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def remove_stale(folder: str | Path, suffix: str = "") -> list[Path]:
    """Delete the temporary files in ``folder`` (for targets ending in ``suffix``) whose writer is gone:
    a dead process of this machine, or anything older than a day. Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and m["kind"] == "tmp" and m["name"].endswith(suffix) and p.is_file() and _abandoned(p, m):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _abandoned(path: Path, m: re.Match) -> bool:
    """Whether the process that made a temporary entry is gone (or it is too old to be anyone's)."""
    try:
        if time.time() - path.stat().st_mtime > STALE_AFTER:
            return True
    except FileNotFoundError:
        return False
    if m["host"] != _owner().split("-")[0]:
        return False  # another machine's: only age tells
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive (another user's), or cannot tell
    return False
