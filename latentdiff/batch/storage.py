"""Where a batch run writes: a local folder, or a folder on any file system fsspec can write
(``s3://``, ``gs://``, ``abfs://``, ``memory://``, ...).

The folder code (``folder.py``) and both engines see one small interface, :func:`open_folder`.
On a local disk (a shared mount included) it does what batch always did: a file is written under
a temporary name and renamed, a manifest line is appended and fsynced, an fcntl lock keeps a second
run out. Object stores can neither rename nor append, but they publish an object only once its
upload is complete; so there a file is written whole under its final name (complete or absent, as
locally), and a manifest part is a new object per batch of images instead of a growing file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Optional, Union

from ..errors import InvalidInputError, LatentDiffusionError


def open_folder(location: Union[str, Path, "LocalFolder", "FsspecFolder"]) -> Union["LocalFolder", "FsspecFolder"]:
    """The folder at ``location``: a local path (or ``file://`` URL), or an fsspec URL."""
    if isinstance(location, (LocalFolder, FsspecFolder)):
        return location
    text = str(location)
    if "://" not in text:
        return LocalFolder(Path(text))
    if text.startswith("file://"):
        return LocalFolder(Path(text[len("file://") :]))
    try:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(text)  # credentials come from the environment, as with any fsspec tool
    except (ImportError, ValueError) as e:
        raise InvalidInputError(f"--out {text}: no file system for this URL ({e}); install the fsspec backend "
                                "for it (s3fs for s3://, gcsfs for gs://, adlfs for abfs://)") from None  # fmt: skip
    return FsspecFolder(fs, root.rstrip("/"), text.rstrip("/"))


class LocalFolder:
    """A folder on this machine's file system (or a shared mount: NFS, a cluster file system)."""

    can_append = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = str(self.path)

    def __str__(self) -> str:
        return self.location

    def join(self, name: str) -> Path:
        return self.path / name

    def makedirs(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def names(self, pattern: str = "*") -> list[str]:
        """Names of the files directly in the folder that match ``pattern`` (dot files included)."""
        try:
            with os.scandir(self.path) as entries:  # (the entry types come with the listing: no stat per file)
                return sorted(e.name for e in entries if fnmatch.fnmatchcase(e.name, pattern) and e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def read_bytes(self, name: str) -> Optional[bytes]:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def read_many(self, names: list[str]) -> dict[str, Optional[bytes]]:
        return {name: self.read_bytes(name) for name in names}

    def write(self, name: str, data: bytes) -> None:
        """Atomically: complete under its final name, or absent."""
        from ..fileio import atomic_write

        with atomic_write(self.path / name) as f:
            f.write(data)

    def append_line(self, name: str, record: dict) -> None:
        """Append one JSON line durably. A line cut short by a crash is closed off first, so it
        costs only itself (it is dropped when read; resume restores it from the PNG's recipe)."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with open(self.path / name, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def recipe(self, name: str) -> Optional[dict]:
        """The latentdiff recipe of a PNG in the folder, or None (none, damaged, not a PNG)."""
        from ..generation.recipe import read_recipe

        try:
            return read_recipe(self.path / name)
        except LatentDiffusionError:
            return None

    def lock(self):
        """An exclusive lock on the folder for this run, held until the returned handle is dropped."""
        handle = open(self.path / ".latentdiff-batch.lock", "w")  # noqa: SIM115 - held until the run ends
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise InvalidInputError(f"another latentdiff batch is writing into {self}; wait for it or use another --out") from None
        return handle


class FsspecFolder:
    """A folder on an fsspec file system. Writes are whole objects; there is no lock (see the README)."""

    can_append = False

    def __init__(self, fs, root: str, location: str):
        self.fs, self.root, self.location = fs, root, location

    def __str__(self) -> str:
        return self.location

    def __reduce__(self):  # to Ray workers: reopened from the URL there, with that machine's credentials
        return open_folder, (self.location,)

    def join(self, name: str) -> str:
        return posixpath.join(self.location, name)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def names(self, pattern: str = "*") -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=True, refresh=True) if self.fs.exists(self.root) else []
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory")
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def read_bytes(self, name: str) -> Optional[bytes]:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None

    def read_many(self, names: list[str]) -> dict[str, Optional[bytes]]:
        """Many small files at once (concurrent requests on object stores)."""
        if not names:
            return {}
        paths = {self._path(n): n for n in names}
        got = self.fs.cat(list(paths), on_error="return")
        return {paths[p]: (None if isinstance(data, Exception) else data) for p, data in got.items()}

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)  # an object appears only once its upload is complete

    def append_line(self, name: str, record: dict) -> None:
        raise NotImplementedError("object stores cannot append; write a part per batch (PartWriter)")

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def recipe(self, name: str) -> Optional[dict]:
        from ..generation.recipe import read_recipe

        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return read_recipe(self.join(name), data=data)
        except LatentDiffusionError:
            return None

    def lock(self):
        return None  # object stores have no lock that fsspec can take: one run per folder is up to the user


class PartWriter:
    """A writer's manifest part: ``manifest.part-TAG.jsonl``, one line appended (and fsynced) per
    image where the file system can append; elsewhere a new whole object per :meth:`flush` (each
    batch of images), ``manifest.part-TAG-<random>.jsonl``. ``merge`` reads both kinds."""

    def __init__(self, folder, tag: str, kind: str = "manifest"):
        self.folder, self.tag, self.kind = folder, tag, kind
        self.pending: list[dict] = []

    def add(self, record: dict) -> None:
        if self.folder.can_append:
            self.folder.append_line(f"{self.kind}.part-{self.tag}.jsonl", record)
        else:
            self.pending.append(record)

    def flush(self) -> None:
        if self.pending:
            data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.pending).encode()
            self.folder.write(f"{self.kind}.part-{self.tag}-{uuid.uuid4().hex[:12]}.jsonl", data)
            self.pending = []
