"""The one way the benchmark scripts write their JSON results: the folder made, the file written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from latentdiff.fileio import atomic_write


def write_json(path: str | Path, result: dict) -> dict:
    """Write ``result`` to ``path`` as indented JSON (a partial file is never left behind); returns it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as f:
        f.write(json.dumps(result, indent=2))
    return result
